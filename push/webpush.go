package push

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	webpush "github.com/SherClockHolmes/webpush-go"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// webpushRecordSize is the RFC 8188 record size: our payload is tiny, and
// the library pads every message to the record size (4096 by default).
const webpushRecordSize = 256

// WebPush sends RFC 8030 pushes to a browser subscription's endpoint,
// authenticated with VAPID (RFC 8292) and with the payload encrypted to
// the subscription's keys per RFC 8291 (aes128gcm), through
// github.com/SherClockHolmes/webpush-go.
type WebPush struct {
	// VAPIDPublicKey and VAPIDPrivateKey: the server's P-256 key pair,
	// base64url (webpush.GenerateVAPIDKeys); browsers subscribe with the
	// public one as applicationServerKey.
	VAPIDPublicKey  string
	VAPIDPrivateKey string
	// Subscriber is the VAPID "sub" contact: an e-mail address (without
	// "mailto:") or an https URL.
	Subscriber string
	// Client for the endpoints; nil = EndpointClient(false).
	Client *http.Client
	// TTL header; 0 = 1 day.
	TTL time.Duration
}

var _ Provider = (*WebPush)(nil)

// Check reports a missing or malformed VAPID key pair.
func (w *WebPush) Check() error {
	for _, k := range []string{w.VAPIDPublicKey, w.VAPIDPrivateKey} {
		if _, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(k, "=")); err != nil || k == "" {
			return fmt.Errorf("%w: VAPID keys must be base64url", ErrConfig)
		}
	}
	return nil
}

// Push implements Provider.
func (w *WebPush) Push(ctx context.Context, reg *wirepb.PushRegistration, r Reason) error {
	c := w.Client
	if c == nil {
		c = EndpointClient(false)
	}
	sub := &webpush.Subscription{Endpoint: reg.Endpoint, Keys: webpush.Keys{
		P256dh: base64.RawURLEncoding.EncodeToString(reg.P256Dh),
		Auth:   base64.RawURLEncoding.EncodeToString(reg.Auth),
	}}
	resp, err := webpush.SendNotificationWithContext(ctx, Payload, sub, &webpush.Options{
		HTTPClient:      c,
		RecordSize:      webpushRecordSize,
		Subscriber:      strings.TrimPrefix(w.Subscriber, "mailto:"), // the library adds it
		Topic:           CollapseID,
		TTL:             int(ttlOr(w.TTL).Seconds()),
		Urgency:         webpush.Urgency(urgency(r)),
		VAPIDPublicKey:  w.VAPIDPublicKey,
		VAPIDPrivateKey: w.VAPIDPrivateKey,
	})
	if err != nil {
		if ctx.Err() != nil || isTransport(err) {
			return &StatusError{Kind: wirepb.PushKind_WEBPUSH, Err: err}
		}
		return fmt.Errorf("push: webpush: %w", err) // bad keys: permanent
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxResponseBody))
	if resp.StatusCode/100 == 2 {
		return nil
	}
	gone := resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone
	return statusErr(wirepb.PushKind_WEBPUSH, resp, "", gone)
}

// isTransport reports whether err came from the HTTP client (the request
// was made) rather than from building the message.
func isTransport(err error) bool {
	var ue *url.Error
	return errors.As(err, &ue)
}
