package relay

import (
	"container/list"
	"math"
	"net/netip"
	"sync"
	"time"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"golang.org/x/time/rate"
)

// keyedLimiter holds one token bucket per key (a remote address, a device),
// bounded two ways, like the prekey directory's claim limiter:
//
//   - an entry unused for as long as its bucket takes to refill from empty
//     (burst/rate) is full again, exactly what a new entry would be: it is
//     dropped, and no one's limit changes. Entries are kept in
//     least-recently-used order, so this costs O(1) amortized per call;
//   - past max entries active within that window, the least recently used
//     one is dropped anyway (it restarts with a full bucket).
type keyedLimiter struct {
	mu    sync.Mutex
	rate  rate.Limit
	burst int
	idle  time.Duration
	max   int
	m     map[string]*list.Element // guarded by mu
	lru   list.List                // guarded by mu; of *limEntry, front = most recent
}

type limEntry struct {
	key  string
	lim  *rate.Limiter
	last time.Time
}

func newKeyedLimiter(r rate.Limit, burst, max int) *keyedLimiter {
	l := &keyedLimiter{rate: r, burst: burst, max: max, m: make(map[string]*list.Element)}
	switch {
	case r == rate.Inf:
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

// take takes one token from key's bucket at now. It returns 0 if the token
// was there, or how long until it will be (and takes nothing).
func (l *keyedLimiter) take(key string, now time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	for el := l.lru.Back(); el != nil; el = l.lru.Back() {
		if now.Sub(el.Value.(*limEntry).last) < l.idle {
			break
		}
		l.remove(el)
	}
	var e *limEntry
	if el, ok := l.m[key]; ok {
		e = el.Value.(*limEntry)
		l.lru.MoveToFront(el)
	} else {
		for l.lru.Len() >= l.max {
			l.remove(l.lru.Back())
		}
		e = &limEntry{key: key, lim: rate.NewLimiter(l.rate, l.burst)}
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

func (l *keyedLimiter) remove(el *list.Element) {
	delete(l.m, el.Value.(*limEntry).key)
	l.lru.Remove(el)
}

func (l *keyedLimiter) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}

// rateLimited is the RATE_LIMITED error for a wait of d.
func rateLimited(what string, d time.Duration) *wire.Error {
	ms := uint32(math.MaxUint32)
	if d < time.Duration(math.MaxUint32)*time.Millisecond {
		ms = uint32((d + time.Millisecond - 1) / time.Millisecond)
	}
	e := wire.Errorf(wirepb.ErrorCode_RATE_LIMITED, "relay: too many %s; retry in %d ms", what, ms)
	e.RetryAfterMs = max(ms, 1)
	return e
}

// remoteKey is the rate-limit key of a remote address "ip:port": the IP,
// or for IPv6 its /64 (one host usually holds a whole /64).
func remoteKey(remote string) string {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return remote
	}
	a := ap.Addr().Unmap()
	if a.Is6() {
		if p, err := a.Prefix(64); err == nil {
			return p.String()
		}
	}
	return a.String()
}
