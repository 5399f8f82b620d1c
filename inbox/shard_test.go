package inbox

import (
	"context"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

func accountFilter(names ...string) store.ShardFilter {
	set := make(map[string]bool)
	for _, n := range names {
		set[n] = true
	}
	return store.ShardFilter{Account: func(u string) bool { return set[u] }}
}

// TestShardFanoutPending: a fan-out job that still has to write an entry
// for a device of the shard blocks Export and Drop of that shard (with a
// retryable UNAVAILABLE error matching ErrFanoutPending), not of others.
// The job's recipient alice.1 has a meta that does not decode, so the
// committer can never expand it: the job stays pending for the test.
func TestShardFanoutPending(t *testing.T) {
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	job, _ := proto.Marshal(&storepb.FanoutJob{OrderKey: "g:x", BodyId: 1, Seq: 1,
		Recipients: []*storepb.FanoutRecipient{{Username: "alice", DeviceId: 1}}})
	for _, kv := range [][2][]byte{
		{fanCounterKey, binary.BigEndian.AppendUint64(nil, 1)},
		{fanJobKey(1), job},
		{metaKey(alice1), {0xff, 0xff}},
	} {
		if err := db.Set(kv[0], kv[1], nil); err != nil {
			t.Fatal(err)
		}
	}
	s := startStore(t, db, Options{})
	ctx := context.Background()
	mustAppend(t, s, send(carol1, "c1", "d:bob:carol", "hi", bob1))

	tests := []struct {
		name    string
		f       store.ShardFilter
		pending bool
	}{
		{"recipient's shard", accountFilter("alice"), true},
		{"other shard", accountFilter("bob"), false},
		{"no shard", store.ShardFilter{}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := 0
			err := s.ExportShard(ctx, tc.f, func(*storepb.ShardRecord) error { n++; return nil })
			derr := s.DropShard(ctx, tc.f)
			if !tc.pending {
				if err != nil || derr != nil {
					t.Fatalf("Export: %v, Drop: %v", err, derr)
				}
				return
			}
			for _, e := range []error{err, derr} {
				var we *wire.Error
				if !errors.Is(e, ErrFanoutPending) || !errors.As(e, &we) || we.Code != wirepb.ErrorCode_UNAVAILABLE || !we.Retryable {
					t.Fatalf("got %v, want a retryable UNAVAILABLE ErrFanoutPending", e)
				}
			}
			if n != 0 {
				t.Errorf("a refused export emitted %d records", n)
			}
		})
	}
	// The refused drop deleted nothing of alice.
	if _, closer, err := db.Get(metaKey(alice1)); err != nil {
		t.Fatalf("alice's meta after a refused drop: %v", err)
	} else {
		closer.Close()
	}
}

// TestShardImportCaches: an import replaces what the committer would
// otherwise read of the account; a device's next id, dedup record and
// marker follow the imported state.
func TestShardImportCaches(t *testing.T) {
	ctx := context.Background()
	src, _ := newStore(t, Options{})
	dst, _ := newStore(t, Options{})
	mustAppend(t, src, send(bob1, "b1", "d:alice:bob", "one", alice1))
	mustAppend(t, src, send(bob1, "b2", "d:alice:bob", "two", alice1))
	// The target has an older alice with more entries: the import replaces it.
	for i := range 5 {
		mustAppend(t, dst, send(carol1, string(rune('a'+i)), "", "old", alice1))
	}
	var recs []*storepb.ShardRecord
	if err := src.ExportShard(ctx, accountFilter("alice", "bob"), func(r *storepb.ShardRecord) error {
		recs = append(recs, r)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := dst.ImportShard(ctx, recs); err != nil {
		t.Fatal(err)
	}
	if got := itemIDs(rangeAll(t, dst, alice1)); len(got) != 2 || got[0] != 1 || got[1] != 2 {
		t.Fatalf("alice on the target: ids %v, want [1 2]", got)
	}
	if n, _, _ := dst.Depth(ctx, alice1); n != 2 {
		t.Errorf("depth %d, want 2", n)
	}
	acc := mustAppend(t, dst, send(bob1, "b2", "d:alice:bob", "two", alice1))
	if !acc.Duplicate || acc.Seq != 2 {
		t.Errorf("retry of b2 on the target: %+v, want the duplicate of seq 2", acc)
	}
	acc = mustAppend(t, dst, send(bob1, "b3", "d:alice:bob", "three", alice1))
	if acc.Seq != 3 {
		t.Errorf("next seq %d, want 3", acc.Seq)
	}
	if got := itemIDs(rangeAll(t, dst, alice1)); len(got) != 3 || got[2] != 3 {
		t.Errorf("alice's next id: %v, want [1 2 3]", got)
	}
}

// FuzzParseShardImport: whatever records arrive, parseShardImport does not
// panic, and what it accepts imports without error and leaves the inbox
// readable.
func FuzzParseShardImport(f *testing.F) {
	src, _ := newStore(f, Options{})
	mustAppend(f, src, send(bob1, "b1", "d:alice:bob", "one", alice1))
	if _, err := src.AppendGroup(context.Background(), GroupAppend{Sender: bob1, Conversation: "g:00112233445566778899aabbccddeeff",
		Env: envelope(bob1, "g"), Recipients: []wire.DeviceAddr{alice1, alice2}}); err != nil {
		f.Fatal(err)
	}
	var seed []*storepb.ShardRecord
	if err := src.ExportShard(context.Background(), accountFilter("alice", "bob"), func(r *storepb.ShardRecord) error {
		seed = append(seed, r)
		return nil
	}); err != nil {
		f.Fatal(err)
	}
	for i, r := range seed {
		f.Add(i, r.Key, r.Value, r.BodyRefs)
	}
	dst, _ := newStore(f, Options{})
	f.Fuzz(func(t *testing.T, i int, key, value []byte, refs uint32) {
		recs := make([]*storepb.ShardRecord, len(seed))
		for j, r := range seed {
			recs[j] = proto.CloneOf(r)
		}
		if i >= 0 && i < len(recs) {
			recs[i] = &storepb.ShardRecord{Store: ShardStoreName, Key: key, Value: value, BodyRefs: refs}
		} else {
			recs = append(recs, &storepb.ShardRecord{Store: ShardStoreName, Key: key, Value: value, BodyRefs: refs})
		}
		if _, err := parseShardImport(recs); err != nil {
			if !errors.Is(err, store.ErrShardRecord) {
				t.Fatalf("rejected with %v, want ErrShardRecord", err)
			}
			return
		}
		if err := dst.ImportShard(context.Background(), recs); err != nil {
			t.Fatalf("accepted records fail to import: %v", err)
		}
		for _, d := range []wire.DeviceAddr{alice1, alice2} {
			if _, err := dst.Range(context.Background(), d, 0, 100); err != nil {
				t.Fatalf("Range after import: %v", err)
			}
		}
	})
}
