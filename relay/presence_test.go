package relay

import (
	"testing"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/time/rate"
)

func nextPresence(t *testing.T, c *client.Conn) *wirepb.PresenceInfo {
	t.Helper()
	return nextEvent(t, c, (*wirepb.Event).GetPresence, func(p *wirepb.PresenceInfo) bool { return p == nil })
}

func nextTyping(t *testing.T, c *client.Conn) *wirepb.TypingEvent {
	t.Helper()
	return nextEvent(t, c, (*wirepb.Event).GetTyping, func(p *wirepb.TypingEvent) bool { return p == nil })
}

func wantCode(t *testing.T, err error, code wirepb.ErrorCode) {
	t.Helper()
	if wire.CodeOf(err) != code {
		t.Fatalf("got %v, want %v", err, code)
	}
}

// Receiving connections make an account online, send-only ones do not;
// subscribers hear each change; the bound is a typed error.
func TestPresenceSubscriptions(t *testing.T) {
	e := newEnv(t, Config{PresenceFlapWindow: -1, MaxPresenceSubscriptions: 2})
	alice, ac := e.register("alice")
	bob, bc := e.register("bob")
	_ = alice
	ps, err := ac.SubscribePresence(ctx(t), []string{"bob", "carol"})
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 2 || ps[0].State != wirepb.PresenceState_ONLINE || ps[1].State != wirepb.PresenceState_PRESENCE_UNKNOWN {
		t.Fatalf("subscribe answered %v", ps)
	}
	bc.Close()
	if p := nextPresence(t, ac); p.Username != "bob" || p.State != wirepb.PresenceState_OFFLINE || p.LastSeenMs == 0 {
		t.Fatalf("after bob left: %v", p)
	}
	so := e.auth(bob, true)
	if ps, err := so.GetPresence(ctx(t), []string{"bob"}); err != nil || ps[0].State != wirepb.PresenceState_OFFLINE {
		t.Fatalf("a send-only connection made bob %v (%v)", ps, err)
	}
	e.auth(bob, false)
	if p := nextPresence(t, ac); p.State != wirepb.PresenceState_ONLINE {
		t.Fatalf("bob back: %v", p)
	}
	_, err = ac.SubscribePresence(ctx(t), []string{"bob", "carol", "dave"})
	wantCode(t, err, wirepb.ErrorCode_TOO_MANY_SUBSCRIPTIONS)
	_, err = so.SetPresencePrivacy(ctx(t), wirepb.PresenceVisibility_NOBODY, []string{"alice"})
	wantCode(t, err, wirepb.ErrorCode_BAD_REQUEST)
	if p, err := so.SetPresencePrivacy(ctx(t), wirepb.PresenceVisibility_NOBODY, nil); err != nil || p.Visibility != wirepb.PresenceVisibility_NOBODY {
		t.Fatalf("set privacy: %v %v", p, err)
	}
	if p := nextPresence(t, ac); p.State != wirepb.PresenceState_PRESENCE_UNKNOWN || p.LastSeenMs != 0 {
		t.Fatalf("after hiding: %v", p)
	}
}

// Typing reaches the other side's connected devices, 1:1 and group, is
// checked like any request, and is rate-limited per device.
func TestTyping(t *testing.T) {
	e := newEnv(t, Config{TypingRate: rate.Every(1 << 40), TypingBurst: 2})
	_, ac := e.register("alice")
	_, bc := e.register("bob")
	_, cc := e.register("carol")
	g, err := groupCreate(t, ac, "g", "bob")
	if err != nil {
		t.Fatal(err)
	}
	if err := ac.Typing(ctx(t), "bob", "", true); err != nil {
		t.Fatal(err)
	}
	if ev := nextTyping(t, bc); ev.Username != "alice" || ev.DeviceId != 1 || ev.GroupId != "" || !ev.Typing || ev.TtlMs != 6000 {
		t.Fatalf("bob got %v", ev)
	}
	if err := ac.Typing(ctx(t), "", g.GroupId, false); err != nil {
		t.Fatal(err)
	}
	if ev := nextTyping(t, bc); ev.GroupId != g.GroupId || ev.Typing {
		t.Fatalf("bob got %v", ev)
	}
	wantCode(t, ac.Typing(ctx(t), "bob", "", true), wirepb.ErrorCode_RATE_LIMITED)
	if n := testutil.ToFloat64(e.srv.metrics.limits.WithLabelValues(limitTypingRate)); n != 1 {
		t.Fatalf("typing_rate rejections = %v", n)
	}
	if err := bc.Typing(ctx(t), "alice", "", true); err != nil {
		t.Fatalf("bob is not limited by alice's typing: %v", err)
	}
	wantCode(t, cc.Typing(ctx(t), "", g.GroupId, true), wirepb.ErrorCode_UNKNOWN_GROUP)
	wantCode(t, cc.Typing(ctx(t), "bob", g.GroupId, true), wirepb.ErrorCode_BAD_REQUEST)
	wantCode(t, cc.Typing(ctx(t), "carol", "", true), wirepb.ErrorCode_BAD_REQUEST)
	wantCode(t, bc.Typing(ctx(t), "nobody", "", true), wirepb.ErrorCode_UNKNOWN_ACCOUNT)
	// Nothing was stored: bob's inbox holds only the group's update.
	items, err := e.inbox.Range(ctx(t), wire.DeviceAddr{Account: "bob", Device: 1}, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	for _, it := range items {
		if it.Env.Type != wirepb.EnvelopeType_GROUP_UPDATE {
			t.Fatalf("bob's inbox holds %v", it.Env)
		}
	}
}

// The subscription bound is announced in Welcome.limits.
func TestPresenceLimitAnnounced(t *testing.T) {
	for _, n := range []int{2, 300} {
		e := newEnv(t, Config{MaxPresenceSubscriptions: n})
		if got := e.dial().Welcome().GetLimits().GetMaxPresenceSubscriptions(); got != uint32(n) {
			t.Fatalf("Welcome announces %d presence subscriptions, want %d", got, n)
		}
	}
}
