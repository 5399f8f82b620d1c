package client

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff is jittered exponential backoff : the n-th wait is
// uniform in [Min/2, min(Max, Min*2^n)], so a crowd of clients dropped at once
// does not come back in lockstep.
type Backoff struct {
	Min, Max time.Duration // 0 = 100ms and 10s
	n        int
}

// Next returns the next wait.
func (b *Backoff) Next() time.Duration {
	lo, hi := b.Min, b.Max
	if lo <= 0 {
		lo = 100 * time.Millisecond
	}
	if hi <= 0 {
		hi = 10 * time.Second
	}
	d := lo << min(b.n, 20)
	if d > hi || d <= 0 {
		d = hi
	}
	b.n++
	return lo/2 + rand.N(d-lo/2+1)
}

// Reset starts over after a success.
func (b *Backoff) Reset() { b.n = 0 }

// Wait sleeps for the next wait or until ctx ends.
func (b *Backoff) Wait(ctx context.Context) error {
	t := time.NewTimer(b.Next())
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
