package route

import (
	"context"
	"testing"
	"time"

	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/internal/redistest"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
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

// The relay's calls reach the registry in Redis through RunRegistry: a
// device is registered while it has connections here and removed after.
func TestRunRegistry(t *testing.T) {
	rs := redistest.Start(t)
	rdb, err := cluster.NewRedis(rs.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	node, err := cluster.NewNode(rdb, cluster.NewStore(db), cluster.Config{NodeID: "n1", Bootstrap: true, Shards: 4,
		Advertise: "ws://127.0.0.1:1", LeaseTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := node.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	r, err := NewRouter(Config{Node: node, Secret: []byte("0123456789abcdef")})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); r.RunRegistry(ctx) }()
	defer func() { cancel(); <-done }()

	reg := node.Registry()
	ref := cluster.DeviceRef{Username: "bob", Device: 2}
	until := func(want bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			_, ok, err := reg.Device(ctx, ref)
			if err == nil && ok == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("device registered %v (%v), want %v", ok, err, want)
			}
			time.Sleep(10 * time.Millisecond) // polling Redis: there is no event to await
		}
	}
	dev := wire.DeviceAddr{Account: "bob", Device: 2}
	r.DeviceConnected(dev)
	until(true)
	r.DeviceConnected(dev) // a replacement
	r.DeviceDisconnected(dev)
	r.DeviceDisconnected(dev)
	until(false)
	r.DeviceConnected(dev)
	until(true)
}
