package relay

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	conns    prometheus.Gauge
	authed   prometheus.Gauge
	requests *prometheus.CounterVec // by request type and result code
	rejected *prometheus.CounterVec // by reason
	closes   *prometheus.CounterVec // by close code name
	sendAck  prometheus.Histogram   // Send received -> ✓ written to the queue
	// envelope server time -> written to the recipient's socket
	sendDeliver prometheus.Histogram
	delivered   prometheus.Counter
	acked       prometheus.Counter
	receipts    prometheus.Counter
	queueEmpty  prometheus.Counter

	groupUpdates prometheus.Counter   // GROUP_UPDATE entries stored
	groupFanout  prometheus.Histogram // recipient devices per group message
	groupSendAck prometheus.Histogram // GroupSend received -> ✓ queued

	typing *prometheus.CounterVec // typing events per recipient connection: queued / dropped

	limits *prometheus.CounterVec // refusals by limit (limits.go)

	redirects prometheus.Counter // cluster mode: Register/Auth sent to the account's node
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		conns: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ferry_relay_connections",
			Help: "Open WebSocket connections."}),
		authed: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ferry_relay_authenticated_connections",
			Help: "Authenticated connections."}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_relay_requests_total",
			Help: "Requests by type and result code."}, []string{"type", "code"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_relay_rejected_total",
			Help: "Frames or connections rejected, by reason."}, []string{"reason"}),
		closes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_relay_closes_total",
			Help: "Connections closed by the server, by close code."}, []string{"code"}),
		sendAck: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "ferry_relay_send_ack_seconds",
			Help:    "Time from a Send frame read to its ✓ response queued (includes the synced commit).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		sendDeliver: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "ferry_relay_send_deliver_seconds",
			Help: "Time from an envelope's server time (its commit) to its write on a recipient's socket. " +
				"Includes the time a recipient was offline and redeliveries: watch the low buckets.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 21)}), // 1ms .. ~17min
		delivered: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_relay_envelopes_delivered_total",
			Help: "Envelopes written to device connections (redeliveries included)."}),
		acked: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_relay_envelopes_acked_total",
			Help: "Envelopes deleted by device acks."}),
		receipts: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_relay_receipts_total",
			Help: "Receipt markers offered to devices (delivered: per acked message, before the inbox coalesces them; read: as written)."}),
		queueEmpty: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_relay_queue_empty_total",
			Help: "QueueEmpty events sent."}),
		groupUpdates: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_relay_group_updates_total",
			Help: "GROUP_UPDATE envelopes stored (one per device told of a membership change)."}),
		groupFanout: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "ferry_relay_group_fanout_devices",
			Help:    "Recipient devices of one group message.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 14)}), // 1 .. 8192
		groupSendAck: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "ferry_relay_group_send_ack_seconds",
			Help:    "Time from a GroupSend frame read to its ✓ response queued (membership check and synced commit for every recipient device included).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		typing: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_relay_typing_events_total",
			Help: "Typing events to connected recipient devices: queued, or dropped on a full queue."}, []string{"result"}),
	}
	m.limits = newLimitMetric(reg)
	m.redirects = prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_relay_redirects_total",
		Help: "Cluster mode: Register or Auth answered WRONG_NODE with the owner's address."})
	if reg != nil {
		reg.MustRegister(m.conns, m.authed, m.requests, m.rejected, m.closes, m.sendAck, m.sendDeliver,
			m.delivered, m.acked, m.receipts, m.queueEmpty, m.groupUpdates, m.groupFanout, m.groupSendAck, m.typing, m.redirects)
	}
	return m
}
