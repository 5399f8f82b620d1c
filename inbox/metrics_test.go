package inbox

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestDepthSampledBySweep: the depth gauges and the oldest-entry age come
// from the expiry sweep, not from a scan on scrape.
func TestDepthSampledBySweep(t *testing.T) {
	reg := prometheus.NewRegistry()
	clk := newClock()
	s, _ := newStore(t, Options{Registerer: reg, Now: clk.Now, TTL: time.Hour})
	mustAppend(t, s, send(alice1, "m1", "c", "one", bob1, bob2))
	clk.Set(10 * time.Minute)
	mustAppend(t, s, send(alice1, "m2", "c", "two", bob1))
	mustAppend(t, s, send(alice1, "m3", "c", "three", bob1))

	if got := testutil.ToFloat64(s.m.depthEntries); got != 0 {
		t.Fatalf("entries before a sweep = %v, want 0 (not computed on scrape)", got)
	}
	clk.Set(65 * time.Minute) // m1 (at 0) has expired; m2, m3 (at 10 min) have not
	if _, err := s.ExpireNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(s.m.oldestAge); got != 55*60 {
		t.Errorf("oldest age = %v s, want 3300 (m2, stored 55 min ago)", got)
	}
	if got := testutil.ToFloat64(s.m.depthMax); got != 3 {
		t.Errorf("max device depth = %v, want 3 (bob1 before this sweep's deletions)", got)
	}
	if got := testutil.ToFloat64(s.m.depthEntries); got != 4 {
		t.Errorf("entries = %v, want 4 (the metas the sweep read)", got)
	}
	if _, err := s.ExpireNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(s.m.depthEntries); got != 2 {
		t.Errorf("entries after a second sweep = %v, want 2", got)
	}
}
