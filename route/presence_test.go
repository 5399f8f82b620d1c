package route

import (
	"testing"

	"github.com/ferryhq/ferry/cluster"
)

// A device is written to the registry when its count of receiving
// connections here crosses 0, so a replacement connection (which overlaps
// the one it replaces) never unregisters it.
func TestDevRegistryCounts(t *testing.T) {
	dev := cluster.DeviceRef{Username: "bob", Device: 1}
	tests := []struct {
		name      string
		deltas    []int
		wantDirty bool
		wantConns int
	}{
		{"connect", []int{1}, true, 1},
		{"replacement overlaps", []int{1, 1, -1}, true, 1},
		{"connect then end", []int{1, -1}, true, 0},
		{"end without connect", []int{-1}, false, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevRegistry()
			for _, x := range tc.deltas {
				d.add(dev, x)
			}
			_, dirty := d.dirty[dev]
			if dirty != tc.wantDirty || d.conns[dev] != tc.wantConns {
				t.Fatalf("dirty %v conns %d, want %v %d", dirty, d.conns[dev], tc.wantDirty, tc.wantConns)
			}
		})
	}
	// Written, then replaced: nothing new to write.
	d := newDevRegistry()
	d.add(dev, 1)
	clear(d.dirty)
	d.add(dev, 1)
	d.add(dev, -1)
	if len(d.dirty) != 0 {
		t.Fatalf("a replacement made %v dirty", d.dirty)
	}
}
