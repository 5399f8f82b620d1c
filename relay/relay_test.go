package relay

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.mau.fi/libsignal/ecc"
	"google.golang.org/protobuf/proto"
)

// env is a relay over in-memory stores behind an httptest server.
type env struct {
	t     *testing.T
	srv   *Server
	http  *httptest.Server
	inbox *inbox.Store
}

func newEnv(t *testing.T, cfg Config) *env {
	t.Helper()
	return newDevEnv(t, cfg, device.Options{}).env
}

func (e *env) url() string { return "ws" + strings.TrimPrefix(e.http.URL, "http") }

// dev is a registered device with its key.
type dev struct {
	name string
	key  ed25519.PrivateKey
	reg  uint32
}

func (e *env) register(name string) (*dev, *client.Conn) {
	e.t.Helper()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	d := &dev{name: name, key: key, reg: 100 + uint32(len(name))}
	c := e.dial()
	if _, err := c.Register(ctx(e.t), name, key, d.reg); err != nil {
		e.t.Fatalf("register %s: %v", name, err)
	}
	return d, c
}

func (e *env) dial() *client.Conn {
	e.t.Helper()
	c, err := client.Dial(ctx(e.t), e.url(), client.DialOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

func (e *env) auth(d *dev, sendOnly bool) *client.Conn {
	e.t.Helper()
	c := e.dial()
	if _, err := c.Auth(ctx(e.t), d.name, 1, d.key, sendOnly); err != nil {
		e.t.Fatalf("auth %s: %v", d.name, err)
	}
	return c
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

func send(t *testing.T, c *client.Conn, id string, to *dev, body string) (*wirepb.SendResult, error) {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
		ClientMsgId: id, To: to.name, Ciphertexts: []*wirepb.DeviceCiphertext{{
			Username: to.name, DeviceId: 1, RegistrationId: to.reg,
			Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte(body)}}}}})
	if err != nil {
		return nil, err
	}
	return r.GetSend(), nil
}

// nextEvent waits for the next event of a kind.
func nextEvent[T any](t *testing.T, c *client.Conn, get func(*wirepb.Event) T, zero func(T) bool) T {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				t.Fatalf("connection closed: %v", c.Err())
			}
			if v := get(ev); !zero(v) {
				return v
			}
		case <-timeout:
			t.Fatal("no event")
		}
	}
}

func nextEnvelope(t *testing.T, c *client.Conn) *wirepb.Envelope {
	t.Helper()
	return nextEvent(t, c, (*wirepb.Event).GetEnvelope, func(e *wirepb.Envelope) bool { return e == nil })
}

func ack(t *testing.T, c *client.Conn, ids ...uint64) uint32 {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: ids}}})
	if err != nil {
		t.Fatal(err)
	}
	return r.GetAck().GetDeleted()
}

func TestSendDeliverAckReceipt(t *testing.T) {
	e := newEnv(t, Config{})
	alice, ac := e.register("alice")
	bob, bc := e.register("bob")
	_ = alice

	r, err := send(t, ac, "m1", bob, "ct-1")
	if err != nil {
		t.Fatal(err)
	}
	if r.Seq != 1 || r.Duplicate {
		t.Fatalf("send result %+v", r)
	}
	env := nextEnvelope(t, bc)
	if string(env.Content) != "ct-1" || env.Sender != "alice" || env.SenderDevice != 1 || env.Seq != 1 || env.To != "bob" || env.ClientMsgId != "m1" {
		t.Fatalf("envelope %+v", env)
	}
	if n := ack(t, bc, env.Id); n != 1 {
		t.Fatalf("ack deleted %d", n)
	}
	if n := ack(t, bc, env.Id); n != 0 {
		t.Fatalf("second ack deleted %d, acks must be idempotent", n)
	}
	// alice gets a DELIVERED marker: bob.1 has everything up to seq 1.
	rc := nextEnvelope(t, ac)
	if rc.Type != wirepb.EnvelopeType_RECEIPT || rc.Sender != "bob" || rc.SenderDevice != 1 || rc.To != "bob" ||
		!isMarker(rc.Receipt, wirepb.ReceiptKind_DELIVERED, wire.DeviceAddr{Account: "bob", Device: 1}, "bob", "", 1) {
		t.Fatalf("receipt %+v", rc)
	}
	// The reply continues the conversation's sequence.
	if r, err := send(t, bc, "m2", alice, "ct-2"); err != nil || r.Seq != 2 {
		t.Fatalf("reply: %+v %v", r, err)
	}
}

func TestRetrySameIDIsDeduplicated(t *testing.T) {
	e := newEnv(t, Config{})
	_, ac := e.register("alice")
	bob, bc := e.register("bob")
	r1, err := send(t, ac, "same", bob, "x")
	if err != nil {
		t.Fatal(err)
	}
	r2, err := send(t, ac, "same", bob, "x")
	if err != nil {
		t.Fatal(err)
	}
	if !r2.Duplicate || r2.Seq != r1.Seq || r2.ServerTimeMs != r1.ServerTimeMs {
		t.Fatalf("retry %+v, first %+v", r2, r1)
	}
	if _, err := send(t, ac, "other", bob, "y"); err != nil {
		t.Fatal(err)
	}
	first, second := nextEnvelope(t, bc), nextEnvelope(t, bc)
	if first.ClientMsgId != "same" || second.ClientMsgId != "other" {
		t.Fatalf("got %q then %q: the retry was stored twice", first.ClientMsgId, second.ClientMsgId)
	}
}

func TestDeliveryWindowAndQueueEmpty(t *testing.T) {
	e := newEnv(t, Config{DeliveryWindow: 4})
	alice, ac := e.register("alice")
	bob, bc := e.register("bob")
	_ = alice
	bc.Close() // bob offline
	for i := range 10 {
		if _, err := send(t, ac, fmt.Sprint("m", i), bob, "x"); err != nil {
			t.Fatal(err)
		}
	}
	c := e.auth(bob, false)
	var got []*wirepb.Envelope
	for range 4 {
		got = append(got, nextEnvelope(t, c))
	}
	// The window is full: nothing more may arrive until an ack. Prove it by
	// a request round trip, after which any 5th envelope would be queued.
	if _, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_KeyStatus{KeyStatus: &wirepb.KeyStatus{}}}); err != nil {
		t.Fatal(err)
	}
	if n := len(c.Events()); n != 0 {
		t.Fatalf("%d events beyond the window of 4", n)
	}
	sawEmpty := false
	for len(got) < 10 {
		ack(t, c, got[len(got)-1].Id)
		for _, ev := range drain(t, c, 1) {
			if ev.GetQueueEmpty() != nil {
				sawEmpty = true
			} else if env := ev.GetEnvelope(); env != nil {
				got = append(got, env)
			}
		}
	}
	for i, env := range got {
		if env.Seq != uint64(i+1) {
			t.Fatalf("envelope %d has seq %d: out of order", i, env.Seq)
		}
	}
	if sawEmpty {
		t.Fatal("QueueEmpty before the backlog was handed over")
	}
	// Once the window has room again, the server finds the backlog done.
	ack(t, c, got[0].Id, got[1].Id, got[2].Id, got[9].Id)
	nextEvent(t, c, (*wirepb.Event).GetQueueEmpty, func(q *wirepb.QueueEmpty) bool { return q == nil })
}

// drain returns at least n events (waiting for them), plus any already queued.
func drain(t *testing.T, c *client.Conn, n int) []*wirepb.Event {
	t.Helper()
	var out []*wirepb.Event
	timeout := time.After(10 * time.Second)
	for len(out) < n {
		select {
		case ev := <-c.Events():
			out = append(out, ev)
		case <-timeout:
			t.Fatal("no event")
		}
	}
	for len(c.Events()) > 0 {
		out = append(out, <-c.Events())
	}
	return out
}

func TestNewerConnectionReplacesOlder(t *testing.T) {
	e := newEnv(t, Config{})
	bob, old := e.register("bob")
	_ = e.auth(bob, true) // send-only: replaces nothing
	select {
	case <-old.Done():
		t.Fatal("a send-only connection replaced the receiving one")
	default:
	}
	_ = e.auth(bob, false)
	select {
	case <-old.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("old connection still open")
	}
	var ce *client.CloseError
	if !errors.As(old.Err(), &ce) || ce.Code != wire.CloseReplaced || ce.Reconnect() {
		t.Fatalf("old connection ended with %v, want close %d (no reconnect)", old.Err(), wire.CloseReplaced)
	}
}

func TestAuthFailures(t *testing.T) {
	e := newEnv(t, Config{})
	bob, _ := e.register("bob")
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	tests := map[string]struct {
		user string
		dev  uint32
		key  ed25519.PrivateKey
	}{
		"wrong key":      {"bob", 1, other},
		"unknown device": {"bob", 2, bob.key},
		"unknown user":   {"nobody", 1, bob.key},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			c := e.dial()
			_, err := c.Auth(ctx(t), tc.user, tc.dev, tc.key, false)
			if !errors.Is(err, wire.ErrAuthFailed) {
				t.Fatalf("got %v, want AUTH_FAILED", err)
			}
			<-c.Done()
			var ce *client.CloseError
			if !errors.As(c.Err(), &ce) || ce.Code != wire.CloseAuthFailed {
				t.Fatalf("closed with %v", c.Err())
			}
		})
	}
}

func TestSendValidation(t *testing.T) {
	e := newEnv(t, Config{MaxMessageBytes: 100})
	_, ac := e.register("alice")
	bob, _ := e.register("bob")
	big := strings.Repeat("x", 101)
	tests := map[string]struct {
		id, body string
		code     wirepb.ErrorCode
	}{
		"too large":    {"m1", big, wirepb.ErrorCode_MESSAGE_TOO_LARGE},
		"empty id":     {"", "x", wirepb.ErrorCode_BAD_REQUEST},
		"id too long":  {strings.Repeat("a", 65), "x", wirepb.ErrorCode_BAD_REQUEST},
		"empty body":   {"m2", "", wirepb.ErrorCode_BAD_REQUEST},
		"id has space": {"a b", "x", wirepb.ErrorCode_BAD_REQUEST},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := send(t, ac, tc.id, bob, tc.body)
			if wire.CodeOf(err) != tc.code {
				t.Fatalf("got %v, want %v", err, tc.code)
			}
		})
	}
	if _, err := send(t, ac, "m3", &dev{name: "ghost", reg: 1}, "x"); !errors.Is(err, wire.ErrUnknownAccount) {
		t.Fatalf("send to unknown account: %v", err)
	}
}

func TestInboxFullIsAnErrorNotADrop(t *testing.T) {
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	var srv *Server
	ib, _ := inbox.New(db, inbox.Options{MaxDepth: 2, SweepInterval: -1, OnAppend: func(d []wire.DeviceAddr) { srv.OnAppend(d) }})
	srv = New(Config{Logger: slog.New(slog.DiscardHandler)}, Deps{Accounts: device.New(db, device.Options{}), Prekeys: keys.New(db, keys.Options{}), Inbox: ib})
	hs := httptest.NewServer(srv.Handler())
	defer hs.Close()
	e := &env{t: t, srv: srv, http: hs, inbox: ib}
	_, ac := e.register("alice")
	bob, bc := e.register("bob")
	bc.Close()
	for i := range 2 {
		if _, err := send(t, ac, fmt.Sprint("m", i), bob, "x"); err != nil {
			t.Fatal(err)
		}
	}
	_, err = send(t, ac, "m2", bob, "x")
	var we *wire.Error
	if !errors.As(err, &we) || we.Code != wirepb.ErrorCode_INBOX_FULL || !we.Retryable {
		t.Fatalf("got %v, want retryable INBOX_FULL", err)
	}
	if n := testutil.ToFloat64(srv.metrics.limits.WithLabelValues(limitInboxQuota)); n != 1 {
		t.Fatalf("inbox_quota rejections = %v", n)
	}
	othersUnaffected(t, e) // other devices' inboxes have room
}

func TestShutdownTellsClientsToReconnect(t *testing.T) {
	e := newEnv(t, Config{})
	_, c := e.register("bob")
	if err := e.srv.Shutdown(ctx(t)); err != nil {
		t.Fatal(err)
	}
	<-c.Done()
	var ce *client.CloseError
	if !errors.As(c.Err(), &ce) || ce.Code != wire.CloseServerShutdown || !ce.Reconnect() {
		t.Fatalf("closed with %v, want %d", c.Err(), wire.CloseServerShutdown)
	}
	if e.srv.Ready() {
		t.Fatal("ready while draining")
	}
}

// A peer that stops answering pings is dropped within two ping intervals.
func TestDeadPeerIsDetected(t *testing.T) {
	e := newEnv(t, Config{PingInterval: 50 * time.Millisecond})
	bob, _ := e.register("bob")
	// A raw socket that authenticates and then never reads (so never pongs).
	raw, _, err := websocket.DefaultDialer.Dial(e.url()+wire.Path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	hello, _ := proto.Marshal(&wirepb.ClientFrame{Id: 1, Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{MinVersion: 1, MaxVersion: 1}}})
	if err := raw.WriteMessage(websocket.BinaryMessage, hello); err != nil {
		t.Fatal(err)
	}
	_, b, err := raw.ReadMessage()
	if err != nil {
		t.Fatal(err)
	}
	var f wirepb.ServerFrame
	if err := proto.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	ch := f.GetResponse().GetWelcome().GetChallenge()
	sig := ed25519.Sign(bob.key, wire.AuthMessage(ch, "bob", 1))
	authF, _ := proto.Marshal(&wirepb.ClientFrame{Id: 2, Body: &wirepb.ClientFrame_Auth{Auth: &wirepb.Auth{Username: "bob", DeviceId: 1, Signature: sig}}})
	if err := raw.WriteMessage(websocket.BinaryMessage, authF); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	raw.SetPingHandler(func(string) error { return nil }) // swallow pings: no pong
	var closeErr *websocket.CloseError
	for {
		_ = raw.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, _, err := raw.ReadMessage(); err != nil {
			if !errors.As(err, &closeErr) {
				t.Fatalf("read: %v", err)
			}
			break
		}
	}
	if closeErr.Code != wire.ClosePingTimeout {
		t.Fatalf("closed with %d, want %d", closeErr.Code, wire.ClosePingTimeout)
	}
	t.Logf("dropped after %v (ping interval 50ms)", time.Since(start))
}

// uploadKeys uploads an identity key, a signed prekey and n one-time prekeys.
func uploadKeys(t *testing.T, c *client.Conn, n int) {
	t.Helper()
	ident, _ := ecc.GenerateKeyPair()
	spk, _ := ecc.GenerateKeyPair()
	sig := ecc.CalculateSignature(ident.PrivateKey(), spk.PublicKey().Serialize())
	up := &wirepb.UploadKeys{IdentityKey: ident.PublicKey().Serialize(),
		SignedPrekey: &wirepb.SignedPreKey{Id: 1, PublicKey: spk.PublicKey().Serialize(), Signature: sig[:]}}
	for i := range n {
		k, _ := ecc.GenerateKeyPair()
		up.OneTimePrekeys = append(up.OneTimePrekeys, &wirepb.PreKey{Id: uint32(i + 1), PublicKey: k.PublicKey().Serialize()})
	}
	if _, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_UploadKeys{UploadKeys: up}}); err != nil {
		t.Fatal(err)
	}
}

// Claims hand each one-time prekey out once, fill in registration ids, and
// tell the claimed device (if connected) when it runs low.
func TestClaimAndPrekeysLow(t *testing.T) {
	e := newEnv(t, Config{})
	_, ac := e.register("alice")
	bob, bc := e.register("bob")
	uploadKeys(t, bc, 11) // threshold is 10
	seen := map[uint32]bool{}
	for i := range 3 {
		r, err := ac.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ClaimBundles{ClaimBundles: &wirepb.ClaimBundles{Username: "bob"}}})
		if err != nil {
			t.Fatal(err)
		}
		bs := r.GetClaimBundles().GetBundles()
		if len(bs) != 1 || bs[0].DeviceId != 1 || bs[0].RegistrationId != bob.reg || bs[0].OneTimePrekey == nil {
			t.Fatalf("claim %d: %v", i, bs)
		}
		if seen[bs[0].OneTimePrekey.Id] {
			t.Fatalf("one-time prekey %d handed out twice", bs[0].OneTimePrekey.Id)
		}
		seen[bs[0].OneTimePrekey.Id] = true
	}
	low := nextEvent(t, bc, (*wirepb.Event).GetPrekeysLow, func(p *wirepb.PrekeysLow) bool { return p == nil })
	if low.OneTimePrekeys != 9 && low.OneTimePrekeys != 8 {
		t.Fatalf("PrekeysLow says %d left", low.OneTimePrekeys)
	}
	_, err := ac.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ClaimBundles{ClaimBundles: &wirepb.ClaimBundles{Username: "bob", DeviceIds: []uint32{5}}}})
	if !errors.Is(err, wire.ErrUnknownDevice) {
		t.Fatalf("claim of unknown device: %v", err)
	}
}

// A connection that does not finish the handshake in time is closed with
// 4102 (reconnect allowed).
func TestHandshakeTimeout(t *testing.T) {
	e := newEnv(t, Config{HandshakeTimeout: 100 * time.Millisecond})
	raw, _, err := websocket.DefaultDialer.Dial(e.url()+wire.Path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	_ = raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _, err = raw.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != wire.CloseHandshakeTimeout {
		t.Fatalf("got %v, want close %d", err, wire.CloseHandshakeTimeout)
	}
}

// slowInbox holds every Append until released, to catch a commit in flight.
type slowInbox struct {
	Inbox
	started chan struct{}
	release chan struct{}
}

func (s *slowInbox) Append(ctx context.Context, m inbox.Send) (inbox.Accepted, error) {
	s.started <- struct{}{}
	<-s.release
	return s.Inbox.Append(ctx, m)
}

// A ✓ owed when the server shuts down is still written before the close
// frame: the client learns its message was accepted.
func TestShutdownAnswersCommitsInFlight(t *testing.T) {
	e := newEnv(t, Config{})
	slow := &slowInbox{Inbox: e.inbox, started: make(chan struct{}), release: make(chan struct{})}
	e.srv.deps.Inbox = slow
	_, ac := e.register("alice")
	bob, _ := e.register("bob")
	type result struct {
		r   *wirepb.SendResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := send(t, ac, "in-flight", bob, "x")
		done <- result{r, err}
	}()
	<-slow.started
	shut := make(chan error, 1)
	go func() { shut <- e.srv.Shutdown(ctx(t)) }()
	// The server is draining; now let the commit finish.
	// Ready flips first thing in Shutdown; poll for it with a deadline.
	for deadline := time.Now().Add(10 * time.Second); e.srv.Ready(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("Shutdown did not start draining")
		}
	}
	close(slow.release)
	res := <-done
	if res.err != nil || res.r.Seq != 1 {
		t.Fatalf("the owed ✓ was lost: %+v %v", res.r, res.err)
	}
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
	<-ac.Done()
	var ce *client.CloseError
	if !errors.As(ac.Err(), &ce) || ce.Code != wire.CloseServerShutdown {
		t.Fatalf("closed with %v", ac.Err())
	}
}
