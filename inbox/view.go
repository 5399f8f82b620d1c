package inbox

import (
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2"
)

// A view is what readers (Range, Get, Lookup, Depth) see: a Pebble snapshot
// taken by the committer after a commit returned, that is, after its fsync.
//
// Pebble makes a batch readable before its WAL sync completes. Reading the
// live database could therefore hand a device an envelope that a crash then
// erases, and the id would later be given to another envelope, which the
// device would drop as a redelivery. Readers never see past the last
// durable commit.
type view struct {
	snap *pebble.Snapshot
	refs atomic.Int64 // the Store's reference while current, plus readers'
}

// acquire returns the current view with a reference the caller releases.
func (s *Store) acquire() *view {
	for {
		v := s.cur.Load()
		n := v.refs.Load()
		if n > 0 && v.refs.CompareAndSwap(n, n+1) {
			return v
		}
		// n == 0: replaced and closed just now; load the new one.
	}
}

func (v *view) release() {
	if v.refs.Add(-1) == 0 {
		_ = v.snap.Close()
	}
}

// publish makes the database's current state the readers' view (at start,
// before any commit).
func (s *Store) publish() { s.publishSnap(s.db.NewSnapshot()) }

// publishSnap makes snap, taken right after a group was applied and
// published once that group is synced, the readers' view. Called by the
// committer's sync stage only (and at start).
func (s *Store) publishSnap(snap *pebble.Snapshot) {
	v := &view{snap: snap}
	v.refs.Store(1)
	if old := s.cur.Swap(v); old != nil {
		old.release()
	}
}
