package device_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
)

// TestShardCache: the target has an older, cached record of an account
// (other keys, fewer devices); the import replaces it and the store serves
// the imported record, not the cached one. A drop forgets the cached
// record too.
func TestShardCache(t *testing.T) {
	ctx := context.Background()
	src, _ := newStore(t, device.Options{})
	dst, _ := newStore(t, device.Options{})
	register(t, src, "alice")
	pub, _ := newKey(t)
	if _, err := src.AddDevice(ctx, "alice", pub, 7); err != nil {
		t.Fatal(err)
	}
	register(t, src, "bob")
	register(t, dst, "alice")
	if _, err := dst.Account(ctx, "alice"); err != nil { // cached now
		t.Fatal(err)
	}
	f := store.ShardFilter{Account: func(u string) bool { return u == "alice" }}
	var recs []*storepb.ShardRecord
	if err := src.ExportShard(ctx, f, func(r *storepb.ShardRecord) error { recs = append(recs, r); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := dst.ImportShard(ctx, recs); err != nil {
		t.Fatal(err)
	}
	want, err := src.Account(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	got, err := dst.Account(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Devices) != 2 || !bytes.Equal(got.Devices[1].SigningKey, want.Devices[1].SigningKey) ||
		!bytes.Equal(got.Devices[0].SigningKey, want.Devices[0].SigningKey) {
		t.Fatalf("target serves %v, want %v", got, want)
	}
	if err := src.DropShard(ctx, f); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		want error
	}{
		{"alice", device.ErrUnknownAccount},
		{"bob", nil},
	}
	for _, tc := range tests {
		if _, err := src.Account(ctx, tc.name); (tc.want == nil) != (err == nil) || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("source Account(%s) after the drop: %v, want %v", tc.name, err, tc.want)
		}
	}
}
