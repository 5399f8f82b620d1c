package inbox

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// TestStorageFaults: a WAL write or fsync that fails (a failing or full
// disk) fails the sends of that commit with a retryable UNAVAILABLE,
// nothing of them becomes visible, OnFatal fires once, and every later
// mutation fails too, even after the disk recovers: Pebble has the failed
// batch in its memtable, so only a restart (WAL replay) is safe.
func TestStorageFaults(t *testing.T) {
	for name, kind := range map[string]errorfs.OpKind{
		"fsync": errorfs.OpFileSync,
		"write": errorfs.OpFileWrite, // ENOSPC looks like this to Pebble
	} {
		t.Run(name, func(t *testing.T) {
			var on atomic.Bool
			inj := errorfs.InjectorFunc(func(op errorfs.Op) error {
				if on.Load() && strings.HasSuffix(op.Path, ".log") &&
					(op.Kind == kind || kind == errorfs.OpFileSync && op.Kind == errorfs.OpFileSyncData) {
					return errorfs.ErrInjected
				}
				return nil
			})
			db, err := store.Open("", store.Options{FS: errorfs.Wrap(vfs.NewMem(), inj)})
			if err != nil {
				t.Fatal(err)
			}
			// db is not closed: after a fatal commit error Pebble may not
			// close cleanly, which is why ferryd exits instead.
			var fatal atomic.Int32
			s := startStore(t, db, Options{OnFatal: func(error) { fatal.Add(1) }})

			mustAppend(t, s, send(alice1, "m1", "c", "stored", bob1))
			on.Store(true)
			_, err = s.Append(context.Background(), send(alice1, "m2", "c", "lost", bob1))
			assertUnavailable(t, "Append during the fault", err)
			if got := fatal.Load(); got != 1 {
				t.Errorf("OnFatal called %d times, want 1", got)
			}
			on.Store(false) // the disk "recovers": the store still refuses
			_, err = s.Append(context.Background(), send(alice1, "m3", "c", "after", bob1))
			assertUnavailable(t, "Append after the fault", err)
			items := rangeAll(t, s, bob1)
			if got := contents(items); len(got) != 1 || got[0] != "stored" {
				t.Errorf("bob1 sees %q, want only the acked message", got)
			}
			_, err = s.Ack(context.Background(), bob1, []uint64{items[0].ID}, nil)
			assertUnavailable(t, "Ack after the fault", err)
			if got := fatal.Load(); got != 1 {
				t.Errorf("OnFatal called %d times, want 1", got)
			}
		})
	}
}

func assertUnavailable(t *testing.T, what string, err error) {
	t.Helper()
	var we *wire.Error
	if !errors.As(err, &we) || we.Code != wirepb.ErrorCode_UNAVAILABLE || !we.Retryable {
		t.Fatalf("%s: err = %v, want a retryable UNAVAILABLE", what, err)
	}
}
