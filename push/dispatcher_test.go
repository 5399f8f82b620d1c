package push

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/protobuf/proto"
)

// fakeProvider records pushes and answers with the scripted errors in
// order (nil once they run out). block, if set, holds every push until it
// is closed or the push's context ends.
type fakeProvider struct {
	mu      sync.Mutex
	script  []error
	pushes  []wire.DeviceAddr
	entered chan struct{}
	block   chan struct{}
	calls   chan struct{}
}

func newFake(script ...error) *fakeProvider {
	return &fakeProvider{script: script, entered: make(chan struct{}, 100), calls: make(chan struct{}, 100)}
}

func (f *fakeProvider) Push(ctx context.Context, reg *wirepb.PushRegistration, r Reason) error {
	f.entered <- struct{}{}
	if f.block != nil {
		select {
		case <-f.block:
		case <-ctx.Done():
			f.calls <- struct{}{}
			return &StatusError{Kind: reg.Kind, Err: ctx.Err()}
		}
	}
	f.mu.Lock()
	var err error
	if len(f.script) > 0 {
		err, f.script = f.script[0], f.script[1:]
	}
	f.pushes = append(f.pushes, wire.DeviceAddr{Account: reg.Endpoint})
	f.mu.Unlock()
	f.calls <- struct{}{}
	return err
}

func (f *fakeProvider) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.pushes)
}

// waitCalls waits for n finished calls.
func (f *fakeProvider) waitCalls(t *testing.T, n int) {
	t.Helper()
	for range n {
		select {
		case <-f.calls:
		case <-time.After(10 * time.Second):
			t.Fatal("provider not called")
		}
	}
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

var bob = wire.DeviceAddr{Account: "bob", Device: 1}

func upReg(name string) *wirepb.PushRegistration {
	return &wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: "https://up.example/" + name}
}

func newDispatcher(t *testing.T, cfg Config, p Provider) (*Dispatcher, *Store) {
	t.Helper()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	st := NewStore(db)
	if cfg.RetryMin == 0 {
		cfg.RetryMin, cfg.RetryMax = time.Millisecond, 5*time.Millisecond
	}
	d := NewDispatcher(cfg, st, map[wirepb.PushKind]Provider{wirepb.PushKind_UNIFIEDPUSH: p})
	t.Cleanup(d.Stop)
	return d, st
}

func TestCoalescing(t *testing.T) {
	clk := &clock{t: time.Unix(1e9, 0)}
	f := newFake()
	d, _ := newDispatcher(t, Config{Window: time.Minute, Now: clk.now}, f)
	ctx := context.Background()
	if err := d.Set(ctx, bob, upReg("bob")); err != nil {
		t.Fatal(err)
	}
	for range 20 {
		d.Wake(bob, ReasonMessage)
	}
	f.waitCalls(t, 1)
	if c := testutil.ToFloat64(d.m.coalesced); c != 19 {
		t.Errorf("coalesced %v, want 19", c)
	}
	clk.add(59 * time.Second)
	d.Wake(bob, ReasonPrekeys) // still inside the window
	clk.add(2 * time.Second)
	d.Wake(bob, ReasonMessage) // a new window
	f.waitCalls(t, 1)
	if n := f.count(); n != 2 {
		t.Errorf("%d pushes, want 2", n)
	}
	// The fake has the request before the worker counts it: wait for the count.
	for deadline := time.Now().Add(5 * time.Second); testutil.ToFloat64(d.m.sent.WithLabelValues("unifiedpush")) != 2; {
		if time.Now().After(deadline) {
			t.Fatalf("sent %v, want 2", testutil.ToFloat64(d.m.sent.WithLabelValues("unifiedpush")))
		}
		time.Sleep(time.Millisecond)
	}
}

func TestNoPushWhileOnline(t *testing.T) {
	var online atomic.Bool
	online.Store(true)
	f := newFake()
	d, _ := newDispatcher(t, Config{Online: func(wire.DeviceAddr) bool { return online.Load() }}, f)
	_ = d.Set(context.Background(), bob, upReg("bob"))
	// The device connected after the relay queued its wake-up: no push.
	d.Wake(bob, ReasonMessage)
	waitFor(t, func() bool { return testutil.ToFloat64(d.m.skipped.WithLabelValues("online")) == 1 })
	if f.count() != 0 {
		t.Fatal("pushed an online device")
	}
}

func TestNoRegistration(t *testing.T) {
	f := newFake()
	d, _ := newDispatcher(t, Config{}, f)
	d.Wake(bob, ReasonMessage)
	waitFor(t, func() bool { return testutil.ToFloat64(d.m.skipped.WithLabelValues("no_registration")) == 1 })
	if f.count() != 0 {
		t.Fatal("pushed without a registration")
	}
}

func TestRetries(t *testing.T) {
	unavailable := &StatusError{Kind: wirepb.PushKind_UNIFIEDPUSH, Status: 503, RetryAfter: 2 * time.Millisecond}
	tests := map[string]struct {
		script      []error
		calls       int
		sent        float64
		failedLabel string
		failed      float64
	}{
		"503 twice then ok": {[]error{unavailable, unavailable}, 3, 1, "server_error", 2},
		"429 then ok":       {[]error{&StatusError{Status: 429}}, 2, 1, "rate_limited", 1},
		"transport then ok": {[]error{&StatusError{Err: errors.New("reset")}}, 2, 1, "transport", 1},
		"always 503":        {[]error{unavailable, unavailable, unavailable, unavailable, unavailable}, 4, 0, "server_error", 4},
		"400 not retried":   {[]error{&StatusError{Status: 400}}, 1, 0, "rejected", 1},
		"other error":       {[]error{errors.New("bad key")}, 1, 0, "error", 1},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			f := newFake(tc.script...)
			d, _ := newDispatcher(t, Config{MaxAttempts: 4}, f)
			_ = d.Set(context.Background(), bob, upReg("bob"))
			d.Wake(bob, ReasonMessage)
			f.waitCalls(t, tc.calls)
			waitFor(t, func() bool {
				return testutil.ToFloat64(d.m.failed.WithLabelValues("unifiedpush", tc.failedLabel)) == tc.failed &&
					testutil.ToFloat64(d.m.sent.WithLabelValues("unifiedpush")) == tc.sent
			})
			select {
			case <-f.calls:
				t.Fatal("more attempts than expected")
			case <-time.After(30 * time.Millisecond): // a few backoff periods: nothing more is scheduled
			}
		})
	}
}

func TestInvalidTokenRemoved(t *testing.T) {
	gone := &StatusError{Kind: wirepb.PushKind_UNIFIEDPUSH, Status: 410, Invalid: true}
	f := newFake(gone)
	d, st := newDispatcher(t, Config{}, f)
	ctx := context.Background()
	_ = d.Set(ctx, bob, upReg("bob"))
	d.Wake(bob, ReasonMessage)
	f.waitCalls(t, 1)
	waitFor(t, func() bool { return testutil.ToFloat64(d.m.removed.WithLabelValues("unifiedpush")) == 1 })
	if _, err := st.Get(ctx, bob); !errors.Is(err, ErrNotFound) {
		t.Fatalf("registration after 410: %v", err)
	}
}

// A token the provider rejects does not take away the one the device set
// meanwhile.
func TestDeleteIfKeepsNewer(t *testing.T) {
	db, _ := store.OpenMem()
	defer db.Close()
	st := NewStore(db)
	ctx := context.Background()
	_ = st.Put(ctx, bob, upReg("new"))
	if ok, err := st.DeleteIf(ctx, bob, upReg("old")); ok || err != nil {
		t.Fatalf("DeleteIf(old) = %v, %v", ok, err)
	}
	if r, err := st.Get(ctx, bob); err != nil || r.Endpoint != upReg("new").Endpoint {
		t.Fatalf("Get = %v, %v", r, err)
	}
	if ok, err := st.DeleteIf(ctx, bob, upReg("new")); !ok || err != nil {
		t.Fatalf("DeleteIf(new) = %v, %v", ok, err)
	}
}

// A full queue drops and counts; Wake never blocks, even with every worker
// stuck on a hanging provider.
func TestFullQueueDrops(t *testing.T) {
	f := newFake()
	f.block = make(chan struct{})
	d, _ := newDispatcher(t, Config{Workers: 1, QueueSize: 1, Timeout: time.Minute}, f)
	defer close(f.block)
	ctx := context.Background()
	devs := make([]wire.DeviceAddr, 11)
	for i := range devs {
		devs[i] = wire.DeviceAddr{Account: "u", Device: uint32(i + 1)}
		_ = d.Set(ctx, devs[i], upReg("u"))
	}
	d.Wake(devs[0], ReasonMessage)
	<-f.entered // the one worker is stuck in the provider
	for _, dev := range devs[1:] {
		d.Wake(dev, ReasonMessage) // returns at once: 1 queued, 9 dropped
	}
	if n := testutil.ToFloat64(d.m.dropped); n != 9 {
		t.Fatalf("dropped %v, want 9", n)
	}
	// A dropped device may try again at its next wake-up (not coalesced).
	d.Wake(devs[5], ReasonMessage)
	if n := testutil.ToFloat64(d.m.dropped); n != 10 {
		t.Fatalf("dropped %v, want 10", n)
	}
}

// Stop returns while a provider hangs: in-flight pushes are cancelled.
func TestStopWhileProviderHangs(t *testing.T) {
	f := newFake()
	f.block = make(chan struct{})
	d, _ := newDispatcher(t, Config{Timeout: time.Hour}, f)
	_ = d.Set(context.Background(), bob, upReg("bob"))
	d.Wake(bob, ReasonMessage)
	<-f.entered
	done := make(chan struct{})
	go func() { d.Stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Stop hangs behind a hanging provider")
	}
	d.Wake(bob, ReasonMessage) // after Stop: a no-op
}

func TestSetChecks(t *testing.T) {
	d, st := newDispatcher(t, Config{}, newFake())
	ctx := context.Background()
	tests := map[string]struct {
		reg  *wirepb.PushRegistration
		code wirepb.ErrorCode
	}{
		"unifiedpush":       {upReg("x"), 0},
		"no provider":       {&wirepb.PushRegistration{Kind: wirepb.PushKind_FCM, Token: "abc"}, wirepb.ErrorCode_PUSH_UNSUPPORTED},
		"http endpoint":     {&wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: "http://up.example/x"}, wirepb.ErrorCode_PUSH_INVALID},
		"loopback endpoint": {&wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: "https://127.0.0.1/x"}, wirepb.ErrorCode_PUSH_INVALID},
		"localhost":         {&wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: "https://localhost/x"}, wirepb.ErrorCode_PUSH_INVALID},
		"private endpoint":  {&wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: "https://10.1.2.3/x"}, wirepb.ErrorCode_PUSH_INVALID},
		"credentials":       {&wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: "https://u:p@up.example/x"}, wirepb.ErrorCode_PUSH_INVALID},
		"no kind":           {&wirepb.PushRegistration{Endpoint: "https://up.example/x"}, wirepb.ErrorCode_PUSH_INVALID},
		"nil":               {nil, wirepb.ErrorCode_PUSH_INVALID},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := d.Set(ctx, bob, tc.reg)
			if got := wire.CodeOf(err); (err == nil) != (tc.code == 0) || (err != nil && got != tc.code) {
				t.Fatalf("Set: %v (code %v), want %v", err, got, tc.code)
			}
		})
	}
	if err := d.Clear(ctx, bob); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Get(ctx, bob); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after Clear: %v", err)
	}
}

func TestNormalize(t *testing.T) {
	p256 := append([]byte{4}, make([]byte, 64)...) // not on the curve
	tests := map[string]struct {
		reg *wirepb.PushRegistration
		ok  bool
	}{
		"apns":              {&wirepb.PushRegistration{Kind: wirepb.PushKind_APNS, Token: "AB" + string(make62('c'))}, true},
		"apns short":        {&wirepb.PushRegistration{Kind: wirepb.PushKind_APNS, Token: "abcd"}, false},
		"apns not hex":      {&wirepb.PushRegistration{Kind: wirepb.PushKind_APNS, Token: string(make62('z')) + "zz"}, false},
		"fcm":               {&wirepb.PushRegistration{Kind: wirepb.PushKind_FCM, Token: "d1:APA91b-x_y.z"}, true},
		"fcm slash":         {&wirepb.PushRegistration{Kind: wirepb.PushKind_FCM, Token: "a/../b"}, false},
		"webpush bad point": {&wirepb.PushRegistration{Kind: wirepb.PushKind_WEBPUSH, Endpoint: "https://push.example/x", P256Dh: p256, Auth: make([]byte, 16)}, false},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			n, err := Normalize(tc.reg, false)
			if (err == nil) != tc.ok {
				t.Fatalf("Normalize: %v, want ok=%v", err, tc.ok)
			}
			if err == nil && tc.reg.Kind == wirepb.PushKind_APNS && n.Token != "ab"+string(make62('c')) {
				t.Errorf("token not lower-cased: %q", n.Token)
			}
		})
	}
}

func make62(c byte) []byte {
	b := make([]byte, 62)
	for i := range b {
		b[i] = c
	}
	return b
}

func FuzzNormalize(f *testing.F) {
	f.Add(int32(4), "", "https://up.example/x", []byte{}, []byte{})
	f.Add(int32(1), "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789", "", []byte{}, []byte{})
	f.Add(int32(3), "", "https://[::1]:99/x#y", make([]byte, 65), make([]byte, 16))
	f.Fuzz(func(t *testing.T, kind int32, token, endpoint string, p256, auth []byte) {
		reg := &wirepb.PushRegistration{Kind: wirepb.PushKind(kind), Token: token, Endpoint: endpoint, P256Dh: p256, Auth: auth}
		n, err := Normalize(reg, false)
		if err != nil {
			if wire.CodeOf(err) != wirepb.ErrorCode_PUSH_INVALID {
				t.Fatalf("error %v has code %v", err, wire.CodeOf(err))
			}
			return
		}
		if _, err := Normalize(n, false); err != nil {
			t.Fatalf("normalized registration is refused: %v", err)
		}
	})
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

func FuzzRetryAfter(f *testing.F) {
	f.Add("120")
	f.Add("Wed, 21 Oct 2015 07:28:00 GMT")
	f.Add("-1")
	f.Fuzz(func(t *testing.T, h string) {
		if d := retryAfter(h, time.Unix(1e9, 0)); d < 0 {
			t.Fatalf("retryAfter(%q) = %v", h, d)
		}
	})
}

func TestBackoff(t *testing.T) {
	d := &Dispatcher{cfg: Config{RetryMin: time.Second, RetryMax: time.Minute}}
	tests := map[string]struct {
		attempt  int
		after    time.Duration
		min, max time.Duration
	}{
		"first":                    {1, 0, 750 * time.Millisecond, 1250 * time.Millisecond},
		"third doubles twice":      {3, 0, 3 * time.Second, 5 * time.Second},
		"Retry-After is honoured":  {1, 30 * time.Second, 30 * time.Second, 30 * time.Second},
		"Retry-After is capped":    {1, 2 * time.Hour, time.Minute, time.Minute},
		"many attempts are capped": {40, 0, 45 * time.Second, time.Minute},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			for range 50 {
				if b := d.backoff(tc.attempt, tc.after); b < tc.min || b > tc.max {
					t.Fatalf("backoff(%d, %v) = %v, want in [%v, %v]", tc.attempt, tc.after, b, tc.min, tc.max)
				}
			}
		})
	}
}

// What the server writes for a push registration, exactly: one record per
// device under 'p' username 0x00 device(4), holding only the fields its
// kind uses (a token or an endpoint, plus the subscription keys for Web
// Push); clearing it (or removing the device: relay.TestSetClearPush)
// leaves nothing.
func TestStoredRecord(t *testing.T) {
	ctx := context.Background()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	d := NewDispatcher(Config{}, NewStore(db), map[wirepb.PushKind]Provider{wirepb.PushKind_UNIFIEDPUSH: newFake()})
	defer d.Stop()
	bob := wire.DeviceAddr{Account: "bob", Device: 2}
	// Fields another kind would use are dropped before storing.
	in := &wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: "https://up.example/bob",
		Token: "not-for-unifiedpush", P256Dh: []byte{4, 1, 2}, Auth: []byte("0123456789abcdef")}
	if err := d.Set(ctx, bob, in); err != nil {
		t.Fatal(err)
	}
	kvs, err := store.Dump(db)
	if err != nil {
		t.Fatal(err)
	}
	wantVal, _ := proto.Marshal(&wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: "https://up.example/bob"})
	wantKey := append([]byte("pbob\x00"), 0, 0, 0, 2)
	if len(kvs) != 1 || !bytes.Equal(kvs[0].Key, wantKey) || !bytes.Equal(kvs[0].Value, wantVal) {
		t.Fatalf("stored %q, want one record %q = %x", kvs, wantKey, wantVal)
	}
	if err := d.Clear(ctx, bob); err != nil {
		t.Fatal(err)
	}
	if kvs, _ := store.Dump(db); len(kvs) != 0 {
		t.Fatalf("after Clear: %q", kvs)
	}
}
