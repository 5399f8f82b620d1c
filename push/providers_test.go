package push

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	webpush "github.com/SherClockHolmes/webpush-go"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/oauth2"
)

// forbidden are strings no push body may hold: what a message, its sender
// or its conversation would look like if they leaked into a payload.
var forbidden = []string{"alice", "bob", "hello", "text", "sender", "conversation", "body"}

// checkWakeJSON fails unless b is JSON whose only non-"aps" member is
// "ferry":"wake", holding none of the forbidden strings.
func checkWakeJSON(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("payload %q is not JSON: %v", b, err)
	}
	for k, v := range m {
		if k == "aps" {
			continue
		}
		if k != "ferry" || v != "wake" {
			t.Errorf("payload member %q=%v; want only \"ferry\":\"wake\"", k, v)
		}
	}
	for _, f := range forbidden {
		if bytes.Contains(bytes.ToLower(b), []byte(f)) {
			t.Errorf("payload %q holds %q", b, f)
		}
	}
	return m
}

func mustStatus(t *testing.T, err error) *StatusError {
	t.Helper()
	var se *StatusError
	if !errors.As(err, &se) {
		t.Fatalf("err = %v, want a *StatusError", err)
	}
	return se
}

// ------------------------------------------------------------------ APNs

func TestAPNs(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	parsed, err := ParseAPNsKey(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	if err != nil {
		t.Fatal(err)
	}
	token := strings.Repeat("ab", 32)
	var status atomic.Int32
	var reason atomic.Value
	status.Store(200)
	reason.Store("")
	type got struct {
		pushType, prio string
		body           []byte
	}
	gotc := make(chan got, 10)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor != 2 {
			t.Errorf("APNs request over %s, want HTTP/2", r.Proto)
		}
		if r.Method != http.MethodPost || r.URL.Path != "/3/device/"+token {
			t.Errorf("request %s %s", r.Method, r.URL.Path)
		}
		if r.Header.Get("apns-topic") != "app.ferry.test" || r.Header.Get("apns-collapse-id") != CollapseID {
			t.Errorf("apns-topic %q, apns-collapse-id %q", r.Header.Get("apns-topic"), r.Header.Get("apns-collapse-id"))
		}
		// The provider token: ES256, kid header, iss = team, recent iat,
		// signature verifying with the configured key.
		bearer, ok := strings.CutPrefix(r.Header.Get("authorization"), "bearer ")
		if !ok {
			t.Errorf("authorization %q", r.Header.Get("authorization"))
		}
		tok, err := jwt.Parse(bearer, func(tk *jwt.Token) (any, error) { return &key.PublicKey, nil },
			jwt.WithValidMethods([]string{"ES256"}), jwt.WithIssuer("TEAM123456"), jwt.WithIssuedAt())
		if err != nil {
			t.Errorf("provider token does not verify: %v", err)
		} else if tok.Header["kid"] != "KEY1234567" {
			t.Errorf("kid %v", tok.Header["kid"])
		} else if iat, _ := tok.Claims.GetIssuedAt(); iat == nil || time.Since(iat.Time) > time.Minute {
			t.Errorf("iat %v", iat)
		}
		body, _ := io.ReadAll(r.Body)
		gotc <- got{r.Header.Get("apns-push-type"), r.Header.Get("apns-priority"), body}
		w.Header().Set("apns-id", "x")
		if s := int(status.Load()); s != 200 {
			if s == 429 {
				w.Header().Set("Retry-After", "7")
			}
			w.WriteHeader(s)
			_ = json.NewEncoder(w).Encode(map[string]string{"reason": reason.Load().(string)})
		}
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()
	a := &APNs{Key: parsed, KeyID: "KEY1234567", TeamID: "TEAM123456", Topic: "app.ferry.test",
		Endpoint: srv.URL, Client: srv.Client()}
	reg := &wirepb.PushRegistration{Kind: wirepb.PushKind_APNS, Token: token}
	ctx := context.Background()

	if err := a.Push(ctx, reg, ReasonMessage); err != nil {
		t.Fatal(err)
	}
	g := <-gotc
	if g.pushType != "alert" || g.prio != "10" {
		t.Errorf("message push: type %q priority %q, want alert 10", g.pushType, g.prio)
	}
	m := checkWakeJSON(t, g.body)
	aps, _ := m["aps"].(map[string]any)
	if aps["mutable-content"] != float64(1) {
		t.Errorf("aps %v, want mutable-content", aps)
	}
	if err := a.Push(ctx, reg, ReasonPrekeys); err != nil {
		t.Fatal(err)
	}
	g = <-gotc
	if g.pushType != "background" || g.prio != "5" {
		t.Errorf("prekeys push: type %q priority %q, want background 5", g.pushType, g.prio)
	}
	checkWakeJSON(t, g.body)

	for name, tc := range map[string]struct {
		status    int
		reason    string
		invalid   bool
		retryable bool
		after     time.Duration
	}{
		"unregistered":    {410, "Unregistered", true, false, 0},
		"bad token":       {400, "BadDeviceToken", true, false, 0},
		"bad topic":       {400, "DeviceTokenNotForTopic", true, false, 0},
		"bad payload":     {400, "PayloadEmpty", false, false, 0},
		"too many":        {429, "TooManyRequests", false, true, 7 * time.Second},
		"unavailable":     {503, "ServiceUnavailable", false, true, 0},
		"expired jwt":     {403, "ExpiredProviderToken", false, false, 0},
		"internal errors": {500, "InternalServerError", false, true, 0},
	} {
		t.Run(name, func(t *testing.T) {
			status.Store(int32(tc.status))
			reason.Store(tc.reason)
			err := a.Push(ctx, reg, ReasonMessage)
			<-gotc
			se := mustStatus(t, err)
			if errors.Is(err, ErrInvalidToken) != tc.invalid || se.Retryable() != tc.retryable ||
				se.Reason != tc.reason || se.RetryAfter != tc.after {
				t.Errorf("err %v: invalid %v retryable %v after %v", err, errors.Is(err, ErrInvalidToken), se.Retryable(), se.RetryAfter)
			}
		})
	}
}

// ------------------------------------------------------------------ FCM

func TestFCM(t *testing.T) {
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	der, _ := x509.MarshalPKCS8PrivateKey(rk)
	var tokenCalls atomic.Int32
	tokenSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tokenCalls.Add(1)
		_ = r.ParseForm()
		if r.Form.Get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
			t.Errorf("grant_type %q", r.Form.Get("grant_type"))
		}
		// The assertion is signed with the service account's key and names
		// this token endpoint as its audience.
		claims := jwt.MapClaims{}
		_, err := jwt.ParseWithClaims(r.Form.Get("assertion"), claims, func(*jwt.Token) (any, error) { return &rk.PublicKey, nil },
			jwt.WithValidMethods([]string{"RS256"}), jwt.WithIssuer("ferry@proj.iam.gserviceaccount.com"))
		if err != nil {
			t.Errorf("assertion: %v", err)
		}
		if claims["scope"] != fcmScope || claims["aud"] != "http://"+r.Host+"/token" {
			t.Errorf("assertion claims %v", claims)
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"access_token":"ya29.test-token","token_type":"Bearer","expires_in":3600}`)
	}))
	defer tokenSrv.Close()

	var status atomic.Int32
	status.Store(200)
	bodies := make(chan []byte, 10)
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/projects/proj/messages:send" {
			t.Errorf("path %q", r.URL.Path)
		}
		if r.Header.Get("Authorization") != "Bearer ya29.test-token" {
			t.Errorf("authorization %q", r.Header.Get("Authorization"))
		}
		b, _ := io.ReadAll(r.Body)
		bodies <- b
		switch status.Load() {
		case 200:
			_, _ = io.WriteString(w, `{"name":"projects/proj/messages/1"}`)
		case 404:
			w.WriteHeader(404)
			_, _ = io.WriteString(w, `{"error":{"code":404,"status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}`)
		case 400:
			w.WriteHeader(400)
			_, _ = io.WriteString(w, `{"error":{"code":400,"status":"INVALID_ARGUMENT","details":[{"errorCode":"UNREGISTERED"}]}}`)
		case 503:
			w.Header().Set("Retry-After", "3")
			w.WriteHeader(503)
		}
	}))
	defer api.Close()
	creds, _ := json.Marshal(map[string]string{
		"type": "service_account", "project_id": "proj", "private_key_id": "k1",
		"private_key":  string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
		"client_email": "ferry@proj.iam.gserviceaccount.com", "token_uri": "https://oauth2.googleapis.com/token",
	})
	f := &FCM{CredentialsJSON: creds, TokenURL: tokenSrv.URL + "/token", Endpoint: api.URL}
	if err := f.Check(); err != nil {
		t.Fatal(err)
	}
	reg := &wirepb.PushRegistration{Kind: wirepb.PushKind_FCM, Token: "fcm:tok_1"}
	ctx := context.Background()
	for _, r := range []Reason{ReasonMessage, ReasonPrekeys} {
		if err := f.Push(ctx, reg, r); err != nil {
			t.Fatal(err)
		}
		var msg struct {
			Message struct {
				Token        string            `json:"token"`
				Data         map[string]string `json:"data"`
				Notification any               `json:"notification"`
				Android      map[string]any    `json:"android"`
			} `json:"message"`
		}
		b := <-bodies
		if err := json.Unmarshal(b, &msg); err != nil {
			t.Fatal(err)
		}
		m := msg.Message
		if m.Token != reg.Token || len(m.Data) != 1 || m.Data["ferry"] != "wake" || m.Notification != nil {
			t.Errorf("message %s: want a data-only wake-up to the token", b)
		}
		want := map[Reason]string{ReasonMessage: "HIGH", ReasonPrekeys: "NORMAL"}[r]
		if m.Android["priority"] != want {
			t.Errorf("priority %v, want %s", m.Android["priority"], want)
		}
		checkWakeJSON(t, mustJSON(t, m.Data))
	}
	if n := tokenCalls.Load(); n != 1 {
		t.Errorf("%d token requests for 2 pushes, want 1 (reused)", n)
	}
	for name, tc := range map[string]struct {
		status             int
		invalid, retryable bool
	}{
		"404 unregistered": {404, true, false},
		"400 unregistered": {400, true, false},
		"503":              {503, false, true},
	} {
		t.Run(name, func(t *testing.T) {
			status.Store(int32(tc.status))
			err := f.Push(ctx, reg, ReasonMessage)
			<-bodies
			se := mustStatus(t, err)
			if errors.Is(err, ErrInvalidToken) != tc.invalid || se.Retryable() != tc.retryable {
				t.Errorf("err %v: invalid %v retryable %v", err, errors.Is(err, ErrInvalidToken), se.Retryable())
			}
		})
	}
	// A token source instead of the key file's grant (workload identity,
	// the test vectors): its token is used, the token endpoint is not asked.
	status.Store(200)
	ts := oauth2.StaticTokenSource(&oauth2.Token{AccessToken: "ya29.test-token", TokenType: "Bearer"})
	if err := (&FCM{ProjectID: "proj", TokenSource: ts, Endpoint: api.URL}).Push(ctx, reg, ReasonMessage); err != nil {
		t.Fatal(err)
	}
	<-bodies
	if n := tokenCalls.Load(); n != 1 {
		t.Errorf("%d token requests, want still 1", n)
	}
	if err := (&FCM{TokenSource: ts}).Check(); !errors.Is(err, ErrConfig) {
		t.Errorf("a token source without a project: %v", err)
	}
	if err := (&FCM{CredentialsJSON: []byte("{")}).Check(); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "service account") {
		t.Errorf("a bad key file: %v", err)
	}
	// A token endpoint that refuses is a retryable failure, not a crash.
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()
	bad := &FCM{CredentialsJSON: creds, TokenURL: dead.URL + "/token", Endpoint: api.URL}
	if se := mustStatus(t, bad.Push(ctx, reg, ReasonMessage)); !se.Retryable() {
		t.Errorf("token failure %v not retryable", se)
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ------------------------------------------------------------------ Web Push

// decryptRFC8291 is the user agent's side of RFC 8291: it decrypts an
// aes128gcm body with the subscription's private key and auth secret.
func decryptRFC8291(t *testing.T, body []byte, ua *ecdh.PrivateKey, auth []byte) []byte {
	t.Helper()
	if len(body) < 21 {
		t.Fatalf("body of %d bytes", len(body))
	}
	salt, rs, idlen := body[:16], binary.BigEndian.Uint32(body[16:20]), int(body[20])
	if idlen != 65 || len(body) < 21+idlen {
		t.Fatalf("keyid length %d", idlen)
	}
	asPub, err := ecdh.P256().NewPublicKey(body[21 : 21+idlen])
	if err != nil {
		t.Fatalf("as_public: %v", err)
	}
	ct := body[21+idlen:]
	if uint32(len(body)) > rs {
		t.Fatalf("one record of %d bytes is over rs %d", len(body), rs)
	}
	secret, err := ua.ECDH(asPub)
	if err != nil {
		t.Fatal(err)
	}
	info := append(append([]byte("WebPush: info\x00"), ua.PublicKey().Bytes()...), asPub.Bytes()...)
	prkKey, _ := hkdf.Extract(sha256.New, secret, auth)
	ikm, _ := hkdf.Expand(sha256.New, prkKey, string(info), 32)
	prk, _ := hkdf.Extract(sha256.New, ikm, salt)
	cek, _ := hkdf.Expand(sha256.New, prk, "Content-Encoding: aes128gcm\x00", 16)
	nonce, _ := hkdf.Expand(sha256.New, prk, "Content-Encoding: nonce\x00", 12)
	blk, _ := aes.NewCipher(cek)
	gcm, _ := cipher.NewGCM(blk)
	pt, err := gcm.Open(nil, nonce, ct, nil)
	if err != nil {
		t.Fatalf("payload does not decrypt with the subscription's keys: %v", err)
	}
	pt = bytes.TrimRight(pt, "\x00")
	if len(pt) == 0 || pt[len(pt)-1] != 0x02 {
		t.Fatalf("no last-record delimiter")
	}
	return pt[:len(pt)-1]
}

func TestWebPush(t *testing.T) {
	ua, _ := ecdh.P256().GenerateKey(rand.Reader)
	auth := make([]byte, 16)
	_, _ = rand.Read(auth)
	vapidPriv, vapidPub, err := webpush.GenerateVAPIDKeys()
	if err != nil {
		t.Fatal(err)
	}
	var status atomic.Int32
	status.Store(201)
	type got struct {
		urgency string
		plain   []byte
	}
	gotc := make(chan got, 10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Content-Encoding") != "aes128gcm" || r.Header.Get("TTL") == "" {
			t.Errorf("headers %v", r.Header)
		}
		// VAPID (RFC 8292): "vapid t=JWT, k=public key"; the JWT verifies
		// with k, its aud is this origin and it expires within 24 hours.
		v, ok := strings.CutPrefix(r.Header.Get("Authorization"), "vapid ")
		parts := map[string]string{}
		for _, p := range strings.Split(v, ",") {
			k, val, _ := strings.Cut(strings.TrimSpace(p), "=")
			parts[k] = val
		}
		if !ok || parts["k"] != vapidPub {
			t.Errorf("authorization %q", r.Header.Get("Authorization"))
		}
		kb, _ := base64.RawURLEncoding.DecodeString(parts["k"])
		pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), kb)
		if err != nil {
			t.Errorf("k: %v", err)
		} else {
			claims := jwt.MapClaims{}
			_, err := jwt.ParseWithClaims(parts["t"], claims, func(*jwt.Token) (any, error) { return pub, nil },
				jwt.WithValidMethods([]string{"ES256"}), jwt.WithAudience("http://"+r.Host), jwt.WithExpirationRequired())
			if err != nil {
				t.Errorf("VAPID JWT: %v", err)
			}
			if claims["sub"] != "mailto:ops@ferry.test" {
				t.Errorf("sub %v", claims["sub"])
			}
		}
		body, _ := io.ReadAll(r.Body)
		gotc <- got{r.Header.Get("Urgency"), decryptRFC8291(t, body, ua, auth)}
		w.WriteHeader(int(status.Load()))
	}))
	defer srv.Close()
	wp := &WebPush{VAPIDPublicKey: vapidPub, VAPIDPrivateKey: vapidPriv, Subscriber: "mailto:ops@ferry.test",
		Client: EndpointClient(true)}
	if err := wp.Check(); err != nil {
		t.Fatal(err)
	}
	reg, err := Normalize(&wirepb.PushRegistration{Kind: wirepb.PushKind_WEBPUSH, Endpoint: srv.URL + "/push/abc",
		P256Dh: ua.PublicKey().Bytes(), Auth: auth}, true)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for r, want := range map[Reason]string{ReasonMessage: "high", ReasonPrekeys: "normal"} {
		if err := wp.Push(ctx, reg, r); err != nil {
			t.Fatal(err)
		}
		g := <-gotc
		if !bytes.Equal(g.plain, Payload) || g.urgency != want {
			t.Errorf("decrypted %q urgency %q, want %q %q", g.plain, g.urgency, Payload, want)
		}
		checkWakeJSON(t, g.plain)
	}
	for name, tc := range map[string]struct {
		status             int
		invalid, retryable bool
	}{"404": {404, true, false}, "410": {410, true, false}, "429": {429, false, true}, "502": {502, false, true}, "413": {413, false, false}} {
		t.Run(name, func(t *testing.T) {
			status.Store(int32(tc.status))
			err := wp.Push(ctx, reg, ReasonMessage)
			<-gotc
			se := mustStatus(t, err)
			if errors.Is(err, ErrInvalidToken) != tc.invalid || se.Retryable() != tc.retryable {
				t.Errorf("err %v: invalid %v retryable %v", err, errors.Is(err, ErrInvalidToken), se.Retryable())
			}
		})
	}
}

// ------------------------------------------------------------------ UnifiedPush

func TestUnifiedPush(t *testing.T) {
	var status atomic.Int32
	status.Store(201)
	bodies := make(chan []byte, 10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/up/instance1" {
			t.Errorf("%s %s", r.Method, r.URL.Path)
		}
		b, _ := io.ReadAll(r.Body)
		bodies <- b
		if status.Load() == 429 {
			w.Header().Set("Retry-After", time.Now().Add(90*time.Second).UTC().Format(http.TimeFormat))
		}
		w.WriteHeader(int(status.Load()))
	}))
	defer srv.Close()
	up := &UnifiedPush{Client: EndpointClient(true)}
	reg := &wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: srv.URL + "/up/instance1"}
	if err := up.Push(context.Background(), reg, ReasonMessage); err != nil {
		t.Fatal(err)
	}
	if b := <-bodies; !bytes.Equal(b, Payload) {
		t.Errorf("body %q, want %q", b, Payload)
	} else {
		checkWakeJSON(t, b)
	}
	for name, tc := range map[string]struct {
		status             int
		invalid, retryable bool
	}{"404": {404, true, false}, "410": {410, true, false}, "429": {429, false, true}, "503": {503, false, true}, "400": {400, false, false}} {
		t.Run(name, func(t *testing.T) {
			status.Store(int32(tc.status))
			err := up.Push(context.Background(), reg, ReasonMessage)
			<-bodies
			se := mustStatus(t, err)
			if errors.Is(err, ErrInvalidToken) != tc.invalid || se.Retryable() != tc.retryable {
				t.Errorf("err %v: invalid %v retryable %v", err, errors.Is(err, ErrInvalidToken), se.Retryable())
			}
			if tc.status == 429 && (se.RetryAfter < 80*time.Second || se.RetryAfter > 90*time.Second) {
				t.Errorf("Retry-After as a date gave %v", se.RetryAfter)
			}
		})
	}
}

// The endpoint client of production refuses the server's own network.
func TestEndpointClientRefusesLocal(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Error("a loopback endpoint was reached")
	}))
	defer srv.Close()
	up := &UnifiedPush{Client: EndpointClient(false)}
	err := up.Push(context.Background(), &wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: srv.URL}, ReasonMessage)
	var ue *url.Error
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "non-public") {
		t.Fatalf("err %v, want a refused dial", err)
	}
}
