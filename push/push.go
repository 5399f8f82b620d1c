// Package push sends wake-up pushes to devices that are not connected:
// Apple Push Notification service (APNs), Firebase Cloud Messaging (FCM),
// Web Push (RFC 8030 with VAPID, payload encrypted per RFC 8291) and
// UnifiedPush.
//
// A push never carries message content, a sender or a conversation name:
// only a fixed wake-up ({"ferry":"wake"}), after which the device connects
// and reads its inbox over its socket. A push lost anywhere (a full queue,
// a crash, a provider outage) costs only the wake-up: the message is in the
// inbox and is delivered at the next connect.
//
// The parts:
//   - Provider: one push service's API (apns.go, fcm.go, webpush.go,
//     unifiedpush.go).
//   - Store: each device's registration, durably in Pebble (store.go).
//   - Dispatcher: a bounded queue and a fixed set of workers, coalescing
//     (at most one push per device per window), retries with backoff on
//     429/5xx, and removal of registrations a provider reports invalid
//     (dispatcher.go).
package push

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/ferryhq/ferry/wire/wirepb"
)

// Reason says why a device is woken. It picks the push's priority (and for
// APNs its type), never its content.
type Reason uint8

const (
	// ReasonMessage: a new inbox entry. Sent at high priority.
	ReasonMessage Reason = iota
	// ReasonPrekeys: the device's one-time prekeys run low. Sent at normal
	// priority (APNs: a background push).
	ReasonPrekeys
)

func (r Reason) String() string {
	if r == ReasonPrekeys {
		return "prekeys"
	}
	return "message"
}

// Payload is the whole body of every push (before Web Push encryption): a
// constant, so no push can carry content, sender or conversation.
var Payload = []byte(`{"ferry":"wake"}`)

// CollapseID groups pending wake-ups on the provider side (APNs
// apns-collapse-id, FCM collapse_key, Web Push Topic): a phone offline for
// an hour gets one, not dozens.
const CollapseID = "ferry-wake"

// Provider is one push service. Push sends one wake-up to reg and returns
// nil when the service accepted it. Errors: ErrInvalidToken (wrapped) when
// the service says the registration is gone for good; a *StatusError with
// Retryable() for 429/5xx and transport trouble; anything else is a
// permanent failure of this push.
type Provider interface {
	Push(ctx context.Context, reg *wirepb.PushRegistration, r Reason) error
}

// Errors of this package.
var (
	// ErrInvalidToken: the provider reported the token or endpoint invalid
	// (APNs 410 Unregistered or 400 BadDeviceToken, FCM UNREGISTERED or 404,
	// Web Push and UnifiedPush 404/410). The registration is removed.
	ErrInvalidToken = errors.New("push: token no longer valid")
	// ErrNoProvider: the server has no credentials for the registration's kind.
	ErrNoProvider = errors.New("push: no provider configured for this kind")
	// ErrNotFound: the device has no push registration.
	ErrNotFound = errors.New("push: no registration")
	// ErrStopped: the dispatcher was stopped.
	ErrStopped = errors.New("push: stopped")
	// ErrConfig: a provider's configuration or credentials are unusable.
	ErrConfig = errors.New("push: bad configuration")
)

// StatusError is a provider's refusal or a transport failure.
type StatusError struct {
	Kind       wirepb.PushKind
	Status     int           // HTTP status; 0 = no response (transport error)
	Reason     string        // the provider's reason code, if it gave one (e.g. "BadDeviceToken")
	RetryAfter time.Duration // from a Retry-After header; 0 = none
	Invalid    bool          // the token is gone: errors.Is(err, ErrInvalidToken)
	Err        error         // the transport error, for Status 0
}

func (e *StatusError) Error() string {
	msg := fmt.Sprintf("push: %s: status %d", kindName(e.Kind), e.Status)
	if e.Reason != "" {
		msg += " " + e.Reason
	}
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

func (e *StatusError) Unwrap() error { return e.Err }

// Is makes errors.Is(err, ErrInvalidToken) true for invalid tokens.
func (e *StatusError) Is(target error) bool { return target == ErrInvalidToken && e.Invalid }

// Retryable reports whether the same push may succeed later: 429, 5xx, or
// no response at all.
func (e *StatusError) Retryable() bool {
	return !e.Invalid && (e.Status == 0 || e.Status == http.StatusTooManyRequests || e.Status >= 500)
}

// label is the metric label of a failure.
func (e *StatusError) label() string {
	switch {
	case e.Invalid:
		return "invalid_token"
	case e.Status == 0:
		return "transport"
	case e.Status == http.StatusTooManyRequests:
		return "rate_limited"
	case e.Status >= 500:
		return "server_error"
	case e.Status == http.StatusUnauthorized || e.Status == http.StatusForbidden:
		return "auth"
	default:
		return "rejected"
	}
}

// retryAfter parses a Retry-After header: seconds or an HTTP date.
func retryAfter(h string, now time.Time) time.Duration {
	if h == "" {
		return 0
	}
	if n, err := strconv.Atoi(h); err == nil && n >= 0 {
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(h); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

func kindName(k wirepb.PushKind) string {
	switch k {
	case wirepb.PushKind_APNS:
		return "apns"
	case wirepb.PushKind_FCM:
		return "fcm"
	case wirepb.PushKind_WEBPUSH:
		return "webpush"
	case wirepb.PushKind_UNIFIEDPUSH:
		return "unifiedpush"
	}
	return "unknown"
}

// KindName is the lower-case name of a kind (apns, fcm, webpush,
// unifiedpush), as used in metrics, flags and the CLI.
func KindName(k wirepb.PushKind) string { return kindName(k) }

// ParseKind is the inverse of KindName.
func ParseKind(s string) (wirepb.PushKind, bool) {
	for _, k := range []wirepb.PushKind{wirepb.PushKind_APNS, wirepb.PushKind_FCM, wirepb.PushKind_WEBPUSH, wirepb.PushKind_UNIFIEDPUSH} {
		if kindName(k) == s {
			return k, true
		}
	}
	return 0, false
}
