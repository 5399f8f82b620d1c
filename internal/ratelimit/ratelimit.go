// Package ratelimit is the per-key token bucket Ferry uses wherever a limit
// applies per requester (a device, a remote address): golang.org/x/time/rate
// buckets in a map that stays bounded.
package ratelimit

import (
	"container/list"
	"math"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// DefaultMax is a reasonable bound on the number of keys held.
const DefaultMax = 1 << 16

// Keyed holds one token bucket per key, bounded two ways:
//
//   - An entry unused for longer than a bucket takes to refill from empty
//     (burst/rate) is full again, so it is exactly what a new entry would
//     be: it is dropped, and no one's limit changes. Entries are kept in
//     least-recently-used order, so this sweep looks only at the oldest
//     entries and costs O(1) amortized per call.
//   - If more than max keys were active within that window, the least
//     recently used is dropped anyway (it restarts with a full bucket).
type Keyed[K comparable] struct {
	mu    sync.Mutex // guards everything below
	rate  rate.Limit
	burst int
	idle  time.Duration // time to refill from empty; an entry idle this long is full
	max   int
	m     map[K]*list.Element
	lru   list.List // of *entry[K]; front = most recently used
}

type entry[K comparable] struct {
	key  K
	lim  *rate.Limiter
	last time.Time
}

// New makes a limiter of r per second with burst, holding at most max keys.
func New[K comparable](r rate.Limit, burst, max int) *Keyed[K] {
	l := &Keyed[K]{rate: r, burst: burst, max: max, m: make(map[K]*list.Element)}
	switch {
	case r == rate.Inf:
		l.idle = 0
	case r <= 0:
		l.idle = time.Duration(math.MaxInt64)
	default:
		secs := float64(burst) / float64(r)
		if secs >= float64(math.MaxInt64/int64(time.Second)) {
			l.idle = time.Duration(math.MaxInt64)
		} else {
			l.idle = time.Duration(math.Ceil(secs * float64(time.Second)))
		}
	}
	return l
}

// Take takes one token from key's bucket at now. It returns 0 if the
// token was there, or how long until it will be (and takes nothing).
func (l *Keyed[K]) Take(key K, now time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sweep(now)

	var e *entry[K]
	if el, ok := l.m[key]; ok {
		e = el.Value.(*entry[K])
		l.lru.MoveToFront(el)
	} else {
		for l.lru.Len() >= l.max {
			l.remove(l.lru.Back())
		}
		e = &entry[K]{key: key, lim: rate.NewLimiter(l.rate, l.burst)}
		l.m[key] = l.lru.PushFront(e)
	}
	if now.After(e.last) {
		e.last = now
	}
	r := e.lim.ReserveN(now, 1)
	if !r.OK() {
		return time.Duration(math.MaxInt64)
	}
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return d
	}
	return 0
}

// sweep drops entries that have been idle long enough to be full again.
func (l *Keyed[K]) sweep(now time.Time) {
	for el := l.lru.Back(); el != nil; el = l.lru.Back() {
		if now.Sub(el.Value.(*entry[K]).last) < l.idle {
			return
		}
		l.remove(el)
	}
}

func (l *Keyed[K]) remove(el *list.Element) {
	delete(l.m, el.Value.(*entry[K]).key)
	l.lru.Remove(el)
}

// Len returns the number of entries held.
func (l *Keyed[K]) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}
