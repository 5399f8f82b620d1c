package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	webpush "github.com/SherClockHolmes/webpush-go"
	"github.com/ferryhq/ferry/client"
	"github.com/golang-jwt/jwt/v5"
)

// pushEndpoint is a UnifiedPush endpoint served by the test: it records
// every push and answers with the current mode.
type pushEndpoint struct {
	srv      *httptest.Server
	mode     atomic.Int32 // one of the endpoint* modes
	release  chan struct{}
	inflight atomic.Int32 // requests being answered right now
	mu       sync.Mutex
	bodies   [][]byte
	times    []time.Time
	got      chan struct{} // one value per request, when it arrives
}

const (
	endpointOK = iota
	endpointGone
	endpointHang
	endpoint503
)

func newPushEndpoint(t *testing.T) *pushEndpoint {
	t.Helper()
	e := &pushEndpoint{release: make(chan struct{}), got: make(chan struct{}, 1000)}
	e.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.inflight.Add(1)
		defer e.inflight.Add(-1)
		b, _ := io.ReadAll(r.Body)
		e.mu.Lock()
		e.bodies = append(e.bodies, b)
		e.times = append(e.times, time.Now())
		e.mu.Unlock()
		e.got <- struct{}{}
		switch e.mode.Load() {
		case endpointOK:
			w.WriteHeader(http.StatusCreated)
		case endpointGone:
			w.WriteHeader(http.StatusGone)
		case endpointHang:
			select {
			case <-e.release:
			case <-r.Context().Done():
			}
			w.WriteHeader(http.StatusServiceUnavailable)
		case endpoint503:
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	t.Cleanup(func() {
		select {
		case <-e.release:
		default:
			close(e.release)
		}
		e.srv.Close()
	})
	return e
}

func (e *pushEndpoint) count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.bodies)
}

func (e *pushEndpoint) waitRequestOK(d time.Duration) bool {
	select {
	case <-e.got:
		return true
	case <-time.After(d):
		return false
	}
}

func (e *pushEndpoint) waitRequest(t *testing.T) {
	t.Helper()
	select {
	case <-e.got:
	case <-time.After(30 * time.Second):
		t.Fatal("no push reached the endpoint")
	}
}

// metric sums the samples of a metric on ferryd's /metrics whose line
// starts with prefix (a name, optionally with labels).
func metric(t *testing.T, srv *server, prefix string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + srv.addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sum := 0.0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		rest, ok := strings.CutPrefix(l, prefix)
		if !ok || !(strings.HasSuffix(prefix, "}") || strings.HasSuffix(prefix, " ") ||
			strings.HasPrefix(rest, " ") || strings.HasPrefix(rest, "{")) {
			continue
		}
		if i := strings.LastIndexByte(l, ' '); i > 0 {
			if v, err := strconv.ParseFloat(l[i+1:], 64); err == nil {
				sum += v
			}
		}
	}
	return sum
}

func pollMetric(t *testing.T, srv *server, prefix string, cond func(float64) bool) float64 {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		v := metric(t, srv, prefix)
		if cond(v) {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v: condition not met in 30s", prefix, v)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// offline waits until no device is connected (a CLI that exited or a
// client that stopped is gone from the server too).
func offline(t *testing.T, srv *server) {
	t.Helper()
	pollMetric(t, srv, "ferry_relay_authenticated_connections ", func(v float64) bool { return v == 0 })
}

func openClient(t *testing.T, home string) *client.Client {
	t.Helper()
	c, err := client.Open(context.Background(), client.Options{Home: home,
		Backoff: client.Backoff{Min: 20 * time.Millisecond, Max: 500 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Bob registers a UnifiedPush endpoint and goes offline; 20 messages in
// 2 seconds give him exactly one push in the window, carrying no content.
// While he is connected he gets none. A 410 from the endpoint removes his
// registration.
func TestBlackBoxPushWakeUp(t *testing.T) {
	const window = 5 * time.Second
	ep := newPushEndpoint(t)
	srv := startServer(t, t.TempDir(), "--push-window", window.String(), "--push-allow-local-endpoints")
	aliceHome := register(t, srv, "alice")
	bobHome := register(t, srv, "bob")
	endpoint := ep.srv.URL + "/up/bob-instance-7f3a"
	if out := mustFerry(t, bobHome, "push", "set", "unifiedpush", endpoint); !strings.Contains(out, "push wake-ups on") {
		t.Fatalf("push set printed %q", out)
	}
	offline(t, srv)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	alice := openClient(t, aliceHome)
	secret := "meet at the north gate"
	start := time.Now()
	for i := range 20 {
		if _, err := alice.Send(ctx, "bob", fmt.Sprintf("%s %d", secret, i)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond) // 20 messages over ~2 s, like a chat burst
	}
	elapsed := time.Since(start)
	// Every wake-up is accounted for: pushed or merged into the push.
	pollMetric(t, srv, "ferry_push_coalesced_total", func(v float64) bool {
		return v+metric(t, srv, "ferry_push_sent_total")+metric(t, srv, "ferry_push_failed_total") >= 20
	})
	ep.waitRequest(t)
	sent := metric(t, srv, "ferry_push_sent_total")
	if elapsed < window {
		if n := ep.count(); n != 1 || sent != 1 {
			t.Fatalf("%d pushes reached the endpoint (%v sent) for 20 messages in %v, want exactly 1 per %v window", n, sent, elapsed, window)
		}
	} else if n := ep.count(); n > int(elapsed/window)+1 {
		t.Fatalf("%d pushes for 20 messages in %v (slow machine), want at most %d", n, elapsed, int(elapsed/window)+1)
	}
	t.Logf("20 sends in %v: %d push(es), %v coalesced", elapsed, ep.count(), metric(t, srv, "ferry_push_coalesced_total"))
	ep.mu.Lock()
	body, firstPush := ep.bodies[0], ep.times[0]
	ep.mu.Unlock()
	if string(body) != `{"ferry":"wake"}` {
		t.Fatalf("push body %q, want only the wake-up", body)
	}
	for _, leak := range []string{"alice", "bob", "meet", "gate"} {
		if bytes.Contains(body, []byte(leak)) {
			t.Fatalf("push body %q holds %q", body, leak)
		}
	}

	// Let the window since that push pass: a wake-up now would be pushed,
	// not merged, so "no push while connected" is not hidden by coalescing.
	time.Sleep(time.Until(firstPush.Add(window + 100*time.Millisecond)))
	bob := openClient(t, bobHome)
	rctx, rcancel := context.WithCancel(ctx)
	var got atomic.Int32
	recvDone := make(chan error, 1)
	go func() {
		recvDone <- bob.Receive(rctx, client.ReceiveOptions{Handle: func(ev client.Event) {
			if ev.Message != nil {
				got.Add(1)
			}
		}})
	}()
	waitCount(t, &got, 20) // connected: the backlog is in
	for i := range 5 {
		if _, err := alice.Send(ctx, "bob", fmt.Sprintf("online %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	waitCount(t, &got, 25)
	if n := ep.count(); n != 1 {
		t.Fatalf("%d pushes, want none while bob is connected", n)
	}
	rcancel()
	<-recvDone
	offline(t, srv)

	// Offline again, past the window: the next message is pushed. (Had a
	// wake-up been recorded for bob while connected, this one would be
	// merged into it and never arrive.) The endpoint answers 410 Gone: the
	// registration is removed.
	ep.mode.Store(endpointGone)
	if _, err := alice.Send(ctx, "bob", "after"); err != nil {
		t.Fatal(err)
	}
	ep.waitRequest(t)
	pollMetric(t, srv, `ferry_push_tokens_removed_total{kind="unifiedpush"}`, func(v float64) bool { return v == 1 })
	if n := ep.count(); n != 2 {
		t.Fatalf("%d pushes, want 2", n)
	}
	// Nothing is pushed to a removed registration: past the 410 push's
	// window, the next wake-up finds none.
	time.Sleep(window) // the coalescing window itself is what is waited for
	skipped := metric(t, srv, `ferry_push_skipped_total{reason="no_registration"}`)
	if _, err := alice.Send(ctx, "bob", "after removal"); err != nil {
		t.Fatal(err)
	}
	pollMetric(t, srv, `ferry_push_skipped_total{reason="no_registration"}`, func(v float64) bool { return v > skipped })
	if n := ep.count(); n != 2 {
		t.Fatalf("%d pushes after the registration was removed, want still 2", n)
	}
	// The debug-level log holds neither the endpoint nor a message's text
	// (raw, hex or base64, in pieces: see audit).
	logFile := filepath.Join(t.TempDir(), "ferryd.log")
	writeFile(t, logFile, []byte(srv.log.String()))
	for _, f := range audit(t, logFile, map[string][]byte{"push endpoint": []byte(endpoint),
		"push endpoint path": []byte("/up/bob-instance-7f3a"), "message text": []byte(secret)}, nil) {
		t.Error(f)
	}
}

func waitCount(t *testing.T, n *atomic.Int32, want int32) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for n.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("bob received %d messages, want %d", n.Load(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A push provider that hangs, then one that answers 503, never holds up
// ✓: sends are acknowledged while the provider still holds the push
// requests open.
func TestBlackBoxPushOutage(t *testing.T) {
	ep := newPushEndpoint(t)
	srv := startServer(t, t.TempDir(), "--push-window", "200ms", "--push-workers", "2", "--push-queue", "2",
		"--push-timeout", "5m", "--push-allow-local-endpoints")
	aliceHome := register(t, srv, "alice")
	bobHome := register(t, srv, "bob")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	alice := openClient(t, aliceHome)
	sends := func(n int, label string) []time.Duration {
		var ds []time.Duration
		for i := range n {
			start := time.Now()
			if _, err := alice.Send(ctx, "bob", fmt.Sprintf("%s %d", label, i)); err != nil {
				t.Fatal(err)
			}
			ds = append(ds, time.Since(start))
			time.Sleep(50 * time.Millisecond)
		}
		return ds
	}
	offline(t, srv)
	baseline := sends(10, "baseline") // no push registration yet

	ep.mode.Store(endpointHang)
	mustFerry(t, bobHome, "push", "set", "unifiedpush", ep.srv.URL+"/up/bob")
	offline(t, srv)
	// Send until a wake-up is pushed (the window of the baseline's
	// wake-ups may still be running).
	for i := 0; ; i++ {
		if _, err := alice.Send(ctx, "bob", "first"); err != nil {
			t.Fatal(err)
		}
		if ep.waitRequestOK(time.Second) {
			break
		}
		if i == 30 {
			t.Fatalf("no push reached the endpoint:\n%s", srv.log.String())
		}
	}
	// A worker is now stuck in the provider.
	hanging := sends(20, "hanging")
	if ep.inflight.Load() == 0 {
		t.Fatal("the provider stopped hanging before the sends ended: the test proves nothing")
	}
	t.Logf("provider hanging: %d push requests held open, %v wake-ups dropped (queue full)",
		ep.inflight.Load(), metric(t, srv, "ferry_push_dropped_total"))

	// Now a provider answering 503 with Retry-After: retried with backoff.
	ep.mode.Store(endpoint503)
	close(ep.release)
	failing := sends(20, "failing")
	pollMetric(t, srv, `ferry_push_failed_total{kind="unifiedpush",reason="server_error"}`, func(v float64) bool { return v >= 2 })
	pollMetric(t, srv, "ferry_push_retries_total", func(v float64) bool { return v >= 1 })
	t.Logf("✓ latency (send incl. connect+auth): baseline %s; provider hanging %s; provider 503 %s",
		summary(baseline), summary(hanging), summary(failing))
}

func summary(ds []time.Duration) string {
	var max, sum time.Duration
	for _, d := range ds {
		sum += d
		if d > max {
			max = d
		}
	}
	return fmt.Sprintf("mean %v max %v (n=%d)", (sum / time.Duration(len(ds))).Round(time.Millisecond), max.Round(time.Millisecond), len(ds))
}

// ferryd with APNs, FCM and Web Push credentials from its flags pushes to
// the three services (local fakes: APNs over HTTP/2 with TLS, FCM with a
// local OAuth2 token endpoint, a Web Push service answering 410), and its
// debug-level log holds none of the tokens, endpoints, subscription keys
// or credentials.
func TestBlackBoxPushAPNsFCM(t *testing.T) {
	dir := t.TempDir()
	// APNs: an HTTP/2 TLS server; ferryd trusts its certificate through SSL_CERT_FILE.
	apnsKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(apnsKey)
	keyFile := filepath.Join(dir, "AuthKey.p8")
	writeFile(t, keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	apnsGot := make(chan string, 10)
	apns := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		bearer, _ := strings.CutPrefix(r.Header.Get("authorization"), "bearer ")
		_, err := jwt.Parse(bearer, func(*jwt.Token) (any, error) { return &apnsKey.PublicKey, nil },
			jwt.WithValidMethods([]string{"ES256"}), jwt.WithIssuer("TEAM123456"))
		body, _ := io.ReadAll(r.Body)
		apnsGot <- fmt.Sprintf("%s %s %s jwt-ok=%v %s", r.Proto, r.URL.Path, r.Header.Get("apns-topic"), err == nil, body)
	}))
	apns.EnableHTTP2 = true
	apns.StartTLS()
	defer apns.Close()
	certFile := filepath.Join(dir, "ca.pem")
	writeFile(t, certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: apns.Certificate().Raw}))
	t.Setenv("SSL_CERT_FILE", certFile)

	// FCM: a token endpoint and the v1 API.
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	rder, _ := x509.MarshalPKCS8PrivateKey(rk)
	fcmGot := make(chan string, 10)
	fcm := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"access_token":"local-token","token_type":"Bearer","expires_in":3600}`)
			return
		}
		body, _ := io.ReadAll(r.Body)
		fcmGot <- fmt.Sprintf("%s %s %s", r.URL.Path, r.Header.Get("Authorization"), body)
		_, _ = io.WriteString(w, `{"name":"projects/p/messages/1"}`)
	}))
	defer fcm.Close()
	creds, _ := json.Marshal(map[string]string{"type": "service_account", "project_id": "ferry-test",
		"private_key":  string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: rder})),
		"client_email": "push@ferry-test.iam.gserviceaccount.com", "token_uri": "https://oauth2.googleapis.com/token"})
	credFile := filepath.Join(dir, "sa.json")
	writeFile(t, credFile, creds)

	// Web Push: a subscription whose push service answers 410 Gone (the
	// registration is removed, which ferryd logs).
	vapidPriv, vapidPub, err := webpush.GenerateVAPIDKeys()
	if err != nil {
		t.Fatal(err)
	}
	vapidFile := filepath.Join(dir, "vapid.key")
	writeFile(t, vapidFile, []byte(vapidPriv))
	ua, _ := ecdh.P256().GenerateKey(rand.Reader)
	wpAuth := make([]byte, 16)
	_, _ = rand.Read(wpAuth)
	wpGot := make(chan string, 10)
	wp := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		wpGot <- r.URL.Path
		w.WriteHeader(http.StatusGone)
	}))
	defer wp.Close()
	wpEndpoint := wp.URL + "/wpush/v2/dave-subscription-5be1c0ffee"
	sub, _ := json.Marshal(map[string]any{"endpoint": wpEndpoint, "keys": map[string]string{
		"p256dh": base64.RawURLEncoding.EncodeToString(ua.PublicKey().Bytes()),
		"auth":   base64.RawURLEncoding.EncodeToString(wpAuth)}})

	srv := startServer(t, t.TempDir(),
		"--apns-key", keyFile, "--apns-key-id", "KEY1234567", "--apns-team-id", "TEAM123456",
		"--apns-topic", "app.ferry.test", "--apns-endpoint", apns.URL,
		"--fcm-credentials", credFile, "--fcm-token-url", fcm.URL+"/token", "--fcm-endpoint", fcm.URL,
		"--webpush-vapid-public", vapidPub, "--webpush-vapid-private", vapidFile, "--webpush-subscriber", "ops@ferry.test",
		"--push-allow-local-endpoints")
	aliceHome := register(t, srv, "alice")
	bobHome := register(t, srv, "bob")
	carolHome := register(t, srv, "carol")
	daveHome := register(t, srv, "dave")
	tokBytes := make([]byte, 32)
	_, _ = rand.Read(tokBytes)
	token := hex.EncodeToString(tokBytes)
	fcmToken := "fcm-token:carols-phone-4f1d2e"
	mustFerry(t, bobHome, "push", "set", "apns", token)
	mustFerry(t, carolHome, "push", "set", "fcm", fcmToken)
	mustFerry(t, daveHome, "push", "set", "webpush", string(sub))
	offline(t, srv)
	mustFerry(t, aliceHome, "send", "bob", "hello bob")
	mustFerry(t, aliceHome, "send", "carol", "hello carol")
	mustFerry(t, aliceHome, "send", "dave", "hello dave")
	wait := func(c chan string, what string) string {
		select {
		case s := <-c:
			return s
		case <-time.After(30 * time.Second):
			t.Fatalf("no %s push:\n%s", what, srv.log.String())
			return ""
		}
	}
	want := "HTTP/2.0 /3/device/" + token + ` app.ferry.test jwt-ok=true {"aps":{"alert":{"loc-key":"FERRY_WAKE"},"mutable-content":1},"ferry":"wake"}`
	if got := wait(apnsGot, "APNs"); got != want {
		t.Fatalf("APNs got %q\nwant %q", got, want)
	}
	got := wait(fcmGot, "FCM")
	if !strings.HasPrefix(got, "/v1/projects/ferry-test/messages:send Bearer local-token ") ||
		!strings.Contains(got, `"data":{"ferry":"wake"}`) || strings.Contains(got, "hello") || strings.Contains(got, "alice") {
		t.Fatalf("FCM got %q", got)
	}
	if got := wait(wpGot, "Web Push"); got != "/wpush/v2/dave-subscription-5be1c0ffee" {
		t.Fatalf("Web Push got %q", got)
	}
	pollMetric(t, srv, `ferry_push_tokens_removed_total{kind="webpush"}`, func(v float64) bool { return v == 1 })

	// The debug-level log names devices and kinds, never a token, an
	// endpoint, a subscription's keys or the server's credentials (looked
	// for raw, hex and base64, in pieces: see audit).
	srv.term()
	log := srv.log.String()
	for _, line := range []string{"relay: push registration set", "push: registration removed"} {
		if !strings.Contains(log, line) {
			t.Fatalf("ferryd's log lacks %q: the log audit would prove nothing\n%s", line, log)
		}
	}
	logFile := filepath.Join(t.TempDir(), "ferryd.log")
	writeFile(t, logFile, []byte(log))
	wpURL, _ := url.Parse(wpEndpoint)
	needles := map[string][]byte{
		"APNs token": []byte(token), "APNs token bytes": tokBytes, "FCM token": []byte(fcmToken),
		"Web Push endpoint path": []byte(wpURL.Path), "Web Push p256dh": ua.PublicKey().Bytes(), "Web Push auth": wpAuth,
		"APNs key": apnsKey.D.Bytes(), "FCM service account key": rk.D.Bytes(), "FCM access token": []byte("local-token"),
		"VAPID private key": []byte(vapidPriv),
		"message text":      []byte("hello bob"), "message text 2": []byte("hello carol"), "message text 3": []byte("hello dave"),
	}
	for _, f := range audit(t, logFile, needles, nil) {
		t.Error(f)
	}
}

func writeFile(t *testing.T, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(name, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
