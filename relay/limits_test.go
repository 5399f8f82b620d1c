package relay

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/time/rate"
	"google.golang.org/protobuf/proto"
)

// dialFrom connects as if from ip (fakeRemote); "" is the real address.
func (e *env) dialFrom(ip string) (*client.Conn, error) {
	o := client.DialOptions{}
	if ip != "" {
		o.Header = http.Header{"X-Test-Remote": {ip + ":4000"}}
	}
	c, err := client.Dial(ctx(e.t), e.url(), o)
	if err == nil {
		e.t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// registerFrom registers name from ip.
func (e *env) registerFrom(ip, name string) (*dev, *client.Conn, error) {
	e.t.Helper()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	d := &dev{name: name, key: key, reg: 100 + uint32(len(name))}
	c, err := e.dialFrom(ip)
	if err != nil {
		return nil, nil, err
	}
	_, err = c.Register(ctx(e.t), name, key, d.reg)
	return d, c, err
}

// rawFrame writes b as one binary frame on a fresh socket (no Hello) and
// returns the error the server answers with, or the close error.
func rawFrame(t *testing.T, url string, b []byte) error {
	t.Helper()
	ws, _, err := websocket.DefaultDialer.Dial(url+wire.Path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	if err := ws.WriteMessage(websocket.BinaryMessage, b); err != nil {
		return err
	}
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, msg, err := ws.ReadMessage()
	if err != nil {
		return err
	}
	var f wirepb.ServerFrame
	if err := proto.Unmarshal(msg, &f); err != nil {
		t.Fatal(err)
	}
	if pe := f.GetResponse().GetError(); pe != nil {
		return wire.FromProto(pe)
	}
	return nil
}

// othersUnaffected: two fresh accounts, from two other addresses, can
// still register, send and receive.
func othersUnaffected(t *testing.T, e *env) {
	t.Helper()
	_, cc, err := e.registerFrom("10.9.9.1", "carol")
	if err != nil {
		t.Fatalf("carol, another client, registers: %v", err)
	}
	dave, dc, err := e.registerFrom("10.9.9.2", "dave")
	if err != nil {
		t.Fatalf("dave, another client, registers: %v", err)
	}
	if _, err := send(t, cc, "other-1", dave, "hello dave"); err != nil {
		t.Fatalf("another client's send: %v", err)
	}
	if env := nextEnvelope(t, dc); string(env.Content) != "hello dave" {
		t.Fatalf("another client got %q", env.Content)
	}
}

// TestLimits: each limit answers with its typed error (retry_after_ms where
// waiting helps), counts it under its name in
// ferry_relay_limit_rejections_total, and leaves other clients alone.
func TestLimits(t *testing.T) {
	hour := rate.Every(time.Hour)
	tests := map[string]struct {
		cfg        Config
		gro        group.Options
		more       func(*pebble.DB, *Deps)
		limit      string
		code       wirepb.ErrorCode
		retryAfter bool
		hit        func(t *testing.T, e *denv) error // returns the flooder's error
	}{
		"frame size": {
			cfg: Config{MaxFrameBytes: 4096}, limit: limitFrameSize, code: wirepb.ErrorCode_FRAME_TOO_LARGE,
			hit: func(t *testing.T, e *denv) error { return rawFrame(t, e.url(), make([]byte, 4097)) },
		},
		"message size": {
			cfg: Config{MaxMessageBytes: 100}, limit: limitMessageSize, code: wirepb.ErrorCode_MESSAGE_TOO_LARGE,
			hit: func(t *testing.T, e *denv) error {
				_, ac := e.register("alice")
				bob, _ := e.register("bob")
				_, err := send(t, ac, "big", bob, string(make([]byte, 101)))
				return err
			},
		},
		"sends per device (Send, GroupSend, SyncToDevice share one bucket)": {
			cfg: Config{SendRate: hour, SendBurst: 2}, limit: limitSendRate, code: wirepb.ErrorCode_RATE_LIMITED, retryAfter: true,
			hit: func(t *testing.T, e *denv) error {
				a, ac := e.registerPrimary("alice")
				b, _ := e.registerPrimary("bob")
				if _, err := send(t, ac, "s1", &dev{name: "bob", reg: b.reg}, "x"); err != nil {
					t.Fatal(err)
				}
				g, err := groupCreate(t, ac, "g", "bob")
				if err != nil {
					t.Fatal(err)
				}
				if _, err := groupSendAs(t, ac, a.addr(), "s2", g, "x"); err != nil {
					t.Fatal(err)
				}
				_, err = ac.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_SyncToDevice{SyncToDevice: &wirepb.SyncToDevice{
					Username: "bob", DeviceId: 1, RegistrationId: b.reg, ClientMsgId: "s3",
					Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("x")}}})
				return err
			},
		},
		"bundle claims per requester": {
			more: func(db *pebble.DB, d *Deps) {
				d.Prekeys = keys.New(db, keys.Options{ClaimRate: hour, ClaimBurst: 1})
			},
			limit: limitClaimRate, code: wirepb.ErrorCode_RATE_LIMITED, retryAfter: true,
			hit: func(t *testing.T, e *denv) error {
				_, ac := e.register("alice")
				_, bc := e.register("bob")
				uploadKeys(t, bc, 5)
				claim := &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ClaimBundles{ClaimBundles: &wirepb.ClaimBundles{Username: "bob"}}}
				if _, err := ac.Do(ctx(t), claim); err != nil {
					t.Fatalf("first claim: %v", err)
				}
				_, err := ac.Do(ctx(t), claim)
				return err
			},
		},
		"registrations per IP": {
			cfg: Config{RegisterRate: hour, RegisterBurst: 1}, limit: limitRegisterRate, code: wirepb.ErrorCode_RATE_LIMITED, retryAfter: true,
			hit: func(t *testing.T, e *denv) error {
				if _, _, err := e.registerFrom("10.1.1.1", "mallory1"); err != nil {
					t.Fatal(err)
				}
				_, _, err := e.registerFrom("10.1.1.1", "mallory2")
				return err
			},
		},
		"link codes per IP": {
			cfg: Config{LinkStartRate: hour, LinkStartBurst: 1}, limit: limitLinkStartRate, code: wirepb.ErrorCode_RATE_LIMITED, retryAfter: true,
			hit: func(t *testing.T, e *denv) error {
				var err error
				for range 2 {
					pub, _, _ := ed25519.GenerateKey(rand.Reader)
					eph := make([]byte, 32)
					rand.Read(eph)
					c, derr := e.dialFrom("10.1.1.1")
					if derr != nil {
						t.Fatal(derr)
					}
					_, err = c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_LinkStart{LinkStart: &wirepb.LinkStart{
						DeviceKey: pub, RegistrationId: 33, IdentityKey: newIdentity(t).PublicKey().Serialize(), EphemeralKey: eph}}})
				}
				return err
			},
		},
		"link code attempts per device": {
			cfg: Config{LinkAttemptRate: hour, LinkAttemptBurst: 1}, limit: limitLinkAttemptRate, code: wirepb.ErrorCode_RATE_LIMITED, retryAfter: true,
			hit: func(t *testing.T, e *denv) error {
				_, ac := e.registerPrimary("alice")
				guess := make([]byte, 8)
				rand.Read(guess)
				_, err := getLink(t, ac, guess)
				wantErr(t, err, wirepb.ErrorCode_LINK_CODE_INVALID)
				_, err = getLink(t, ac, guess)
				return err
			},
		},
		"group size": {
			gro: group.Options{MaxMembers: 2}, limit: limitGroupSize, code: wirepb.ErrorCode_GROUP_FULL,
			hit: func(t *testing.T, e *denv) error {
				_, ac := e.registerPrimary("alice")
				e.registerPrimary("bob")
				e.registerPrimary("eve")
				_, err := groupCreate(t, ac, "g", "bob", "eve")
				return err
			},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			var more []func(*pebble.DB, *Deps)
			if tc.more != nil {
				more = append(more, tc.more)
			}
			e := newGroupEnv(t, tc.cfg, device.Options{}, tc.gro, more...)
			err := tc.hit(t, e)
			var we *wire.Error
			if !errors.As(err, &we) || we.Code != tc.code {
				t.Fatalf("got %v, want %v", err, tc.code)
			}
			if tc.retryAfter && (we.RetryAfterMs == 0 || !we.Retryable) {
				t.Fatalf("%v: want retryable with retry_after_ms", we)
			}
			if n := testutil.ToFloat64(e.srv.metrics.limits.WithLabelValues(tc.limit)); n < 1 {
				t.Fatalf("ferry_relay_limit_rejections_total{limit=%q} = %v", tc.limit, n)
			}
			othersUnaffected(t, e.env)
		})
	}
}

// TestFrameCutOff: a frame over 4x MaxFrameBytes is not read at all: the
// connection is closed with 1009 (message too big), counted as frame_size.
func TestFrameCutOff(t *testing.T) {
	e := newEnv(t, Config{MaxFrameBytes: 1024})
	err := rawFrame(t, e.url(), make([]byte, 4*1024+1))
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.CloseMessageTooBig {
		t.Fatalf("got %v, want close 1009", err)
	}
	// gorilla writes the 1009 close itself before the reader sees the
	// error and counts it: wait for the count.
	for deadline := time.Now().Add(5 * time.Second); testutil.ToFloat64(e.srv.metrics.limits.WithLabelValues(limitFrameSize)) != 1; {
		if time.Now().After(deadline) {
			t.Fatalf("frame_size rejections = %v", testutil.ToFloat64(e.srv.metrics.limits.WithLabelValues(limitFrameSize)))
		}
		time.Sleep(time.Millisecond)
	}
	othersUnaffected(t, e)
}

// TestConnectionsPerIP: over MaxConnsPerIP open sockets from one address
// the upgrade is answered HTTP 429 with Retry-After; other addresses
// connect; a closed socket frees its place.
func TestConnectionsPerIP(t *testing.T) {
	e := newEnv(t, Config{MaxConnsPerIP: 2, ConnRetryAfter: 3 * time.Second})
	var open []*client.Conn
	for range 2 {
		c, err := e.dialFrom("10.1.1.1")
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, c)
	}
	_, err := e.dialFrom("10.1.1.1")
	var de *client.DialError
	if !errors.As(err, &de) || de.StatusCode != http.StatusTooManyRequests || de.RetryAfter != 3*time.Second || !de.Temporary() {
		t.Fatalf("third connection from one address: %v (%+v)", err, de)
	}
	if n := testutil.ToFloat64(e.srv.metrics.limits.WithLabelValues(limitConnsPerIP)); n != 1 {
		t.Fatalf("connections_per_ip rejections = %v", n)
	}
	othersUnaffected(t, e)
	open[0].Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := e.dialFrom("10.1.1.1")
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a closed socket did not free its place: %v", err)
		}
		time.Sleep(10 * time.Millisecond) // the server's side of the close is not observable from here
	}
	// New connections per IP are limited too: the bucket refills at
	// ConnRate, and the 429 says how long until it does.
	r := newEnv(t, Config{ConnRate: rate.Every(time.Hour), ConnBurst: 2})
	for range 2 {
		c, err := r.dialFrom("10.2.2.2")
		if err != nil {
			t.Fatal(err)
		}
		c.Close() // closing does not give the token back
	}
	_, err = r.dialFrom("10.2.2.2")
	if !errors.As(err, &de) || de.StatusCode != http.StatusTooManyRequests || de.RetryAfter < time.Hour-time.Second {
		t.Fatalf("third new connection from one address: %v (%+v)", err, de)
	}
	if n := testutil.ToFloat64(r.srv.metrics.limits.WithLabelValues(limitConnRate)); n != 1 {
		t.Fatalf("connection_rate rejections = %v", n)
	}
	othersUnaffected(t, r)
	// IPv6 addresses count per /64.
	if k1, k2 := remoteKey("[2001:db8::1]:1"), remoteKey("[2001:db8::2]:2"); k1 != k2 {
		t.Fatalf("one /64, two keys: %s %s", k1, k2)
	}
}

// TestSendLimitRefills: a device over its send rate is told how long to
// wait, and after that wait its send goes through.
func TestSendLimitRefills(t *testing.T) {
	e := newEnv(t, Config{SendRate: 20, SendBurst: 1})
	_, ac := e.register("alice")
	bob, _ := e.register("bob")
	var we *wire.Error
	for i := 0; ; i++ {
		_, err := send(t, ac, fmt.Sprint("m", i), bob, "x")
		if errors.As(err, &we) {
			break
		}
		if err != nil || i > 100 {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	if we.Code != wirepb.ErrorCode_RATE_LIMITED || we.RetryAfterMs == 0 || we.RetryAfterMs > 50 {
		t.Fatalf("got %v (retry after %d ms), want RATE_LIMITED within 50 ms", we, we.RetryAfterMs)
	}
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	time.Sleep(time.Duration(we.RetryAfterMs) * time.Millisecond) // the wait the server asked for
	for {
		if _, err := send(t, ac, "after-wait", bob, "x"); err == nil {
			break
		} else if c.Err() != nil {
			t.Fatalf("send after retry_after_ms: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestLimitOf: the limit label of an error answer, from its code and the
// request kind; errors that are not limits have none.
func TestLimitOf(t *testing.T) {
	tests := []struct {
		kind string
		code wirepb.ErrorCode
		want string
	}{
		{"invalid", wirepb.ErrorCode_FRAME_TOO_LARGE, limitFrameSize},
		{"send", wirepb.ErrorCode_MESSAGE_TOO_LARGE, limitMessageSize},
		{"sync_to_device", wirepb.ErrorCode_MESSAGE_TOO_LARGE, limitMessageSize},
		{"send", wirepb.ErrorCode_RATE_LIMITED, limitSendRate},
		{"group_send", wirepb.ErrorCode_RATE_LIMITED, limitSendRate},
		{"sync_to_device", wirepb.ErrorCode_RATE_LIMITED, limitSendRate},
		{"claim_bundles", wirepb.ErrorCode_RATE_LIMITED, limitClaimRate},
		{"register", wirepb.ErrorCode_RATE_LIMITED, limitRegisterRate},
		{"link_start", wirepb.ErrorCode_RATE_LIMITED, limitLinkStartRate},
		{"get_link", wirepb.ErrorCode_RATE_LIMITED, limitLinkAttemptRate},
		{"approve_link", wirepb.ErrorCode_RATE_LIMITED, limitLinkAttemptRate},
		{"typing", wirepb.ErrorCode_RATE_LIMITED, limitTypingRate},
		{"send", wirepb.ErrorCode_INBOX_FULL, limitInboxQuota},
		{"group_create", wirepb.ErrorCode_GROUP_FULL, limitGroupSize},
		{"approve_link", wirepb.ErrorCode_TOO_MANY_DEVICES, limitDevices},
		{"upload_keys", wirepb.ErrorCode_TOO_MANY_PREKEYS, limitPrekeys},
		{"subscribe_presence", wirepb.ErrorCode_TOO_MANY_SUBSCRIPTIONS, limitPresenceSubs},
		{"send", wirepb.ErrorCode_DEVICE_MISMATCH, ""},
		{"auth", wirepb.ErrorCode_AUTH_FAILED, ""},
		{"unknown", wirepb.ErrorCode_RATE_LIMITED, ""},
	}
	for _, tc := range tests {
		if got := limitOf(tc.kind, tc.code); got != tc.want {
			t.Errorf("limitOf(%s, %v) = %q, want %q", tc.kind, tc.code, got, tc.want)
		}
		if tc.want != "" && !slices.Contains(allLimits, tc.want) {
			t.Errorf("%q is not in allLimits", tc.want)
		}
	}
}
