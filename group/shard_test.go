package group

import (
	"bytes"
	"context"
	"slices"
	"testing"

	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
)

// TestShardImportReplacesGroup: the target holds an older version of the
// group (same id, other members): the import replaces the record and the
// member index, so the old members no longer list it; a drop removes the
// record and every member key, whoever the member is.
func TestShardImportReplacesGroup(t *testing.T) {
	id := bytes.Repeat([]byte{7}, IDSize)
	src, _ := newStore(t, Options{Rand: bytes.NewReader(id)})
	dst, _ := newStore(t, Options{Rand: bytes.NewReader(id)})
	g, err := src.Create(ctx(), "alice", "new", []string{"bob"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dst.Create(ctx(), "carol", "old", []string{"dave"}); err != nil {
		t.Fatal(err)
	}
	f := store.ShardFilter{Group: func(b []byte) bool { return bytes.Equal(b, id) }}
	var recs []*storepb.ShardRecord
	if err := src.ExportShard(context.Background(), f, func(r *storepb.ShardRecord) error {
		recs = append(recs, r)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(recs) != 3 { // the record and two member keys
		t.Fatalf("%d records exported, want 3", len(recs))
	}
	if err := dst.ImportShard(context.Background(), recs); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		s    *Store
		user string
		want []string
	}{
		{dst, "alice", []string{FormatID(g.Id)}},
		{dst, "bob", []string{FormatID(g.Id)}},
		{dst, "carol", []string{}},
		{dst, "dave", []string{}},
	}
	for _, tc := range tests {
		if got := listIDs(t, tc.s, tc.user); !slices.Equal(got, tc.want) {
			t.Errorf("groups of %s: %v, want %v", tc.user, got, tc.want)
		}
	}
	got, err := dst.Get(ctx(), FormatID(id))
	if err != nil || got.Name != "new" {
		t.Fatalf("imported group: %v, %v", got, err)
	}
	if err := src.DropShard(context.Background(), f); err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"alice", "bob"} {
		if got := listIDs(t, src, u); len(got) != 0 {
			t.Errorf("groups of %s after the drop: %v", u, got)
		}
	}
}
