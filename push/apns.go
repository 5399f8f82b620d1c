package push

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/golang-jwt/jwt/v5"
)

// APNs endpoints (Apple's "Sending notification requests to APNs").
const (
	APNsProduction = "https://api.push.apple.com"
	APNsSandbox    = "https://api.sandbox.push.apple.com"
)

// apnsTokenLife is how long one provider token is reused. Apple refuses
// tokens older than an hour and too frequent refreshes (more often than
// every 20 minutes), so 40 minutes sits in between.
const apnsTokenLife = 40 * time.Minute

// APNs speaks Apple's HTTP/2 provider API with token-based authentication:
// each request carries "authorization: bearer" an ES256 JWT with the key id
// (kid) in its header and the team id (iss) and issue time (iat) as claims.
type APNs struct {
	// Key is the .p8 signing key (ParseAPNsKey); KeyID its 10-character id;
	// TeamID the developer team; Topic the app's bundle id.
	Key    *ecdsa.PrivateKey
	KeyID  string
	TeamID string
	Topic  string
	// Endpoint is the API's base URL; "" = APNsProduction.
	Endpoint string
	// Client must speak HTTP/2 (the default one does); nil = a default client.
	Client *http.Client
	// TTL sets apns-expiration; 0 = 1 day.
	TTL time.Duration
	// Now is the clock of the provider token's iat and of apns-expiration;
	// nil = time.Now (test vectors fix it).
	Now func() time.Time

	once   sync.Once
	mu     sync.Mutex
	token  string    // guarded by mu
	issued time.Time // guarded by mu
}

var _ Provider = (*APNs)(nil)

// ParseAPNsKey reads an APNs auth key (.p8: PEM "PRIVATE KEY", PKCS #8, P-256).
func ParseAPNsKey(pemBytes []byte) (*ecdsa.PrivateKey, error) {
	b, _ := pem.Decode(pemBytes)
	if b == nil {
		return nil, fmt.Errorf("%w: APNs key is not PEM", ErrConfig)
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: APNs key: %w", ErrConfig, err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve.Params().Name != "P-256" {
		return nil, fmt.Errorf("%w: APNs key is not a P-256 ECDSA key", ErrConfig)
	}
	return ek, nil
}

// bearer returns a provider token, making a new one when the cached one is
// older than apnsTokenLife (or was refused: see reset).
func (a *APNs) bearer(now time.Time) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.token != "" && now.Sub(a.issued) < apnsTokenLife {
		return a.token, nil
	}
	t := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{"iss": a.TeamID, "iat": now.Unix()})
	t.Header["kid"] = a.KeyID
	s, err := t.SignedString(a.Key)
	if err != nil {
		return "", fmt.Errorf("%w: sign APNs token: %w", ErrConfig, err)
	}
	a.token, a.issued = s, now
	return s, nil
}

func (a *APNs) reset() {
	a.mu.Lock()
	a.token = ""
	a.mu.Unlock()
}

// apnsPayload: a message wakes the app's notification service extension
// (mutable-content with a fixed, localized placeholder alert the app
// replaces after fetching); low prekeys is a silent background push.
func apnsPayload(r Reason) []byte {
	if r == ReasonPrekeys {
		return []byte(`{"aps":{"content-available":1},"ferry":"wake"}`)
	}
	return []byte(`{"aps":{"alert":{"loc-key":"FERRY_WAKE"},"mutable-content":1},"ferry":"wake"}`)
}

// Push implements Provider.
func (a *APNs) Push(ctx context.Context, reg *wirepb.PushRegistration, r Reason) error {
	a.once.Do(func() {
		if a.Client == nil {
			a.Client = defaultClient()
		}
		if a.Endpoint == "" {
			a.Endpoint = APNsProduction
		}
	})
	now := time.Now()
	if a.Now != nil {
		now = a.Now()
	}
	tok, err := a.bearer(now)
	if err != nil {
		return err
	}
	req, err := http.NewRequest(http.MethodPost, a.Endpoint+"/3/device/"+reg.Token, bytes.NewReader(apnsPayload(r)))
	if err != nil {
		return fmt.Errorf("%w: APNs endpoint: %w", ErrConfig, err)
	}
	req.Header.Set("authorization", "bearer "+tok)
	req.Header.Set("apns-topic", a.Topic)
	req.Header.Set("apns-collapse-id", CollapseID)
	req.Header.Set("apns-expiration", strconv.FormatInt(now.Add(ttlOr(a.TTL)).Unix(), 10))
	if r == ReasonPrekeys {
		req.Header.Set("apns-push-type", "background")
		req.Header.Set("apns-priority", "5") // Apple requires 5 for background pushes
	} else {
		req.Header.Set("apns-push-type", "alert")
		req.Header.Set("apns-priority", "10")
	}
	req.Header.Set("content-type", "application/json")
	resp, body, err := do(ctx, a.Client, wirepb.PushKind_APNS, req)
	if err != nil {
		return err
	}
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	var e struct {
		Reason string `json:"reason"`
	}
	_ = json.Unmarshal(body, &e)
	invalid := resp.StatusCode == http.StatusGone ||
		(resp.StatusCode == http.StatusBadRequest && (e.Reason == "BadDeviceToken" || e.Reason == "DeviceTokenNotForTopic"))
	if resp.StatusCode == http.StatusForbidden && (e.Reason == "ExpiredProviderToken" || e.Reason == "InvalidProviderToken") {
		a.reset()
	}
	return statusErr(wirepb.PushKind_APNS, resp, e.Reason, invalid)
}
