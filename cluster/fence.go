package cluster

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// ErrFenced is returned by Fence.Check when this node may not write for a
// shard: it does not hold the lease, holds it at another epoch, or cannot
// be sure the lease has not expired in Redis. Clients see it as a
// retryable error (the shard is moving or its owner is unsure).
var ErrFenced = errors.New("cluster: shard fenced")

// Clock gives the time; the default is time.Now, whose monotonic reading is
// what the deadlines use (wall clock jumps do not move them).
type Clock func() time.Time

// grant is a held lease as this node knows it.
type grant struct {
	epoch    uint64
	deadline time.Time // local: last renewal sent + TTL − safety margin
}

// Fence is the local record of the leases this node holds. Every write for
// a shard is checked against it — without a Redis round trip — with
//
//	epoch, ok := fence.Epoch(shard)   // at the start of the operation
//	... build the batch ...
//	fence.Check(shard, epoch)         // before the commit
//	commit
//	fence.Check(shard, epoch)         // after the commit, before the ack
//
// The second check is what makes a pause harmless: a commit that a GC
// pause, a stalled fsync or a SIGSTOP pushed past the deadline is not
// acked (the client retries on the new owner, which dedups by client
// message id), and a commit that passes it happened while the lease was
// valid.
//
// Why the local deadline is safe: a grant's deadline is the time the
// renewal (or acquisition) request was SENT plus TTL minus a safety
// margin. Redis starts the TTL when it executes the script, which is after
// the send, so in Redis's time the lease lives at least until send + TTL.
// Only durations are compared, never clocks of two machines, so clock
// offset does not matter; what matters is that the two clocks' RATES
// differ by less than margin/TTL (crystal drift is ~1e-4; the default
// margin is TTL/5) and, with a replicated Redis, that a promoted replica's
// clock is within the margin of the primary's (replicas expire by absolute
// time). A node whose deadline passed stops serving at once, even if the
// Redis lease might still be alive.
type Fence struct {
	now Clock

	mu   sync.Mutex                        // serializes writers
	held atomic.Pointer[map[ShardID]grant] // copy-on-write: reads take no lock
}

// NewFence returns an empty fence reading time from now (nil: time.Now).
func NewFence(now Clock) *Fence {
	if now == nil {
		now = time.Now
	}
	f := &Fence{now: now}
	f.held.Store(&map[ShardID]grant{})
	return f
}

// update replaces the map with a copy changed by fn (renewals are rare
// next to writes).
func (f *Fence) update(fn func(map[ShardID]grant)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	old := *f.held.Load()
	m := make(map[ShardID]grant, len(old)+1)
	for s, g := range old {
		m[s] = g
	}
	fn(m)
	f.held.Store(&m)
}

// Epoch returns the epoch this node holds shard at, if it holds it now.
func (f *Fence) Epoch(shard ShardID) (uint64, bool) {
	g, ok := (*f.held.Load())[shard]
	if !ok || !f.now().Before(g.deadline) {
		return 0, false
	}
	return g.epoch, true
}

// Check returns nil if this node holds shard at epoch and its deadline has
// not passed; otherwise an error wrapping ErrFenced.
func (f *Fence) Check(shard ShardID, epoch uint64) error {
	g, ok := (*f.held.Load())[shard]
	switch {
	case !ok:
		return fmt.Errorf("%w: shard %d not held", ErrFenced, shard)
	case g.epoch != epoch:
		return fmt.Errorf("%w: shard %d at epoch %d, not %d", ErrFenced, shard, g.epoch, epoch)
	case !f.now().Before(g.deadline):
		return fmt.Errorf("%w: shard %d lease past its local deadline", ErrFenced, shard)
	}
	return nil
}

// Held returns the shards held now (deadline not passed) with their epochs.
func (f *Fence) Held() map[ShardID]uint64 {
	now := f.now()
	held := *f.held.Load()
	out := make(map[ShardID]uint64, len(held))
	for s, g := range held {
		if now.Before(g.deadline) {
			out[s] = g.epoch
		}
	}
	return out
}

// grant records that this node holds shard at epoch until deadline. A
// renewal must not move an older request's deadline past a newer one's, so
// the later deadline wins at the same epoch.
func (f *Fence) grant(shard ShardID, epoch uint64, deadline time.Time) {
	f.update(func(m map[ShardID]grant) {
		if g, ok := m[shard]; ok && g.epoch == epoch && g.deadline.After(deadline) {
			return
		}
		m[shard] = grant{epoch: epoch, deadline: deadline}
	})
}

// revoke forgets shard (lost, released, or past its deadline).
func (f *Fence) revoke(shard ShardID) {
	f.update(func(m map[ShardID]grant) { delete(m, shard) })
}

// grants returns every recorded grant, expired ones included.
func (f *Fence) grants() map[ShardID]grant {
	held := *f.held.Load()
	out := make(map[ShardID]grant, len(held))
	for s, g := range held {
		out[s] = g
	}
	return out
}
