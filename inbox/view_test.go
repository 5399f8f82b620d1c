package inbox

import (
	"context"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/wire"
)

// Readers see nothing of a commit until it has returned (its fsync done):
// Pebble makes a batch readable before the WAL sync, and an envelope handed
// out then could vanish in a crash and its id be reused.
func TestReadersSeeOnlyReturnedCommits(t *testing.T) {
	applied, release := make(chan struct{}), make(chan struct{})
	commit := func(b *pebble.Batch, wo *pebble.WriteOptions) error {
		err := b.Commit(wo) // readable in the live database from here on
		close(applied)
		<-release
		return err
	}
	s, db := newStore(t, Options{commit: commit})
	alice, bob := wire.DeviceAddr{Account: "alice", Device: 1}, wire.DeviceAddr{Account: "bob", Device: 1}
	done := make(chan error, 1)
	go func() {
		_, err := s.Append(context.Background(), send(alice, "m1", "c", "hello", bob))
		done <- err
	}()
	<-applied
	// The live database already has it...
	if v, closer, err := db.Get(entryKey(bob, 1)); err != nil || len(v) == 0 {
		t.Fatalf("test setup: the entry is not in the live database yet: %v", err)
	} else {
		closer.Close()
	}
	// ...but no reader sees it before the commit returned.
	if items := rangeAll(t, s, bob); len(items) != 0 {
		t.Fatalf("Range saw %d entries of an unfinished commit", len(items))
	}
	if _, err := s.Get(context.Background(), bob, 1); err != ErrNotFound {
		t.Fatalf("Get saw an unfinished commit: %v", err)
	}
	if _, ok, _ := s.Lookup(context.Background(), alice, "m1"); ok {
		t.Fatal("Lookup reported an unfinished commit as accepted")
	}
	if n, _, _ := s.Depth(context.Background(), bob); n != 0 {
		t.Fatalf("Depth counted an unfinished commit: %d", n)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if items := rangeAll(t, s, bob); len(items) != 1 {
		t.Fatalf("after the commit returned Range sees %d entries, want 1", len(items))
	}
	if _, ok, _ := s.Lookup(context.Background(), alice, "m1"); !ok {
		t.Fatal("Lookup does not see the finished commit")
	}
}
