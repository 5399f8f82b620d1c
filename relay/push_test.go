package relay

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/push"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

type wake struct {
	dev    wire.DeviceAddr
	reason push.Reason
}

// recordingPush records the relay's Wake calls and hands them to a real
// dispatcher over the test's database.
type recordingPush struct {
	*push.Dispatcher
	store *push.Store
	wakes chan wake
}

func (r *recordingPush) Wake(dev wire.DeviceAddr, reason push.Reason) {
	r.wakes <- wake{dev, reason}
	r.Dispatcher.Wake(dev, reason)
}

// countingProvider counts pushes per device (by endpoint).
type countingProvider struct {
	mu sync.Mutex
	n  map[string]int
}

func (p *countingProvider) Push(_ context.Context, reg *wirepb.PushRegistration, _ push.Reason) error {
	p.mu.Lock()
	p.n[reg.Endpoint]++
	p.mu.Unlock()
	return nil
}

func (p *countingProvider) count(endpoint string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n[endpoint]
}

func newPushEnv(t *testing.T) (*denv, *recordingPush, *countingProvider) {
	t.Helper()
	rp := &recordingPush{wakes: make(chan wake, 100)}
	prov := &countingProvider{n: map[string]int{}}
	var srvRef *Server
	e := newGroupEnv(t, Config{}, device.Options{}, group.Options{}, func(db *pebble.DB, d *Deps) {
		rp.store = push.NewStore(db)
		rp.Dispatcher = push.NewDispatcher(push.Config{Window: time.Hour,
			Online: func(a wire.DeviceAddr) bool { return srvRef.Online(a) }},
			rp.store, map[wirepb.PushKind]push.Provider{wirepb.PushKind_UNIFIEDPUSH: prov})
		d.Push = rp
	})
	srvRef = e.srv
	t.Cleanup(rp.Stop)
	return e, rp, prov
}

func setPush(t *testing.T, c interface {
	Do(context.Context, *wirepb.ClientFrame) (*wirepb.Response, error)
}, endpoint string) error {
	t.Helper()
	_, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_SetPush{SetPush: &wirepb.SetPush{
		Registration: &wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: endpoint}}}})
	return err
}

func nextWake(t *testing.T, rp *recordingPush) wake {
	t.Helper()
	select {
	case w := <-rp.wakes:
		return w
	case <-time.After(10 * time.Second):
		t.Fatal("no wake-up")
		return wake{}
	}
}

// Commits wake offline devices only; wake-ups are coalesced into one push
// per window; an offline device low on prekeys is woken when claimed.
func TestPushWakesOfflineDevices(t *testing.T) {
	e, rp, prov := newPushEnv(t)
	_, ac := e.register("alice")
	bob, bc := e.register("bob")
	carol, cc := e.register("carol")
	for _, c := range []interface {
		Do(context.Context, *wirepb.ClientFrame) (*wirepb.Response, error)
	}{bc, cc} {
		if err := setPush(t, c, "https://up.example/"+map[bool]string{true: "bob", false: "carol"}[c == bc]); err != nil {
			t.Fatal(err)
		}
	}
	uploadKeys(t, cc, 3) // under the low threshold of 10
	cc.Close()
	waitFor(t, func() bool { return !e.srv.Online(wire.DeviceAddr{Account: "carol", Device: 1}) })

	// bob is connected: his commit only nudges his connection.
	if _, err := send(t, ac, "b1", bob, "x"); err != nil {
		t.Fatal(err)
	}
	nextEnvelope(t, bc)
	// carol is not: three sends, three wake-ups, one push.
	for _, id := range []string{"c1", "c2", "c3"} {
		if _, err := send(t, ac, id, carol, "x"); err != nil {
			t.Fatal(err)
		}
	}
	carolAddr := wire.DeviceAddr{Account: "carol", Device: 1}
	for range 3 {
		// Commits are reported in order, so bob's would have come first.
		if w := nextWake(t, rp); w.dev != carolAddr || w.reason != push.ReasonMessage {
			t.Fatalf("wake-up %+v, want carol's for a message", w)
		}
	}
	waitFor(t, func() bool { return prov.count("https://up.example/carol") == 1 })
	if n := prov.count("https://up.example/bob"); n != 0 {
		t.Fatalf("%d pushes to connected bob", n)
	}

	// A claim that leaves offline carol low on prekeys wakes her.
	if _, err := ac.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ClaimBundles{ClaimBundles: &wirepb.ClaimBundles{Username: "carol"}}}); err != nil {
		t.Fatal(err)
	}
	if w := nextWake(t, rp); w.dev != carolAddr || w.reason != push.ReasonPrekeys {
		t.Fatalf("wake-up %+v, want carol's for prekeys", w)
	}
	// Connected bob low on prekeys gets the event, not a push.
	uploadKeys(t, bc, 3)
	if _, err := ac.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ClaimBundles{ClaimBundles: &wirepb.ClaimBundles{Username: "bob"}}}); err != nil {
		t.Fatal(err)
	}
	nextEvent(t, bc, (*wirepb.Event).GetPrekeysLow, func(p *wirepb.PrekeysLow) bool { return p == nil })
	select {
	case w := <-rp.wakes:
		t.Fatalf("unexpected wake-up %+v", w)
	default:
	}
}

func TestSetClearPush(t *testing.T) {
	e, rp, _ := newPushEnv(t)
	bob, bc := e.registerPrimary("bob")
	if err := setPush(t, bc, "http://up.example/x"); wire.CodeOf(err) != wirepb.ErrorCode_PUSH_INVALID {
		t.Fatalf("http endpoint: %v", err)
	}
	_, err := bc.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_SetPush{SetPush: &wirepb.SetPush{
		Registration: &wirepb.PushRegistration{Kind: wirepb.PushKind_APNS, Token: "ab"}}}})
	if wire.CodeOf(err) != wirepb.ErrorCode_PUSH_INVALID {
		t.Fatalf("bad APNs token: %v", err)
	}
	if err := setPush(t, bc, "https://up.example/1"); err != nil {
		t.Fatal(err)
	}
	if err := setPush(t, bc, "https://up.example/2"); err != nil { // replaces
		t.Fatal(err)
	}
	if r, err := rp.store.Get(ctx(t), bob.addr()); err != nil || r.Endpoint != "https://up.example/2" {
		t.Fatalf("stored %v, %v", r, err)
	}
	if _, err := bc.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ClearPush{ClearPush: &wirepb.ClearPush{}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := rp.store.Get(ctx(t), bob.addr()); !errors.Is(err, push.ErrNotFound) {
		t.Fatalf("after ClearPush: %v", err)
	}

	// A removed device's registration goes with it.
	bob2, b2c := e.addDevice("bob")
	if err := setPush(t, b2c, "https://up.example/bob2"); err != nil {
		t.Fatal(err)
	}
	if _, err := publish(t, bc, signList(t, bob.identity, "bob", 1, bob, bob2)); err != nil {
		t.Fatal(err)
	}
	if _, err := bc.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_RemoveDevice{RemoveDevice: &wirepb.RemoveDevice{DeviceId: bob2.id}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := rp.store.Get(ctx(t), bob2.addr()); !errors.Is(err, push.ErrNotFound) {
		t.Fatalf("registration of a removed device: %v", err)
	}
}

func TestSetPushWithoutPushes(t *testing.T) {
	e := newEnv(t, Config{})
	_, c := e.register("bob")
	if err := setPush(t, c, "https://up.example/x"); wire.CodeOf(err) != wirepb.ErrorCode_PUSH_UNSUPPORTED {
		t.Fatalf("SetPush on a server without pushes: %v", err)
	}
	if _, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ClearPush{ClearPush: &wirepb.ClearPush{}}}); err != nil {
		t.Fatalf("ClearPush: %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(2 * time.Millisecond)
	}
}
