package ratelimit

import (
	"fmt"
	"testing"
	"time"

	"github.com/ferryhq/ferry/wire"
	"golang.org/x/time/rate"
)

func addr(i int) wire.DeviceAddr { return wire.DeviceAddr{Account: fmt.Sprintf("u%d", i), Device: 1} }

// TestLimitersBounded: the map never holds more than max entries, and
// entries idle long enough to be full again are dropped.
func TestLimitersBounded(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	l := New[wire.DeviceAddr](rate.Limit(5), 20, 100)
	if l.idle != 4*time.Second {
		t.Fatalf("idle = %v, want 4s", l.idle)
	}
	for i := range 1000 {
		l.Take(addr(i), t0.Add(time.Duration(i)*time.Millisecond))
		if n := l.Len(); n > 100 {
			t.Fatalf("%d entries after %d requesters, max 100", n, i+1)
		}
	}
	// Long after, one call sweeps every idle entry.
	l.Take(addr(-1), t0.Add(time.Hour))
	if n := l.Len(); n != 1 {
		t.Fatalf("%d entries after the idle sweep, want 1", n)
	}
}

// TestLimitersSweepIsLossless: an entry is swept only once its bucket would
// be full again, so a requester that used up its burst stays limited.
func TestLimitersSweepIsLossless(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	l := New[wire.DeviceAddr](rate.Limit(1), 3, 1000)
	a := addr(1)
	for i := range 3 {
		if d := l.Take(a, t0); d != 0 {
			t.Fatalf("take %d refused", i)
		}
	}
	if d := l.Take(a, t0); d != time.Second {
		t.Fatalf("delay %v, want 1s", d)
	}
	// Other requesters' traffic triggers sweeps; a's entry must survive them
	// while its bucket is still refilling.
	for i := range 50 {
		l.Take(addr(100+i), t0.Add(time.Duration(i)*10*time.Millisecond))
	}
	if d := l.Take(a, t0.Add(500*time.Millisecond)); d == 0 {
		t.Fatal("limit reset by a sweep")
	}
	// After idle (3 s) it may be swept, and a fresh bucket is what it would have had.
	later := t0.Add(l.idle + time.Second)
	l.Take(addr(999), later)
	for i := range 3 {
		if d := l.Take(a, later); d != 0 {
			t.Fatalf("take %d after refill refused (%v)", i, d)
		}
	}
}

func TestLimitersInf(t *testing.T) {
	l := New[wire.DeviceAddr](rate.Inf, 1, 10)
	now := time.Now()
	for i := range 100 {
		if d := l.Take(addr(i%3), now); d != 0 {
			t.Fatalf("rate.Inf refused (%v)", d)
		}
	}
}
