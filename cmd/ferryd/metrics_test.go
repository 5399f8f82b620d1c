package main

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferryhq/ferry/wire/wirepb"
)

// TestBlackBoxMetricsForOnCall scrapes a real ferryd's /metrics and finds
// every series docs/operations.md pages on: connections, send→✓ and
// send→deliver latency, inbox depth and oldest-entry age (sampled by the
// expiry sweep), push outcomes, presence fan-out, Pebble WAL fsync latency
// and compaction debt, and rejections by reason.
func TestBlackBoxMetricsForOnCall(t *testing.T) {
	srv := startServer(t, t.TempDir(), "--inbox-sweep-interval", "50ms")
	sender := newCrashDevice(t, srv, "msender")
	rcpt := newCrashDevice(t, srv, "mrcpt")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	sc, err := sender.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	if _, err := sc.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
		ClientMsgId: "m1", To: rcpt.name, Ciphertexts: []*wirepb.DeviceCiphertext{{Username: rcpt.name, DeviceId: 1,
			RegistrationId: rcpt.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("ciphertext")}}}}}); err != nil {
		t.Fatal(err)
	}
	// The recipient is offline: a sweep finds one entry in its inbox.
	m := awaitMetrics(t, srv, func(m metricsText) bool { return m.value("ferry_inbox_entries") == 1 })
	if age := m.value("ferry_inbox_oldest_entry_age_seconds"); age <= 0 {
		t.Errorf("oldest entry age = %v, want > 0 with an entry waiting", age)
	}
	if got := m.value("ferry_relay_send_ack_seconds_count"); got != 1 {
		t.Errorf("send→✓ samples = %v, want 1", got)
	}

	rc, err := rcpt.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	for ev := range rc.Events() { // other events (prekeys low) may come first
		if ev.GetEnvelope() != nil {
			break
		}
	}
	// A plain GET on the WebSocket path is rejected (reason "upgrade").
	if resp, err := http.Get("http://" + srv.addr + "/v1/ws"); err == nil {
		resp.Body.Close()
	}
	m = awaitMetrics(t, srv, func(m metricsText) bool {
		return m.value("ferry_relay_send_deliver_seconds_count") >= 1 && m.value("ferry_relay_connections") == 2
	})
	for _, name := range []string{
		"ferry_relay_connections",
		"ferry_relay_send_ack_seconds_bucket",
		"ferry_relay_send_deliver_seconds_bucket",
		"ferry_inbox_entries",
		"ferry_inbox_max_device_depth",
		"ferry_inbox_oldest_entry_age_seconds",
		`ferry_push_sent_total{kind="unifiedpush"}`,
		"ferry_push_dropped_total",
		"ferry_presence_events_total",
		"ferry_presence_events_dropped_total",
		"ferry_store_wal_fsync_seconds_bucket",
		"ferry_store_compaction_debt_bytes",
		"ferry_store_l0_sublevels",
		`ferry_relay_rejected_total{reason="upgrade"}`,
		"ferry_inbox_commit_duration_seconds_bucket",
	} {
		if !m.has(name) {
			t.Errorf("/metrics has no %s", name)
		}
	}
	if got := m.value("ferry_store_wal_fsync_seconds_count"); got < 1 {
		t.Errorf("WAL fsyncs = %v, want >= 1 after a synced send", got)
	}
}

// metricsText is one scrape in the text exposition format.
type metricsText string

// has reports whether a sample line starts with name (which may include
// labels).
func (m metricsText) has(name string) bool {
	for _, l := range strings.Split(string(m), "\n") {
		if strings.HasPrefix(l, name+" ") || strings.HasPrefix(l, name+"{") ||
			strings.HasSuffix(name, "}") && strings.HasPrefix(l, name[:len(name)-1]) {
			return true
		}
	}
	return false
}

// value is the value of the unlabelled sample name (-1: absent).
func (m metricsText) value(name string) float64 {
	for _, l := range strings.Split(string(m), "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

func scrape(t *testing.T, srv *server) metricsText {
	t.Helper()
	resp, err := http.Get("http://" + srv.addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return metricsText(b)
}

// awaitMetrics scrapes until ok holds (polling with a deadline).
func awaitMetrics(t *testing.T, srv *server, ok func(metricsText) bool) metricsText {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		m := scrape(t, srv)
		if ok(m) {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics never reached the expected state:\n%s", m)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
