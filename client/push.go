package client

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/ferryhq/ferry/wire/wirepb"
)

// ErrBadSubscription: a Web Push subscription that is not a browser
// PushSubscription's JSON.
var ErrBadSubscription = errors.New("client: bad web push subscription")

// SetPush registers this device's push target with the server, replacing
// any earlier one. The server then sends it content-free wake-ups while
// the device is offline (see docs/protocol.md, "Push wake-ups").
func (c *Client) SetPush(ctx context.Context, reg *wirepb.PushRegistration) error {
	conn, err := c.connect(ctx, true)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_SetPush{SetPush: &wirepb.SetPush{Registration: reg}}}); err != nil {
		return fmt.Errorf("client: set push: %w", err)
	}
	return nil
}

// ClearPush removes this device's push target from the server.
func (c *Client) ClearPush(ctx context.Context) error {
	conn, err := c.connect(ctx, true)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ClearPush{ClearPush: &wirepb.ClearPush{}}}); err != nil {
		return fmt.Errorf("client: clear push: %w", err)
	}
	return nil
}

// ParseWebPushSubscription reads the JSON of a browser PushSubscription
// ({"endpoint": URL, "keys": {"p256dh": base64url, "auth": base64url}}).
func ParseWebPushSubscription(s string) (*wirepb.PushRegistration, error) {
	var sub struct {
		Endpoint string `json:"endpoint"`
		Keys     struct {
			P256dh string `json:"p256dh"`
			Auth   string `json:"auth"`
		} `json:"keys"`
	}
	if err := json.Unmarshal([]byte(s), &sub); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadSubscription, err)
	}
	p256dh, err1 := decodeB64(sub.Keys.P256dh)
	auth, err2 := decodeB64(sub.Keys.Auth)
	if sub.Endpoint == "" || err1 != nil || err2 != nil || len(p256dh) == 0 || len(auth) == 0 {
		return nil, fmt.Errorf("%w: needs endpoint, keys.p256dh and keys.auth", ErrBadSubscription)
	}
	return &wirepb.PushRegistration{Kind: wirepb.PushKind_WEBPUSH, Endpoint: sub.Endpoint, P256Dh: p256dh, Auth: auth}, nil
}

// decodeB64 accepts base64url (what browsers give) and standard base64,
// padded or not.
func decodeB64(s string) ([]byte, error) {
	s = strings.TrimRight(s, "=")
	if b, err := base64.RawURLEncoding.DecodeString(s); err == nil {
		return b, nil
	}
	return base64.RawStdEncoding.DecodeString(s)
}
