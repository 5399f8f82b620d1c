package inbox

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics of a Store. They always exist; with a nil Registerer they are
// simply not registered.
type metrics struct {
	groupOps      prometheus.Histogram
	commitSeconds *prometheus.HistogramVec // label sync: "true" | "false"
	appended      prometheus.Counter
	acked         prometheus.Counter
	expired       prometheus.Counter
	rejected      *prometheus.CounterVec // label reason: "inbox_full" | "duplicate"
	bodiesStored  prometheus.Counter
	bodiesDeleted prometheus.Counter
	fanQueued     prometheus.Counter
	fanEntries    prometheus.Counter
	fanPending    prometheus.Gauge

	// sampled by each expiry sweep (expire.go), not computed on scrape
	depthEntries, depthBytes, depthMax prometheus.Gauge
	oldestMs                           atomic.Int64 // server time of the oldest live entry (0: none)
	oldestAge                          prometheus.GaugeFunc

	// children of the vectors, resolved once
	commitSync                prometheus.Observer
	rejectedFull, rejectedDup prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, now func() time.Time) (*metrics, error) {
	const ns, sub = "ferry", "inbox"
	m := &metrics{
		depthEntries: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "entries",
			Help: "Entries held in all inboxes, as of the last expiry sweep.",
		}),
		depthBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "bytes",
			Help: "Bytes held in all inboxes (as quotas count them), as of the last expiry sweep.",
		}),
		depthMax: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "max_device_depth",
			Help: "Entries in the deepest single device inbox, as of the last expiry sweep.",
		}),
		groupOps: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "commit_group_ops",
			Help:    "Ops applied in one commit group (one Pebble batch).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 11), // 1 .. 1024
		}),
		commitSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "commit_duration_seconds",
			Help:    "Time to commit one group, including the fsync when sync is true.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16), // 50µs .. 1.6s
		}, []string{"sync"}),
		appended: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "appended_entries_total",
			Help: "Entries committed to inboxes (messages and receipts).",
		}),
		acked: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "acked_entries_total",
			Help: "Entries deleted by acks.",
		}),
		expired: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "expired_entries_total",
			Help: "Entries deleted by the expiry sweep.",
		}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "rejected_sends_total",
			Help: "Appends that stored nothing, by reason.",
		}, []string{"reason"}),
		bodiesStored: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "group_bodies_stored_total",
			Help: "Shared group envelope bodies stored (one per group message or membership update).",
		}),
		bodiesDeleted: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "group_bodies_deleted_total",
			Help: "Shared group envelope bodies deleted after their last reference went (stored minus deleted is what is held).",
		}),
		fanQueued: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "fanout_jobs_queued_total",
			Help: "Large group appends committed as fan-out jobs (expanded after the sender's ack).",
		}),
		fanEntries: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "fanout_entries_total",
			Help: "Inbox entries written by fan-out job expansion.",
		}),
		fanPending: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "fanout_pending_entries",
			Help: "Entries queued fan-out jobs have still to write.",
		}),
	}
	m.oldestAge = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: ns, Subsystem: sub, Name: "oldest_entry_age_seconds",
		Help: "Age of the oldest live inbox entry found by the last expiry sweep (0: none).",
	}, func() float64 {
		t := m.oldestMs.Load()
		if t == 0 {
			return 0
		}
		return max(0, float64(now().UnixMilli()-t)/1000)
	})
	m.commitSync = m.commitSeconds.WithLabelValues("true")
	m.rejectedFull = m.rejected.WithLabelValues("inbox_full")
	m.rejectedDup = m.rejected.WithLabelValues("duplicate")
	if reg == nil {
		return m, nil
	}
	var errs []error
	for _, c := range []prometheus.Collector{m.groupOps, m.commitSeconds, m.appended, m.acked, m.expired, m.rejected, m.bodiesStored, m.bodiesDeleted, m.fanQueued, m.fanEntries, m.fanPending,
		m.depthEntries, m.depthBytes, m.depthMax, m.oldestAge} {
		errs = append(errs, reg.Register(c))
	}
	return m, errors.Join(errs...)
}
