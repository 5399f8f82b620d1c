package cluster

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ferryhq/ferry/internal/redistest"
)

func TestLeaseAcquireRenewExpireTakeover(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	l := NewLeases(testClient(t, srv), "")
	a, b := Holder{"a", "i1"}, Holder{"b", "i1"}
	const ttl = time.Second // renewals below tolerate a stall of most of it

	e1, err := l.Acquire(ctx, 0, a, ttl, 0)
	if err != nil || e1 != 1 {
		t.Fatalf("first acquire = %d, %v; want epoch 1", e1, err)
	}
	// Acquire by the holder is a renewal: same epoch.
	if e, err := l.Acquire(ctx, 0, a, ttl, 0); err != nil || e != e1 {
		t.Fatalf("re-acquire by holder = %d, %v; want %d", e, err, e1)
	}
	// Another node is refused while the lease lives, and told who holds it.
	_, err = l.Acquire(ctx, 0, b, ttl, 0)
	var held *HeldError
	if !errors.As(err, &held) || held.Lease.Node != "a" || held.Lease.Epoch != e1 || held.Lease.TTL <= 0 {
		t.Fatalf("acquire by b = %v, want HeldError naming a at %d", err, e1)
	}
	// Renewals keep it past its first TTL.
	for range 5 {
		time.Sleep(ttl / 4)
		if err := l.Renew(ctx, 0, a, e1, ttl); err != nil {
			t.Fatalf("renew: %v", err)
		}
	}
	if _, err := l.Acquire(ctx, 0, b, ttl, 0); !errors.Is(err, ErrHeld) {
		t.Fatalf("acquire by b after renewals = %v, want ErrHeld", err)
	}
	// b cannot renew or release a's lease.
	if err := l.Renew(ctx, 0, b, e1, ttl); !errors.Is(err, ErrLost) {
		t.Fatalf("renew by b = %v, want ErrLost", err)
	}
	if err := l.Release(ctx, 0, b, e1); !errors.Is(err, ErrLost) {
		t.Fatalf("release by b = %v, want ErrLost", err)
	}

	// Without renewals it expires, and b takes over with a higher epoch.
	leaseGone(t, l, 0)
	e2, err := l.Acquire(ctx, 0, b, ttl, 0)
	if err != nil || e2 != e1+1 {
		t.Fatalf("takeover by b = %d, %v; want epoch %d", e2, err, e1+1)
	}
	if err := l.Renew(ctx, 0, a, e1, ttl); !errors.Is(err, ErrLost) {
		t.Fatalf("renew by the old holder = %v, want ErrLost", err)
	}
	got, ok, epoch, err := l.Get(ctx, 0)
	if err != nil || !ok || got.Node != "b" || got.Epoch != e2 || epoch != e2 {
		t.Fatalf("Get = %+v, %v, %d, %v", got, ok, epoch, err)
	}

	// Release lets a in at once, again with a new epoch.
	if err := l.Release(ctx, 0, b, e2); err != nil {
		t.Fatal(err)
	}
	if e3, err := l.Acquire(ctx, 0, a, ttl, 0); err != nil || e3 != e2+1 {
		t.Fatalf("acquire after release = %d, %v; want %d", e3, err, e2+1)
	}

	// The same node with a new instance (a restart) takes over at once.
	a2 := Holder{"a", "i2"}
	if e4, err := l.Acquire(ctx, 0, a2, ttl, 0); err != nil || e4 != e2+2 {
		t.Fatalf("acquire by a restarted = %d, %v; want %d", e4, err, e2+2)
	}
}

func TestLeaseFloorAndFresh(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	l := NewLeases(testClient(t, srv), "")
	a := Holder{"a", "i"}
	// A floor above Redis's counter wins: max(stored, floor) + 1.
	if e, err := l.Acquire(ctx, 1, a, time.Second, 41); err != nil || e != 42 {
		t.Fatalf("acquire with floor 41 = %d, %v; want 42", e, err)
	}
	// A floor below it does not pull it back.
	if err := l.Release(ctx, 1, a, 42); err != nil {
		t.Fatal(err)
	}
	if e, err := l.Acquire(ctx, 1, a, time.Second, 3); err != nil || e != 43 {
		t.Fatalf("acquire with floor 3 = %d, %v; want 43", e, err)
	}
	// A fresh claim of a shard owned before is refused even when free.
	if err := l.Release(ctx, 1, a, 43); err != nil {
		t.Fatal(err)
	}
	if e, err := l.ClaimFresh(ctx, 1, a, time.Second, 0); !errors.Is(err, ErrNotFresh) || e != 43 {
		t.Fatalf("fresh claim of an owned-before shard = %d, %v; want ErrNotFresh at 43", e, err)
	}
	if e, err := l.ClaimFresh(ctx, 2, a, time.Second, 0); err != nil || e != 1 {
		t.Fatalf("fresh claim of a new shard = %d, %v", e, err)
	}
}

// TestLeaseRace: many holders racing for the same shards; exactly one
// wins each, and every loser is told the winner.
func TestLeaseRace(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	l := NewLeases(testClient(t, srv), "")
	const racers, shards = 8, 32
	var mu sync.Mutex
	winners := map[ShardID][]string{}
	var wg sync.WaitGroup
	for r := range racers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := Holder{fmt.Sprintf("n%d", r), "i"}
			for s := range ShardID(shards) {
				_, err := l.Acquire(ctx, s, h, 10*time.Second, 0)
				var held *HeldError
				switch {
				case err == nil:
					mu.Lock()
					winners[s] = append(winners[s], h.Node)
					mu.Unlock()
				case errors.As(err, &held):
				default:
					t.Errorf("acquire: %v", err)
				}
			}
		}()
	}
	wg.Wait()
	for s := range ShardID(shards) {
		w := winners[s]
		if len(w) != 1 {
			t.Fatalf("shard %d: winners %v, want exactly one", s, w)
		}
		got, ok, epoch, err := l.Get(ctx, s)
		if err != nil || !ok || got.Node != w[0] || got.Epoch != 1 || epoch != 1 {
			t.Fatalf("shard %d in redis: %+v %v %d %v; winner %s at epoch 1", s, got, ok, epoch, err, w[0])
		}
	}
}
