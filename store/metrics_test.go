package store

import (
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"
)

func fsyncSamples(mfs []*dto.MetricFamily) uint64 {
	for _, mf := range mfs {
		if mf.GetName() == "ferry_store_wal_fsync_seconds" {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	return 0
}

func TestCollector(t *testing.T) {
	db, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for i := range 3 {
		if err := db.Set([]byte{'z', byte(i)}, []byte("v"), pebble.Sync); err != nil {
			t.Fatal(err)
		}
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(Collector(db))
	// Pebble's WAL writer records an fsync's latency just after waking the
	// writers it synced for, so the last sample may land a moment after
	// Set returns: gather until it is there (or give up after 5 s).
	var mfs []*dto.MetricFamily
	for deadline := time.Now().Add(5 * time.Second); ; {
		mfs, err = reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		if fsyncSamples(mfs) >= 3 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond) // polling Pebble's metrics: no event to await
	}
	got := map[string]bool{}
	for _, mf := range mfs {
		got[mf.GetName()] = true
		if mf.GetName() == "ferry_store_wal_fsync_seconds" {
			h := mf.GetMetric()[0].GetHistogram()
			if h.GetSampleCount() < 3 {
				t.Errorf("fsync samples = %d, want >= 3 (three synced writes)", h.GetSampleCount())
			}
			if n := len(h.GetBucket()); n < 5 || n > len(fsyncBounds) {
				t.Errorf("fsync buckets = %d, want a handful (<= %d)", n, len(fsyncBounds))
			}
		}
	}
	for _, name := range []string{"ferry_store_wal_fsync_seconds", "ferry_store_compaction_debt_bytes",
		"ferry_store_read_amplification", "ferry_store_disk_usage_bytes", "ferry_store_wal_bytes"} {
		if !got[name] {
			t.Errorf("%s not collected", name)
		}
	}
}
