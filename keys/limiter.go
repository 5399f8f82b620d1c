package keys

import (
	"container/list"
	"math"
	"sync"
	"time"

	"github.com/ferryhq/ferry/wire"
	"golang.org/x/time/rate"
)

// defaultMaxLimiters bounds the per-requester limiter map.
const defaultMaxLimiters = 1 << 16

// limiters holds one token bucket per requesting device, bounded two ways:
//
//   - An entry unused for longer than a bucket takes to refill from empty
//     (burst/rate) is full again, so it is exactly what a new entry would
//     be: it is dropped, and no one's limit changes. Entries are kept in
//     least-recently-used order, so this sweep looks only at the oldest
//     entries and costs O(1) amortized per call.
//   - If more than max requesters were active within that window, the least
//     recently used is dropped anyway (it restarts with a full bucket). With
//     the defaults (5/s, burst 20: a 4 s window) that needs over 16k distinct
//     authenticated devices claiming every 4 s.
type limiters struct {
	mu    sync.Mutex
	rate  rate.Limit
	burst int
	idle  time.Duration // time to refill from empty; an entry idle this long is full
	max   int
	m     map[wire.DeviceAddr]*list.Element
	lru   list.List // of *limEntry; front = most recently used
}

type limEntry struct {
	addr wire.DeviceAddr
	lim  *rate.Limiter
	last time.Time
}

func newLimiters(r rate.Limit, burst, max int) *limiters {
	l := &limiters{rate: r, burst: burst, max: max, m: make(map[wire.DeviceAddr]*list.Element)}
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

// take takes one token from addr's bucket at now. It returns 0 if the
// token was there, or how long until it will be (and takes nothing).
func (l *limiters) take(addr wire.DeviceAddr, now time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sweep(now)

	var e *limEntry
	if el, ok := l.m[addr]; ok {
		e = el.Value.(*limEntry)
		l.lru.MoveToFront(el)
	} else {
		for l.lru.Len() >= l.max {
			l.remove(l.lru.Back())
		}
		e = &limEntry{addr: addr, lim: rate.NewLimiter(l.rate, l.burst)}
		l.m[addr] = l.lru.PushFront(e)
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
func (l *limiters) sweep(now time.Time) {
	for el := l.lru.Back(); el != nil; el = l.lru.Back() {
		if now.Sub(el.Value.(*limEntry).last) < l.idle {
			return
		}
		l.remove(el)
	}
}

func (l *limiters) remove(el *list.Element) {
	delete(l.m, el.Value.(*limEntry).addr)
	l.lru.Remove(el)
}

// len returns the number of entries held.
func (l *limiters) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}
