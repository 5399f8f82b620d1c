package testvectors

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/ferryhq/ferry/push"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/oauth2"
)

// KindPush is the kind of push payload vectors.
const KindPush = "push"

// Verdicts of push vectors besides "valid" (the provider accepted the
// wake-up). The first three are what the dispatcher does with the
// provider's answer; the last two say the file is wrong.
const (
	// PushInvalidToken: the provider says the token or endpoint is gone;
	// the dispatcher removes the registration (push.ErrInvalidToken).
	PushInvalidToken = "ErrInvalidToken"
	// PushRetry: 429, 5xx: the dispatcher tries again later, not before
	// retry_after_ms.
	PushRetry = "retry"
	// PushRejected: any other refusal: this wake-up is lost, the
	// registration stays.
	PushRejected = "rejected"
	// ErrRequestMismatch: the provider code sends another request than the
	// vector records.
	ErrRequestMismatch = "ErrRequestMismatch"
	// ErrPayloadNotWake: the recorded Web Push body does not decrypt, with
	// the subscription's keys, to exactly push.Payload.
	ErrPayloadNotWake = "ErrPayloadNotWake"
)

func init() {
	families = append(families, family{kind: KindPush,
		verdict: []string{PushInvalidToken, PushRetry, PushRejected, ErrRequestMismatch, ErrPayloadNotWake},
		gen:     pushVectors, decode: func() vector { return &PushVector{} }})
}

// jwtPlaceholder stands for the JWT inside a recorded Authorization header;
// the vector's "jwt" says what it must hold.
const jwtPlaceholder = "{jwt}"

// PushVector is exactly what one provider receives for one wake-up. A
// verifier builds the provider of package push from config (clock fixed at
// now_ms, crypto/rand replaced by the stream of seed), has it send the
// wake-up for reason to registration (after push.Normalize, as the server
// does when a device registers) through an HTTP client that hands every
// request to a local httptest server, and compares what that server
// received with request: method, URL, every header, the body byte for
// byte. The server answers with response; the provider's error decides the
// verdict (valid, ErrInvalidToken, retry, rejected).
//
// The one part that is not fixed is an ECDSA signature: the APNs provider
// token and the Web Push VAPID token are ES256 JWTs, and ECDSA signatures
// are randomized (Go 1.26 takes the randomness from the system whatever
// crypto/rand.Reader is). Authorization holds "{jwt}" in their place and
// jwt gives the token's header and claims exactly, and the public key its
// signature must verify with. webpush-go also sets the VAPID "exp" from
// the wall clock: wall_clock says so (exp = the time of sending + 12 h).
type PushVector struct {
	Header
	Provider     string     `json:"provider"` // apns, fcm, webpush, unifiedpush
	Reason       string     `json:"reason"`   // message (new inbox entry) or prekeys (one-time prekeys low)
	NowMs        int64      `json:"now_ms"`
	Seed         uint64     `json:"seed"`
	Config       PushConfig `json:"config"`
	Registration PushReg    `json:"registration"`
	// SubscriptionPrivateKey (webpush): the browser's P-256 private key
	// of the subscription, to decrypt the body with.
	SubscriptionPrivateKey Hex          `json:"subscription_private_key,omitempty"`
	Request                PushRequest  `json:"request"`
	Plaintext              string       `json:"plaintext,omitempty"` // webpush: what the body decrypts to (RFC 8291)
	Response               PushResponse `json:"response"`
	RetryAfterMs           int64        `json:"retry_after_ms,omitempty"` // retry: the delay the provider asked for

	got struct { // set by Check
		err error
	}
}

// PushConfig is the server's provider configuration (test credentials).
type PushConfig struct {
	Endpoint        string `json:"endpoint,omitempty"`          // apns, fcm: the API's base URL
	APNsKey         Hex    `json:"apns_key,omitempty"`          // apns: the .p8 key's P-256 private scalar
	KeyID           string `json:"key_id,omitempty"`            // apns
	TeamID          string `json:"team_id,omitempty"`           // apns
	Topic           string `json:"topic,omitempty"`             // apns: the app's bundle id
	ProjectID       string `json:"project_id,omitempty"`        // fcm
	AccessToken     string `json:"access_token,omitempty"`      // fcm: the OAuth2 token the token source hands out
	VAPIDPublicKey  string `json:"vapid_public_key,omitempty"`  // webpush: base64url, uncompressed point
	VAPIDPrivateKey string `json:"vapid_private_key,omitempty"` // webpush: base64url scalar
	Subscriber      string `json:"subscriber,omitempty"`        // webpush: VAPID sub
	TTLSeconds      int64  `json:"ttl_s"`
}

// PushReg is the wirepb.PushRegistration the device sent.
type PushReg struct {
	Kind     string `json:"kind"` // APNS, FCM, WEBPUSH, UNIFIEDPUSH
	Token    string `json:"token,omitempty"`
	Endpoint string `json:"endpoint,omitempty"`
	P256dh   Hex    `json:"p256dh,omitempty"`
	Auth     Hex    `json:"auth,omitempty"`
}

// PushRequest is one HTTP request as the provider's server receives it.
type PushRequest struct {
	Method  string            `json:"method"`
	URL     string            `json:"url"`
	Headers map[string]string `json:"headers"` // every header, values of a repeated one joined by ", "
	BodyHex Hex               `json:"body_hex"`
	Body    string            `json:"body,omitempty"` // body_hex as text, for humans, when it is UTF-8
	JWT     *PushJWT          `json:"jwt,omitempty"`
}

// PushJWT is the token standing for "{jwt}" in the Authorization header.
type PushJWT struct {
	Header    string                     `json:"header"`               // the JOSE header, decoded, exact
	Claims    map[string]json.RawMessage `json:"claims"`               // every claim but those in wall_clock, exact
	WallClock map[string]int64           `json:"wall_clock,omitempty"` // claim → seconds after the sending time (the library reads the wall clock)
	Key       Hex                        `json:"key"`                  // the P-256 public key (uncompressed) the ES256 signature verifies with
}

// PushResponse is the provider's answer in the case.
type PushResponse struct {
	Status  int               `json:"status"`
	Headers map[string]string `json:"headers,omitempty"`
	Body    string            `json:"body,omitempty"`
}

// received is what the test server saw.
type received struct {
	method, url string
	header      http.Header
	body        []byte
}

// toServer hands every request to the test server at addr, over plain
// HTTP, keeping its Host: the provider code addresses the real hosts.
type toServer struct {
	addr string
	tr   *http.Transport // no proxy, whatever the environment says
}

func (t toServer) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Scheme != "https" {
		return nil, fmt.Errorf("testvectors: push to a non-https URL %s", r.URL)
	}
	r2 := r.Clone(r.Context())
	r2.URL.Scheme, r2.URL.Host = "http", t.addr
	r2.Host = r.URL.Host
	return t.tr.RoundTrip(r2)
}

func (v *PushVector) provider(c *http.Client) (push.Provider, error) {
	now := time.UnixMilli(v.NowMs)
	ttl := time.Duration(v.Config.TTLSeconds) * time.Second
	switch v.Provider {
	case "apns":
		k, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), v.Config.APNsKey)
		if err != nil {
			return nil, err
		}
		return &push.APNs{Key: k, KeyID: v.Config.KeyID, TeamID: v.Config.TeamID, Topic: v.Config.Topic,
			Endpoint: v.Config.Endpoint, Client: c, TTL: ttl, Now: func() time.Time { return now }}, nil
	case "fcm":
		return &push.FCM{ProjectID: v.Config.ProjectID, Endpoint: v.Config.Endpoint, Client: c, TTL: ttl,
			TokenSource: oauth2.StaticTokenSource(&oauth2.Token{AccessToken: v.Config.AccessToken, TokenType: "Bearer"})}, nil
	case "webpush":
		return &push.WebPush{VAPIDPublicKey: v.Config.VAPIDPublicKey, VAPIDPrivateKey: v.Config.VAPIDPrivateKey,
			Subscriber: v.Config.Subscriber, Client: c, TTL: ttl}, nil
	case "unifiedpush":
		return &push.UnifiedPush{Client: c, TTL: ttl}, nil
	}
	return nil, fmt.Errorf("unknown provider %q", v.Provider)
}

func (v *PushVector) reason() (push.Reason, error) {
	switch v.Reason {
	case "message":
		return push.ReasonMessage, nil
	case "prekeys":
		return push.ReasonPrekeys, nil
	}
	return 0, fmt.Errorf("unknown reason %q", v.Reason)
}

// run sends the wake-up through the real provider code and returns what
// the test server received, the provider's error and the wall-clock
// interval of the sending.
func (v *PushVector) run() (*received, error, [2]time.Time, error) {
	var span [2]time.Time
	r, err := v.reason()
	if err != nil {
		return nil, nil, span, err
	}
	kind, ok := wirepb.PushKind_value[v.Registration.Kind]
	if !ok {
		return nil, nil, span, fmt.Errorf("unknown registration kind %q", v.Registration.Kind)
	}
	reg, err := push.Normalize(&wirepb.PushRegistration{Kind: wirepb.PushKind(kind), Token: v.Registration.Token,
		Endpoint: v.Registration.Endpoint, P256Dh: v.Registration.P256dh, Auth: v.Registration.Auth}, false)
	if err != nil {
		return nil, nil, span, fmt.Errorf("registration refused: %w", err)
	}
	if v.Response.Status < 200 || v.Response.Status > 599 {
		return nil, nil, span, fmt.Errorf("response status %d is not 200..599", v.Response.Status)
	}
	gotc := make(chan *received, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(req.Body, 1<<20))
		select {
		case gotc <- &received{req.Method, "https://" + req.Host + req.URL.RequestURI(), req.Header.Clone(), body}:
		default: // a second request: reported below
		}
		for k, val := range v.Response.Headers {
			w.Header().Set(k, val)
		}
		w.WriteHeader(v.Response.Status)
		_, _ = io.WriteString(w, v.Response.Body)
	}))
	defer srv.Close()
	tr := toServer{addr: srv.Listener.Addr().String(), tr: &http.Transport{}}
	defer tr.tr.CloseIdleConnections()
	p, err := v.provider(&http.Client{Transport: tr, Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }})
	if err != nil {
		return nil, nil, span, err
	}
	type out struct{ err error }
	res, _ := withSeed(v.Seed, func() (out, error) {
		span[0] = time.Now()
		e := p.Push(context.Background(), reg, r)
		span[1] = time.Now()
		return out{e}, nil
	})
	select {
	case g := <-gotc:
		return g, res.err, span, nil
	default:
		return nil, res.err, span, fmt.Errorf("the provider sent no request (%v)", res.err)
	}
}

// recordRequest turns what the server received into a PushRequest; wallClock
// names the JWT claims the library takes from the wall clock, with their
// offset.
func recordRequest(g *received, wallClock map[string]int64) (PushRequest, error) {
	pr := PushRequest{Method: g.method, URL: g.url, Headers: map[string]string{}, BodyHex: g.body}
	if utf8.Valid(g.body) {
		pr.Body = string(g.body)
	}
	for k, vs := range g.header {
		pr.Headers[k] = strings.Join(vs, ", ")
	}
	a := pr.Headers["Authorization"]
	var tok string
	switch {
	case strings.HasPrefix(a, "bearer ") && strings.Count(a, ".") == 2: // APNs provider token
		tok = strings.TrimPrefix(a, "bearer ")
	case strings.HasPrefix(a, "vapid t="): // VAPID
		tok, _, _ = strings.Cut(strings.TrimPrefix(a, "vapid t="), ",")
	default:
		return pr, nil
	}
	pr.Headers["Authorization"] = strings.Replace(a, tok, jwtPlaceholder, 1)
	h, c, err := jwtParts(tok)
	if err != nil {
		return pr, err
	}
	for k := range wallClock {
		delete(c, k)
	}
	pr.JWT = &PushJWT{Header: string(h), Claims: c, WallClock: wallClock}
	return pr, nil
}

func jwtParts(tok string) (header []byte, claims map[string]json.RawMessage, err error) {
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return nil, nil, errors.New("the token is not a JWT")
	}
	if header, err = base64.RawURLEncoding.DecodeString(parts[0]); err != nil {
		return nil, nil, fmt.Errorf("JWT header: %w", err)
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil, nil, fmt.Errorf("JWT claims: %w", err)
	}
	if err := json.Unmarshal(b, &claims); err != nil {
		return nil, nil, fmt.Errorf("JWT claims: %w", err)
	}
	return header, claims, nil
}

// compare checks what the server received against the vector.
func (v *PushVector) compare(g *received, span [2]time.Time) error {
	want := v.Request
	if g.method != want.Method || g.url != want.URL {
		return fmt.Errorf("request %s %s, the vector has %s %s", g.method, g.url, want.Method, want.URL)
	}
	if !bytes.Equal(g.body, want.BodyHex) {
		return fmt.Errorf("body %x, the vector has %x", g.body, []byte(want.BodyHex))
	}
	got := map[string]string{}
	for k, vs := range g.header {
		got[k] = strings.Join(vs, ", ")
	}
	var tok string
	if want.JWT != nil {
		tmpl := want.Headers["Authorization"]
		pre, suf, ok := strings.Cut(tmpl, jwtPlaceholder)
		a := got["Authorization"]
		if !ok || !strings.HasPrefix(a, pre) || !strings.HasSuffix(a, suf) || len(a) < len(pre)+len(suf) {
			return fmt.Errorf("Authorization %q does not match %q", a, tmpl)
		}
		tok = a[len(pre) : len(a)-len(suf)]
		got["Authorization"] = tmpl
	}
	for _, k := range slices.Sorted(maps.Keys(mergeKeys(got, want.Headers))) {
		if got[k] != want.Headers[k] {
			return fmt.Errorf("header %s: %q, the vector has %q", k, got[k], want.Headers[k])
		}
	}
	if want.JWT != nil {
		return want.JWT.check(tok, span)
	}
	return nil
}

func mergeKeys(a, b map[string]string) map[string]bool {
	m := map[string]bool{}
	for k := range a {
		m[k] = true
	}
	for k := range b {
		m[k] = true
	}
	return m
}

// check verifies a received JWT against the vector's description.
func (j *PushJWT) check(tok string, span [2]time.Time) error {
	h, c, err := jwtParts(tok)
	if err != nil {
		return err
	}
	if string(h) != j.Header {
		return fmt.Errorf("JWT header %s, the vector has %s", h, j.Header)
	}
	for k, off := range j.WallClock {
		var n int64
		if err := json.Unmarshal(c[k], &n); err != nil {
			return fmt.Errorf("JWT claim %s: %v", k, err)
		}
		lo, hi := span[0].Unix()+off-1, span[1].Unix()+off+1
		if n < lo || n > hi {
			return fmt.Errorf("JWT claim %s = %d, want the sending time + %d s (%d..%d)", k, n, off, lo, hi)
		}
		delete(c, k)
	}
	if len(c) != len(j.Claims) {
		return fmt.Errorf("JWT claims %v, the vector has %v", slices.Sorted(maps.Keys(c)), slices.Sorted(maps.Keys(j.Claims)))
	}
	for k, want := range j.Claims {
		var a, b bytes.Buffer
		if json.Compact(&a, c[k]) != nil || json.Compact(&b, want) != nil || !bytes.Equal(a.Bytes(), b.Bytes()) {
			return fmt.Errorf("JWT claim %s = %s, the vector has %s", k, c[k], want)
		}
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), j.Key)
	if err != nil {
		return fmt.Errorf("JWT key: %w", err)
	}
	i := strings.LastIndexByte(tok, '.')
	sig, err := base64.RawURLEncoding.DecodeString(tok[i+1:])
	if err != nil {
		return fmt.Errorf("JWT signature: %w", err)
	}
	if err := jwt.SigningMethodES256.Verify(tok[:i], sig, pub); err != nil {
		return fmt.Errorf("JWT signature does not verify with the vector's key: %w", err)
	}
	return nil
}

// Check runs the wake-up and returns the verdict.
func (v *PushVector) Check() (string, error) {
	v.got.err = nil
	if v.Provider == "webpush" {
		pt, err := decryptWebPush(v.Request.BodyHex, v.SubscriptionPrivateKey, v.Registration.Auth)
		if err != nil {
			return ErrPayloadNotWake, err
		}
		if !bytes.Equal(pt, push.Payload) {
			return ErrPayloadNotWake, fmt.Errorf("the body decrypts to %q, not %q", pt, push.Payload)
		}
	}
	g, perr, span, err := v.run()
	if err != nil {
		return ErrRequestMismatch, err
	}
	if err := v.compare(g, span); err != nil {
		return ErrRequestMismatch, err
	}
	v.got.err = perr
	var se *push.StatusError
	switch {
	case perr == nil:
		return ExpectValid, nil
	case errors.Is(perr, push.ErrInvalidToken):
		return PushInvalidToken, perr
	case errors.As(perr, &se) && se.Retryable():
		return PushRetry, perr
	}
	return PushRejected, perr
}

// Consistent checks the text copies and the retry delay.
func (v *PushVector) Consistent() error {
	text := ""
	if utf8.Valid(v.Request.BodyHex) {
		text = string(v.Request.BodyHex)
	}
	if v.Request.Body != text {
		return errors.New(`"body" does not match body_hex`)
	}
	plain := ""
	if v.Provider == "webpush" {
		if pt, err := decryptWebPush(v.Request.BodyHex, v.SubscriptionPrivateKey, v.Registration.Auth); err == nil {
			plain = string(pt)
		}
	}
	if v.Plaintext != plain {
		return errors.New(`"plaintext" is not what the body decrypts to`)
	}
	var se *push.StatusError
	var after time.Duration
	if errors.As(v.got.err, &se) {
		after = se.RetryAfter
	}
	if after.Milliseconds() != v.RetryAfterMs {
		return fmt.Errorf("retry_after_ms %d, the provider's answer asks for %v", v.RetryAfterMs, after)
	}
	return nil
}

// decryptWebPush is the browser's side of RFC 8291 (aes128gcm, one
// record): the body decrypted with the subscription's private key and auth
// secret, padding and delimiter removed.
func decryptWebPush(body, priv, auth []byte) ([]byte, error) {
	ua, err := ecdh.P256().NewPrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("subscription key: %w", err)
	}
	if len(body) < 21+65+16 {
		return nil, fmt.Errorf("a body of %d bytes is too short", len(body))
	}
	salt, rs, idlen := body[:16], binary.BigEndian.Uint32(body[16:20]), int(body[20])
	if idlen != 65 || uint32(len(body)) > rs {
		return nil, fmt.Errorf("header: keyid of %d bytes, record size %d for %d bytes", idlen, rs, len(body))
	}
	as, err := ecdh.P256().NewPublicKey(body[21 : 21+idlen])
	if err != nil {
		return nil, fmt.Errorf("the sender's key: %w", err)
	}
	secret, err := ua.ECDH(as)
	if err != nil {
		return nil, err
	}
	info := append(append([]byte("WebPush: info\x00"), ua.PublicKey().Bytes()...), as.Bytes()...)
	prkKey, _ := hkdf.Extract(sha256.New, secret, auth)
	ikm, _ := hkdf.Expand(sha256.New, prkKey, string(info), 32)
	prk, _ := hkdf.Extract(sha256.New, ikm, salt)
	cek, _ := hkdf.Expand(sha256.New, prk, "Content-Encoding: aes128gcm\x00", 16)
	nonce, _ := hkdf.Expand(sha256.New, prk, "Content-Encoding: nonce\x00", 12)
	blk, _ := aes.NewCipher(cek)
	gcm, _ := cipher.NewGCM(blk)
	pt, err := gcm.Open(nil, nonce, body[21+idlen:], nil)
	if err != nil {
		return nil, fmt.Errorf("does not decrypt with the subscription's keys: %w", err)
	}
	pt = bytes.TrimRight(pt, "\x00")
	if len(pt) == 0 || pt[len(pt)-1] != 0x02 {
		return nil, errors.New("no last-record delimiter")
	}
	return pt[:len(pt)-1], nil
}

// ------------------------------------------------------------------ generator

// The vectors' clock: 2026-01-01T00:00:00Z.
const pushNowMs = 1767225600000

func p256Priv(name string) *ecdh.PrivateKey {
	k, err := ecdh.P256().NewPrivateKey(fixedSeed(name))
	if err != nil {
		panic(err) // a SHA-256 output is below the order but for 2^-32 of them
	}
	return k
}

func pushVectors() (map[string]vector, error) {
	apnsKey := p256Priv("apns")
	vapid := p256Priv("vapid")
	ua := p256Priv("webpush-subscription")
	auth := fixedSeed("webpush-auth")[:16]
	b64 := base64.RawURLEncoding.EncodeToString
	apnsToken := fmt.Sprintf("%x", fixedSeed("apns-device-token"))
	cfg := map[string]PushConfig{
		"apns": {Endpoint: push.APNsProduction, APNsKey: apnsKey.Bytes(), KeyID: "KEY1234567", TeamID: "TEAM123456",
			Topic: "app.ferry.client", TTLSeconds: 86400},
		"fcm": {Endpoint: push.FCMEndpoint, ProjectID: "ferry-app", AccessToken: "ya29.ferry-testvectors-access-token",
			TTLSeconds: 86400},
		"webpush": {VAPIDPublicKey: b64(vapid.PublicKey().Bytes()), VAPIDPrivateKey: b64(vapid.Bytes()),
			Subscriber: "ops@ferry.example", TTLSeconds: 86400},
		"unifiedpush": {TTLSeconds: 86400},
	}
	regs := map[string]PushReg{
		"apns":        {Kind: "APNS", Token: apnsToken},
		"fcm":         {Kind: "FCM", Token: "dGVzdC1mY20tdG9rZW4:APA91bFerryTestVectorRegistrationToken_0123456789"},
		"webpush":     {Kind: "WEBPUSH", Endpoint: "https://push.example.net/wpush/v2/gAAAAABferry-testvectors", P256dh: ua.PublicKey().Bytes(), Auth: auth},
		"unifiedpush": {Kind: "UNIFIEDPUSH", Endpoint: "https://ntfy.example.org/upFerryTestVectors?up=1"},
	}
	ok := map[string]PushResponse{
		"apns":        {Status: 200, Headers: map[string]string{"apns-id": "00000000-0000-0000-0000-000000000001"}},
		"fcm":         {Status: 200, Headers: map[string]string{"Content-Type": "application/json"}, Body: `{"name":"projects/ferry-app/messages/0:1"}`},
		"webpush":     {Status: 201},
		"unifiedpush": {Status: 201},
	}
	type tc struct {
		provider, reason, desc string
		resp                   *PushResponse // nil: ok[provider]
		retryAfterMs           int64
		mutate                 func(v *PushVector) error // makes a file that must fail
	}
	cases := map[string]tc{
		"apns-message": {"apns", "message", "APNs, a new inbox entry: an alert push (mutable-content, a fixed localized placeholder the app's extension replaces after fetching), priority 10, collapsible", nil, 0, nil},
		"apns-prekeys": {"apns", "prekeys", "APNs, one-time prekeys low: a silent background push (content-available), priority 5", nil, 0, nil},
		"apns-unregistered": {"apns", "message", "APNs answers 410 Unregistered: the registration is removed", &PushResponse{Status: 410,
			Headers: map[string]string{"Content-Type": "application/json"}, Body: `{"reason":"Unregistered","timestamp":1767225600000}`}, 0, nil},
		"apns-bad-device-token": {"apns", "message", "APNs answers 400 BadDeviceToken: the registration is removed", &PushResponse{Status: 400,
			Headers: map[string]string{"Content-Type": "application/json"}, Body: `{"reason":"BadDeviceToken"}`}, 0, nil},
		"apns-too-many-requests": {"apns", "message", "APNs answers 429 with Retry-After: 7: tried again later, not before 7 s", &PushResponse{Status: 429,
			Headers: map[string]string{"Content-Type": "application/json", "Retry-After": "7"}, Body: `{"reason":"TooManyRequests"}`}, 7000, nil},
		"apns-payload-too-large": {"apns", "message", "APNs answers 413 PayloadTooLarge: this wake-up fails, the registration stays", &PushResponse{Status: 413,
			Headers: map[string]string{"Content-Type": "application/json"}, Body: `{"reason":"PayloadTooLarge"}`}, 0, nil},
		"apns-with-content": {"apns", "message", "a server that puts the sender and text into the alert: the provider code sends the fixed wake-up, so this file must fail", nil, 0,
			func(v *PushVector) error {
				b := []byte(`{"aps":{"alert":{"title":"alice","body":"hello bob"},"mutable-content":1},"ferry":"wake"}`)
				v.Request.BodyHex, v.Request.Body = b, string(b)
				v.Expect = ErrRequestMismatch
				return nil
			}},
		"fcm-message": {"fcm", "message", "FCM HTTP v1, a new inbox entry: a data-only message {ferry: wake}, Android priority HIGH, collapse key, TTL", nil, 0, nil},
		"fcm-prekeys": {"fcm", "prekeys", "FCM HTTP v1, one-time prekeys low: the same data-only message at priority NORMAL", nil, 0, nil},
		"fcm-unregistered": {"fcm", "message", "FCM answers 404 NOT_FOUND / UNREGISTERED: the registration is removed", &PushResponse{Status: 404,
			Headers: map[string]string{"Content-Type": "application/json"},
			Body:    `{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}`}, 0, nil},
		"fcm-unavailable": {"fcm", "message", "FCM answers 503 with Retry-After: 3: tried again later, not before 3 s", &PushResponse{Status: 503,
			Headers: map[string]string{"Retry-After": "3"}}, 3000, nil},
		"fcm-invalid-argument": {"fcm", "message", "FCM answers 400 INVALID_ARGUMENT: this wake-up fails, the registration stays", &PushResponse{Status: 400,
			Headers: map[string]string{"Content-Type": "application/json"},
			Body:    `{"error":{"code":400,"message":"Request contains an invalid argument.","status":"INVALID_ARGUMENT"}}`}, 0, nil},
		"webpush-message":   {"webpush", "message", "Web Push (RFC 8030, VAPID RFC 8292), a new inbox entry: Urgency high, Topic, TTL; the body is RFC 8291 aes128gcm and decrypts with the subscription's keys to exactly {\"ferry\":\"wake\"}", nil, 0, nil},
		"webpush-prekeys":   {"webpush", "prekeys", "Web Push, one-time prekeys low: Urgency normal, the same encrypted wake-up", nil, 0, nil},
		"webpush-gone":      {"webpush", "message", "the push service answers 410 Gone (the subscription expired): the registration is removed", &PushResponse{Status: 410}, 0, nil},
		"webpush-too-large": {"webpush", "message", "the push service answers 413: this wake-up fails, the registration stays", &PushResponse{Status: 413}, 0, nil},
		"webpush-leaks-content": {"webpush", "message", "a body that decrypts to more than the wake-up (a sender and text): must fail", nil, 0,
			func(v *PushVector) error {
				leak, err := encryptWebPush([]byte(`{"ferry":"wake","from":"alice","text":"hello bob"}`),
					ua.PublicKey(), auth, p256Priv("webpush-leak-sender"), fixedSeed("webpush-leak-salt")[:16])
				v.Request.BodyHex = leak
				v.Plaintext = `{"ferry":"wake","from":"alice","text":"hello bob"}`
				v.Expect = ErrPayloadNotWake
				return err
			}},
		"unifiedpush-message":   {"unifiedpush", "message", "UnifiedPush, a new inbox entry: the wake-up POSTed to the distributor's endpoint, Urgency high", nil, 0, nil},
		"unifiedpush-prekeys":   {"unifiedpush", "prekeys", "UnifiedPush, one-time prekeys low: Urgency normal", nil, 0, nil},
		"unifiedpush-not-found": {"unifiedpush", "message", "the distributor answers 404 (the app was unregistered): the registration is removed", &PushResponse{Status: 404}, 0, nil},
		"unifiedpush-rate-limited": {"unifiedpush", "message", "the distributor answers 429 with Retry-After: 60: tried again later, not before 60 s", &PushResponse{Status: 429,
			Headers: map[string]string{"Retry-After": "60"}}, 60000, nil},
	}
	out := map[string]vector{}
	for name, c := range cases {
		resp := ok[c.provider]
		if c.resp != nil {
			resp = *c.resp
		}
		v := &PushVector{Header: Header{Description: c.desc, Expect: ExpectValid}, Provider: c.provider, Reason: c.reason,
			NowMs: pushNowMs, Seed: 9, Config: cfg[c.provider], Registration: regs[c.provider], Response: resp,
			RetryAfterMs: c.retryAfterMs}
		var wall map[string]int64
		switch c.provider {
		case "webpush":
			v.SubscriptionPrivateKey = ua.Bytes()
			v.Plaintext = string(push.Payload)
			wall = map[string]int64{"exp": 12 * 3600}
		}
		g, perr, _, err := v.run()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if v.Request, err = recordRequest(g, wall); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if v.Request.JWT != nil {
			switch c.provider {
			case "apns":
				v.Request.JWT.Key = apnsKey.PublicKey().Bytes()
			case "webpush":
				v.Request.JWT.Key = vapid.PublicKey().Bytes()
			}
		}
		switch {
		case perr == nil:
		case errors.Is(perr, push.ErrInvalidToken):
			v.Expect = PushInvalidToken
		case c.retryAfterMs > 0:
			v.Expect = PushRetry
		default:
			v.Expect = PushRejected
		}
		if c.mutate != nil {
			if err := c.mutate(v); err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
		}
		out[name] = v
	}
	return out, nil
}

// encryptWebPush is the sender's side of RFC 8291 with a given ephemeral
// key and salt, one record of webpush-go's size for Ferry (256 bytes), for
// a case that must fail.
func encryptWebPush(msg []byte, ua *ecdh.PublicKey, auth []byte, eph *ecdh.PrivateKey, salt []byte) ([]byte, error) {
	const rs = 256
	secret, err := eph.ECDH(ua)
	if err != nil {
		return nil, err
	}
	info := append(append([]byte("WebPush: info\x00"), ua.Bytes()...), eph.PublicKey().Bytes()...)
	prkKey, _ := hkdf.Extract(sha256.New, secret, auth)
	ikm, _ := hkdf.Expand(sha256.New, prkKey, string(info), 32)
	prk, _ := hkdf.Extract(sha256.New, ikm, salt)
	cek, _ := hkdf.Expand(sha256.New, prk, "Content-Encoding: aes128gcm\x00", 16)
	nonce, _ := hkdf.Expand(sha256.New, prk, "Content-Encoding: nonce\x00", 12)
	blk, _ := aes.NewCipher(cek)
	gcm, _ := cipher.NewGCM(blk)
	head := append(append(bytes.Clone(salt), 0, 0, 0, 0, 65), eph.PublicKey().Bytes()...)
	binary.BigEndian.PutUint32(head[16:20], rs)
	pt := append(bytes.Clone(msg), 0x02)
	if n := rs - 16 - len(head); len(pt) < n {
		pt = append(pt, make([]byte, n-len(pt))...)
	}
	return gcm.Seal(head, nonce, pt, nil), nil
}
