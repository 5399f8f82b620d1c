package presence

import (
	"context"
	"testing"
	"time"

	"github.com/ferryhq/ferry/internal/redistest"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/redis/go-redis/v9"
)

// chanSub is a Subscriber whose events can be awaited.
type chanSub struct {
	viewer string
	c      chan *wirepb.PresenceInfo
}

func newChanSub(viewer string) *chanSub {
	return &chanSub{viewer: viewer, c: make(chan *wirepb.PresenceInfo, 64)}
}

func (s *chanSub) Viewer() string { return s.viewer }
func (s *chanSub) Deliver(i *wirepb.PresenceInfo) bool {
	select {
	case s.c <- i:
		return true
	default:
		return false
	}
}

// next awaits s's next event (failing after a generous deadline).
func (s *chanSub) next(t *testing.T) *wirepb.PresenceInfo {
	t.Helper()
	select {
	case i := <-s.c:
		return i
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: no presence event", s.viewer)
		return nil
	}
}

// await reads s's events until one has state want (the bridge may repeat
// a state it already told, never skip the last one).
func (s *chanSub) await(t *testing.T, want wirepb.PresenceState) *wirepb.PresenceInfo {
	t.Helper()
	for {
		if i := s.next(t); i.State == want {
			return i
		}
	}
}

// bridgeNode is one "node": a tracker over its own store, bridged through
// a shared Redis.
type bridgeNode struct {
	tr    *Tracker
	st    *Store
	rdb   *redis.Client
	owned map[string]bool
	stop  func() // stops the bridge (the node died: nothing more is published)
}

func startBridgeNode(t *testing.T, url string, owned ...string) *bridgeNode {
	t.Helper()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	opt, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	opt.MaxRetries = -1
	rdb := redis.NewClient(opt)
	t.Cleanup(func() { rdb.Close() })
	n := &bridgeNode{st: NewStore(db), rdb: rdb, owned: map[string]bool{}}
	for _, o := range owned {
		n.owned[o] = true
	}
	n.tr = NewTracker(n.st, Options{FlapWindow: -1})
	b, err := NewBridge(BridgeConfig{Redis: rdb, Prefix: "test:", Backend: n.st,
		Shard: func(u string) uint32 { return uint32(len(u) % 4) },
		Local: func(u string) bool { return n.owned[u] },
		TTL:   1500 * time.Millisecond, Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	n.tr.SetBridge(b)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); b.Run(ctx) }()
	n.stop = func() { cancel(); <-done }
	t.Cleanup(func() { n.stop(); n.tr.Close() })
	return n
}

func TestBridgeOnlineOffline(t *testing.T) {
	rs := redistest.Start(t)
	a := startBridgeNode(t, rs.URL(), "alice", "carol")
	b := startBridgeNode(t, rs.URL(), "bob", "dave")
	ctx := context.Background()

	alice := newChanSub("alice")
	got, err := a.tr.Subscribe(ctx, alice, []string{"bob", "carol"})
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range got {
		if i.State != wirepb.PresenceState_PRESENCE_UNKNOWN {
			t.Fatalf("never seen: %v, want unknown", i)
		}
	}
	b.tr.Connected("bob")
	if i := alice.await(t, wirepb.PresenceState_ONLINE); i.Username != "bob" {
		t.Fatalf("event %v, want bob online", i)
	}
	res, err := a.tr.Get(ctx, "carol", []string{"bob"})
	if err != nil || res[0].State != wirepb.PresenceState_ONLINE {
		t.Fatalf("Get on the other node: %v, %v; want online", res, err)
	}
	// A viewer on the owner node is answered from the owner's own truth.
	res, err = b.tr.Get(ctx, "dave", []string{"bob"})
	if err != nil || res[0].State != wirepb.PresenceState_ONLINE {
		t.Fatalf("Get on the owner: %v, %v", res, err)
	}

	b.tr.Disconnected("bob")
	i := alice.await(t, wirepb.PresenceState_OFFLINE)
	if i.Username != "bob" || i.LastSeenMs == 0 {
		t.Fatalf("event %v, want bob offline with last seen", i)
	}
	res, err = a.tr.Get(ctx, "carol", []string{"bob"})
	if err != nil || res[0].State != wirepb.PresenceState_OFFLINE || res[0].LastSeenMs != i.LastSeenMs {
		t.Fatalf("Get after offline: %v, %v; want last seen %d", res, err, i.LastSeenMs)
	}

	// Subscribing later answers from the record at once.
	carol := newChanSub("carol")
	got, err = a.tr.Subscribe(ctx, carol, []string{"bob"})
	if err != nil || got[0].State != wirepb.PresenceState_OFFLINE {
		t.Fatalf("late subscribe: %v, %v", got, err)
	}
	a.tr.Unsubscribe(alice)
	a.tr.Unsubscribe(carol)
}

func TestBridgePrivacy(t *testing.T) {
	rs := redistest.Start(t)
	a := startBridgeNode(t, rs.URL(), "alice", "carol")
	b := startBridgeNode(t, rs.URL(), "bob")
	ctx := context.Background()

	alice, carol := newChanSub("alice"), newChanSub("carol")
	for _, s := range []*chanSub{alice, carol} {
		if _, err := a.tr.Subscribe(ctx, s, []string{"bob"}); err != nil {
			t.Fatal(err)
		}
	}
	b.tr.Connected("bob")
	alice.await(t, wirepb.PresenceState_ONLINE)
	carol.await(t, wirepb.PresenceState_ONLINE)

	// Nobody: both lose sight.
	nobody, _ := NormalizePrivacy(wirepb.PresenceVisibility_NOBODY, nil)
	if err := b.tr.SetPrivacy(ctx, "bob", nobody); err != nil {
		t.Fatal(err)
	}
	alice.await(t, wirepb.PresenceState_PRESENCE_UNKNOWN)
	carol.await(t, wirepb.PresenceState_PRESENCE_UNKNOWN)
	if res, _ := a.tr.Get(ctx, "alice", []string{"bob"}); res[0].State != wirepb.PresenceState_PRESENCE_UNKNOWN {
		t.Fatalf("hidden: Get %v, want unknown", res)
	}

	// Allowlist [alice]: alice sees again, carol does not.
	allow, _ := NormalizePrivacy(wirepb.PresenceVisibility_ALLOWLIST, []string{"alice"})
	if err := b.tr.SetPrivacy(ctx, "bob", allow); err != nil {
		t.Fatal(err)
	}
	alice.await(t, wirepb.PresenceState_ONLINE)
	b.tr.Disconnected("bob")
	alice.await(t, wirepb.PresenceState_OFFLINE)
	for _, viewer := range []struct {
		name string
		want wirepb.PresenceState
	}{{"alice", wirepb.PresenceState_OFFLINE}, {"carol", wirepb.PresenceState_PRESENCE_UNKNOWN}} {
		res, err := a.tr.Get(ctx, viewer.name, []string{"bob"})
		if err != nil || res[0].State != viewer.want {
			t.Errorf("Get as %s: %v, %v; want %v", viewer.name, res, err, viewer.want)
		}
	}
	// carol heard nothing since she lost sight.
	select {
	case i := <-carol.c:
		t.Fatalf("carol, not allowed, got %v", i)
	default:
	}
}

func TestBridgeRedisOutage(t *testing.T) {
	rs := redistest.Start(t)
	a := startBridgeNode(t, rs.URL(), "alice")
	b := startBridgeNode(t, rs.URL(), "bob")
	ctx := context.Background()

	alice := newChanSub("alice")
	if _, err := a.tr.Subscribe(ctx, alice, []string{"bob"}); err != nil {
		t.Fatal(err)
	}
	b.tr.Connected("bob")
	alice.await(t, wirepb.PresenceState_ONLINE)

	rs.Kill()
	// The subscriber is told unknown; Get answers unknown, not an error.
	alice.await(t, wirepb.PresenceState_PRESENCE_UNKNOWN)
	res, err := a.tr.Get(ctx, "alice", []string{"bob"})
	if err != nil || res[0].State != wirepb.PresenceState_PRESENCE_UNKNOWN {
		t.Fatalf("Redis down: Get %v, %v; want unknown, no error", res, err)
	}
	carol := newChanSub("carol")
	got, err := a.tr.Subscribe(ctx, carol, []string{"bob"})
	if err != nil || got[0].State != wirepb.PresenceState_PRESENCE_UNKNOWN {
		t.Fatalf("Redis down: Subscribe %v, %v; want unknown, no error", got, err)
	}
	// Changes on the owner while Redis is down neither block nor panic.
	b.tr.Disconnected("bob")
	b.tr.Connected("bob")

	rs.Restart() // empty
	// The owner re-creates its online records and republishes them; the
	// viewer's node re-subscribes and reads them.
	alice.await(t, wirepb.PresenceState_ONLINE)
	res, err = a.tr.Get(ctx, "alice", []string{"bob"})
	if err != nil || res[0].State != wirepb.PresenceState_ONLINE {
		t.Fatalf("after restart: Get %v, %v; want online", res, err)
	}
	carol.await(t, wirepb.PresenceState_ONLINE) // subscribed while Redis was down
	b.tr.Disconnected("bob")
	alice.await(t, wirepb.PresenceState_OFFLINE)
}

// An owner that dies publishes no offline: its online records expire and
// the viewers' node turns them unknown (never a stale "online" for ever).
func TestBridgeOwnerDies(t *testing.T) {
	rs := redistest.Start(t)
	a := startBridgeNode(t, rs.URL(), "alice")
	b := startBridgeNode(t, rs.URL(), "bob")
	ctx := context.Background()
	alice := newChanSub("alice")
	if _, err := a.tr.Subscribe(ctx, alice, []string{"bob"}); err != nil {
		t.Fatal(err)
	}
	b.tr.Connected("bob")
	alice.await(t, wirepb.PresenceState_ONLINE)
	b.stop()
	alice.await(t, wirepb.PresenceState_PRESENCE_UNKNOWN)
	if res, err := a.tr.Get(ctx, "alice", []string{"bob"}); err != nil || res[0].State != wirepb.PresenceState_PRESENCE_UNKNOWN {
		t.Fatalf("Get after the owner died: %v, %v", res, err)
	}
}

func TestBridgeUnwatchUnsubscribes(t *testing.T) {
	rs := redistest.Start(t)
	a := startBridgeNode(t, rs.URL(), "alice")
	startBridgeNode(t, rs.URL(), "bob")
	ctx := context.Background()
	alice := newChanSub("alice")
	if _, err := a.tr.Subscribe(ctx, alice, []string{"bob"}); err != nil {
		t.Fatal(err)
	}
	waitChannels := func(want int64) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			n, err := a.rdb.PubSubNumSub(ctx, "test:presence:s3").Result()
			if err == nil && n["test:presence:s3"] == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("subscribers of bob's channel: %v, %v; want %d", n, err, want)
			}
			time.Sleep(10 * time.Millisecond) // polling Redis: there is no event to await
		}
	}
	waitChannels(1)
	a.tr.Unsubscribe(alice)
	waitChannels(0)
	a.tr.mu.Lock()
	defer a.tr.mu.Unlock()
	if len(a.tr.accts) != 0 {
		t.Fatalf("tracker still holds %d accounts after the last unsubscribe", len(a.tr.accts))
	}
}

func TestRecordView(t *testing.T) {
	allow := int32(wirepb.PresenceVisibility_ALLOWLIST)
	tests := []struct {
		name   string
		r      *Record
		viewer string
		want   wirepb.PresenceState
	}{
		{"nil is unknown", nil, "alice", wirepb.PresenceState_PRESENCE_UNKNOWN},
		{"online", &Record{Username: "bob", Online: true}, "alice", wirepb.PresenceState_ONLINE},
		{"last seen", &Record{Username: "bob", LastSeenMs: 5}, "alice", wirepb.PresenceState_OFFLINE},
		{"never seen", &Record{Username: "bob"}, "alice", wirepb.PresenceState_PRESENCE_UNKNOWN},
		{"nobody", &Record{Username: "bob", Online: true, Visibility: int32(wirepb.PresenceVisibility_NOBODY)}, "alice", wirepb.PresenceState_PRESENCE_UNKNOWN},
		{"allowed", &Record{Username: "bob", Online: true, Visibility: allow, Allow: []string{"alice"}}, "alice", wirepb.PresenceState_ONLINE},
		{"not allowed", &Record{Username: "bob", Online: true, Visibility: allow, Allow: []string{"alice"}}, "carol", wirepb.PresenceState_PRESENCE_UNKNOWN},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.r.view("bob", tc.viewer).State; got != tc.want {
				t.Fatalf("view = %v, want %v", got, tc.want)
			}
		})
	}
}
