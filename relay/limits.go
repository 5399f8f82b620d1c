package relay

import (
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
)

// Limit names: the "limit" label of ferry_relay_limit_rejections_total, a
// fixed set (docs/security.md, "Limits", says what each one bounds).
const (
	limitFrameSize       = "frame_size"        // FRAME_TOO_LARGE, or close 1009 over 4x
	limitMessageSize     = "message_size"      // MESSAGE_TOO_LARGE
	limitSendRate        = "send_rate"         // Send + GroupSend + SyncToDevice per device
	limitClaimRate       = "claim_rate"        // ClaimBundles per requesting device (keys/)
	limitRegisterRate    = "register_rate"     // Register per remote IP
	limitLinkStartRate   = "link_start_rate"   // LinkStart per remote IP, pending link codes
	limitLinkAttemptRate = "link_attempt_rate" // GetLink + ApproveLink per device
	limitConnsPerIP      = "connections_per_ip"
	limitConnRate        = "connection_rate" // new connections per IP
	limitInboxQuota      = "inbox_quota"     // INBOX_FULL: depth or bytes of a recipient device
	limitGroupSize       = "group_size"      // GROUP_FULL
	limitTypingRate      = "typing_rate"
	limitDevices         = "devices_per_account"    // TOO_MANY_DEVICES
	limitPrekeys         = "prekeys"                // TOO_MANY_PREKEYS: per upload or stored
	limitPresenceSubs    = "presence_subscriptions" // TOO_MANY_SUBSCRIPTIONS
)

var allLimits = []string{limitFrameSize, limitMessageSize, limitSendRate, limitClaimRate,
	limitRegisterRate, limitLinkStartRate, limitLinkAttemptRate, limitConnsPerIP, limitConnRate,
	limitInboxQuota, limitGroupSize, limitTypingRate, limitDevices, limitPrekeys, limitPresenceSubs}

func newLimitMetric(reg prometheus.Registerer) *prometheus.CounterVec {
	v := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_relay_limit_rejections_total",
		Help: "Requests, frames and connections refused because a limit was reached, by limit."}, []string{"limit"})
	for _, l := range allLimits {
		v.WithLabelValues(l) // every series exists from the start, at 0
	}
	if reg != nil {
		reg.MustRegister(v)
	}
	return v
}

// limitOf names the limit behind an error answer to a request of kind, or
// "" if the error is not a limit.
func limitOf(kind string, code wirepb.ErrorCode) string {
	switch code {
	case wirepb.ErrorCode_FRAME_TOO_LARGE:
		return limitFrameSize
	case wirepb.ErrorCode_MESSAGE_TOO_LARGE:
		return limitMessageSize
	case wirepb.ErrorCode_INBOX_FULL:
		return limitInboxQuota
	case wirepb.ErrorCode_GROUP_FULL:
		return limitGroupSize
	case wirepb.ErrorCode_TOO_MANY_DEVICES:
		return limitDevices
	case wirepb.ErrorCode_TOO_MANY_PREKEYS:
		return limitPrekeys
	case wirepb.ErrorCode_TOO_MANY_SUBSCRIPTIONS:
		return limitPresenceSubs
	case wirepb.ErrorCode_RATE_LIMITED:
		switch kind {
		case "send", "group_send", "sync_to_device":
			return limitSendRate
		case "claim_bundles":
			return limitClaimRate
		case "register":
			return limitRegisterRate
		case "link_start":
			return limitLinkStartRate
		case "get_link", "approve_link":
			return limitLinkAttemptRate
		case "typing":
			return limitTypingRate
		}
	}
	return ""
}

// sendKind is the request kind of a frame that costs a send token, or "".
func sendKind(f *wirepb.ClientFrame) string {
	switch f.Body.(type) {
	case *wirepb.ClientFrame_Send:
		return "send"
	case *wirepb.ClientFrame_GroupSend:
		return "group_send"
	case *wirepb.ClientFrame_SyncToDevice:
		return "sync_to_device"
	}
	return ""
}

// takeSend takes a token from the device's send bucket (Send, GroupSend
// and SyncToDevice share it).
func (c *conn) takeSend() error {
	if d := c.s.sendLim.Take(c.addr, time.Now()); d > 0 {
		return rateLimited("sends from this device", d)
	}
	return nil
}

// ipConns counts open WebSocket connections per remote IP (per /64 for
// IPv6) so that one address cannot hold every socket of a node.
type ipConns struct {
	max int // <= 0: no limit
	mu  sync.Mutex
	m   map[string]int // guarded by mu: only keys with a count > 0
}

func newIPConns(max int) *ipConns { return &ipConns{max: max, m: make(map[string]int)} }

// acquire counts one more connection from key, or reports false if key is
// at the limit.
func (p *ipConns) acquire(key string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.max > 0 && p.m[key] >= p.max {
		return false
	}
	p.m[key]++
	return true
}

func (p *ipConns) release(key string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m[key]--; p.m[key] <= 0 {
		delete(p.m, key)
	}
}

// refuseTooMany answers an upgrade over a per-IP connection limit: HTTP
// 429 with Retry-After (whole seconds, at least 1), before any WebSocket
// handshake.
func (s *Server) refuseTooMany(w http.ResponseWriter, limit string, wait time.Duration) {
	s.metrics.rejected.WithLabelValues(limit).Inc()
	s.metrics.limits.WithLabelValues(limit).Inc()
	secs := int64(3600)
	if wait < time.Hour {
		secs = int64((wait + time.Second - 1) / time.Second)
	}
	w.Header().Set("Retry-After", strconv.FormatInt(max(secs, 1), 10))
	http.Error(w, "too many connections from this address", http.StatusTooManyRequests)
}
