package push

import (
	"bytes"
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/ferryhq/ferry/wire/wirepb"
)

// UnifiedPush POSTs the wake-up to the endpoint the device's distributor
// gave it (https://unifiedpush.org/developers/spec/server/). The endpoint
// is the device's; the body is the constant Payload.
type UnifiedPush struct {
	// Client for the endpoints; nil = EndpointClient(false).
	Client *http.Client
	// TTL is sent in the TTL header (RFC 8030 §5.2); 0 = 1 day.
	TTL time.Duration
}

var _ Provider = (*UnifiedPush)(nil)

// Push implements Provider.
func (u *UnifiedPush) Push(ctx context.Context, reg *wirepb.PushRegistration, r Reason) error {
	c := u.Client
	if c == nil {
		c = EndpointClient(false)
	}
	req, err := http.NewRequest(http.MethodPost, reg.Endpoint, bytes.NewReader(Payload))
	if err != nil {
		return &StatusError{Kind: wirepb.PushKind_UNIFIEDPUSH, Status: 400, Reason: "bad endpoint", Invalid: true}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("TTL", strconv.Itoa(int(ttlOr(u.TTL).Seconds())))
	req.Header.Set("Urgency", urgency(r))
	req.Header.Set("Topic", CollapseID)
	resp, _, err := do(ctx, c, wirepb.PushKind_UNIFIEDPUSH, req)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 == 2 {
		return nil
	}
	gone := resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone
	return statusErr(wirepb.PushKind_UNIFIEDPUSH, resp, "", gone)
}

func ttlOr(d time.Duration) time.Duration {
	if d <= 0 {
		return 24 * time.Hour
	}
	return d
}

// urgency is the RFC 8030 Urgency of a wake-up.
func urgency(r Reason) string {
	if r == ReasonPrekeys {
		return "normal"
	}
	return "high"
}
