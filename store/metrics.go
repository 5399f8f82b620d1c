package store

import (
	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Collector exposes the Pebble health an on-call engineer needs (see
// docs/operations.md) from db.Metrics(), read on each scrape: WAL fsync
// latency, compaction debt, read amplification, and disk use. Register it
// with the node's registry; it must not be scraped after db is closed.
func Collector(db *pebble.DB) prometheus.Collector { return &collector{db: db} }

type collector struct{ db *pebble.DB }

var (
	descFsync = prometheus.NewDesc("ferry_store_wal_fsync_seconds",
		"Latency of the WAL fsyncs Pebble made (every synced commit waits for one).", nil, nil)
	descDebt = prometheus.NewDesc("ferry_store_compaction_debt_bytes",
		"Pebble's estimate of the bytes compactions must rewrite to bring the LSM into shape.", nil, nil)
	descCompacting = prometheus.NewDesc("ferry_store_compactions_in_progress",
		"Compactions running now.", nil, nil)
	descReadAmp = prometheus.NewDesc("ferry_store_read_amplification",
		"Sublevels a point read may have to consult (L0 sublevels plus non-empty lower levels).", nil, nil)
	descL0 = prometheus.NewDesc("ferry_store_l0_sublevels",
		"L0 sublevels; Pebble slows writes down as this grows.", nil, nil)
	descDisk = prometheus.NewDesc("ferry_store_disk_usage_bytes",
		"Bytes of the database's files on disk (tables, WAL, manifest).", nil, nil)
	descWAL = prometheus.NewDesc("ferry_store_wal_bytes",
		"Bytes of live WAL files.", nil, nil)
)

// fsyncBounds are the bucket bounds (seconds) reported of Pebble's ~100
// fsync buckets: each is replaced by the first Pebble bound at or above it.
var fsyncBounds = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descFsync, descDebt, descCompacting, descReadAmp, descL0, descDisk, descWAL} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	m := c.db.Metrics()
	ch <- prometheus.MustNewConstMetric(descDebt, prometheus.GaugeValue, float64(m.Compact.EstimatedDebt))
	ch <- prometheus.MustNewConstMetric(descCompacting, prometheus.GaugeValue, float64(m.Compact.NumInProgress))
	ch <- prometheus.MustNewConstMetric(descReadAmp, prometheus.GaugeValue, float64(m.ReadAmp()))
	ch <- prometheus.MustNewConstMetric(descL0, prometheus.GaugeValue, float64(m.Levels[0].Sublevels))
	ch <- prometheus.MustNewConstMetric(descDisk, prometheus.GaugeValue, float64(m.DiskSpaceUsage()))
	ch <- prometheus.MustNewConstMetric(descWAL, prometheus.GaugeValue, float64(m.WAL.PhysicalSize))
	if h := m.LogWriter.FsyncLatency; h != nil {
		var pb dto.Metric
		if err := h.Write(&pb); err == nil && pb.Histogram != nil {
			ch <- fsyncHistogram(pb.Histogram)
		}
	}
}

// fsyncHistogram converts Pebble's fsync histogram (nanoseconds, ~100
// buckets) into seconds with the fsyncBounds buckets.
func fsyncHistogram(h *dto.Histogram) prometheus.Metric {
	const ns = 1e9
	buckets := make(map[float64]uint64, len(fsyncBounds))
	bs := h.GetBucket()
	j := 0
	for _, want := range fsyncBounds {
		for j < len(bs) && bs[j].GetUpperBound()/ns < want {
			j++
		}
		if j == len(bs) {
			break
		}
		buckets[bs[j].GetUpperBound()/ns] = bs[j].GetCumulativeCount()
	}
	return prometheus.MustNewConstHistogram(descFsync, h.GetSampleCount(), h.GetSampleSum()/ns, buckets)
}
