package presence

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

type fakeSub struct {
	viewer string
	room   int // queue capacity; Deliver fails when full
	mu     sync.Mutex
	got    []*wirepb.PresenceInfo
}

func (f *fakeSub) Viewer() string { return f.viewer }
func (f *fakeSub) Deliver(i *wirepb.PresenceInfo) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.room > 0 && len(f.got) >= f.room {
		return false
	}
	f.got = append(f.got, i)
	return true
}
func (f *fakeSub) events() []*wirepb.PresenceInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*wirepb.PresenceInfo(nil), f.got...)
}

// waitEvents polls until s holds n events or a deadline passes.
func waitEvents(t *testing.T, s *fakeSub, n int) []*wirepb.PresenceInfo {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if ev := s.events(); len(ev) >= n || time.Now().After(deadline) {
			if len(ev) < n {
				t.Fatalf("got %d events %v, want %d", len(ev), ev, n)
			}
			return ev
		}
		time.Sleep(time.Millisecond)
	}
}

func newStoreTracker(t *testing.T, o Options) (*Tracker, *Store) {
	t.Helper()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	st := NewStore(db)
	tr := NewTracker(st, o)
	t.Cleanup(tr.Close)
	return tr, st
}

func TestOnlineOfflineWithoutCoalescing(t *testing.T) {
	clock := time.UnixMilli(1_700_000_000_000)
	tr, st := newStoreTracker(t, Options{FlapWindow: -1, Now: func() time.Time { return clock }})
	ctx := context.Background()
	alice := &fakeSub{viewer: "alice"}
	got, err := tr.Subscribe(ctx, alice, []string{"bob"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].State != wirepb.PresenceState_PRESENCE_UNKNOWN {
		t.Fatalf("never seen: %v, want unknown", got)
	}
	tr.Connected("bob")
	tr.Connected("bob") // a second device
	tr.Disconnected("bob")
	tr.Disconnected("bob")
	ev := waitEvents(t, alice, 2)
	if ev[0].State != wirepb.PresenceState_ONLINE || ev[1].State != wirepb.PresenceState_OFFLINE || ev[1].LastSeenMs != clock.UnixMilli() {
		t.Fatalf("events %v, want online then offline at %d", ev, clock.UnixMilli())
	}
	if ts, ok, err := st.LastSeen(ctx, "bob"); err != nil || !ok || !ts.Equal(clock) {
		t.Fatalf("stored last seen %v %v %v", ts, ok, err)
	}
	// A new tracker (a restart) answers from the store.
	tr2 := NewTracker(st, Options{})
	defer tr2.Close()
	if got, _ := tr2.Get(ctx, "alice", []string{"bob"}); got[0].State != wirepb.PresenceState_OFFLINE || got[0].LastSeenMs != clock.UnixMilli() {
		t.Fatalf("after restart: %v", got)
	}
}

func TestFlapCoalescedToNoEvent(t *testing.T) {
	tr, _ := newStoreTracker(t, Options{FlapWindow: time.Hour})
	ctx := context.Background()
	tr.Connected("bob")
	alice := &fakeSub{viewer: "alice"}
	if got, _ := tr.Subscribe(ctx, alice, []string{"bob"}); got[0].State != wirepb.PresenceState_ONLINE {
		t.Fatalf("got %v, want online", got)
	}
	for range 5 {
		tr.Disconnected("bob")
		if got, _ := tr.Get(ctx, "alice", []string{"bob"}); got[0].State != wirepb.PresenceState_ONLINE {
			t.Fatalf("within the window: %v, want still online", got)
		}
		tr.Connected("bob")
	}
	if ev := alice.events(); len(ev) != 0 {
		t.Fatalf("flapping made events %v", ev)
	}
}

func TestOfflineAfterFlapWindow(t *testing.T) {
	tr, _ := newStoreTracker(t, Options{FlapWindow: 20 * time.Millisecond})
	alice := &fakeSub{viewer: "alice"}
	if _, err := tr.Subscribe(context.Background(), alice, []string{"bob"}); err != nil {
		t.Fatal(err)
	}
	tr.Connected("bob")
	tr.Disconnected("bob")
	ev := waitEvents(t, alice, 2)
	if ev[0].State != wirepb.PresenceState_ONLINE || ev[1].State != wirepb.PresenceState_OFFLINE || ev[1].LastSeenMs == 0 {
		t.Fatalf("events %v", ev)
	}
}

func TestPrivacy(t *testing.T) {
	ctx := context.Background()
	allow, err := NormalizePrivacy(wirepb.PresenceVisibility_ALLOWLIST, []string{"carol", "alice", "carol"})
	if err != nil || len(allow.Allow) != 2 || allow.Allow[0] != "alice" {
		t.Fatalf("normalize: %v %v", allow, err)
	}
	tests := map[string]struct {
		p           *wirepb.PresencePrivacy
		alice, dave wirepb.PresenceState
	}{
		"everyone":  {&wirepb.PresencePrivacy{Visibility: wirepb.PresenceVisibility_EVERYONE}, wirepb.PresenceState_ONLINE, wirepb.PresenceState_ONLINE},
		"nobody":    {&wirepb.PresencePrivacy{Visibility: wirepb.PresenceVisibility_NOBODY}, wirepb.PresenceState_PRESENCE_UNKNOWN, wirepb.PresenceState_PRESENCE_UNKNOWN},
		"allowlist": {allow, wirepb.PresenceState_ONLINE, wirepb.PresenceState_PRESENCE_UNKNOWN},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			tr, _ := newStoreTracker(t, Options{FlapWindow: -1})
			if err := tr.SetPrivacy(ctx, "bob", tc.p); err != nil {
				t.Fatal(err)
			}
			tr.Connected("bob")
			for viewer, want := range map[string]wirepb.PresenceState{"alice": tc.alice, "dave": tc.dave, "bob": wirepb.PresenceState_ONLINE} {
				got, err := tr.Get(ctx, viewer, []string{"bob"})
				if err != nil || got[0].State != want || (want == wirepb.PresenceState_PRESENCE_UNKNOWN && got[0].LastSeenMs != 0) {
					t.Fatalf("%s sees %v (%v), want %v", viewer, got, err, want)
				}
			}
		})
	}
}

func TestPrivacyChangeTellsWatchers(t *testing.T) {
	ctx := context.Background()
	tr, st := newStoreTracker(t, Options{FlapWindow: -1})
	tr.Connected("bob")
	alice := &fakeSub{viewer: "alice"}
	if _, err := tr.Subscribe(ctx, alice, []string{"bob"}); err != nil {
		t.Fatal(err)
	}
	if err := tr.SetPrivacy(ctx, "bob", &wirepb.PresencePrivacy{Visibility: wirepb.PresenceVisibility_NOBODY}); err != nil {
		t.Fatal(err)
	}
	tr.Disconnected("bob") // hidden: alice hears nothing
	tr.Connected("bob")
	if err := tr.SetPrivacy(ctx, "bob", &wirepb.PresencePrivacy{Visibility: wirepb.PresenceVisibility_EVERYONE}); err != nil {
		t.Fatal(err)
	}
	ev := waitEvents(t, alice, 2)
	if len(ev) != 2 || ev[0].State != wirepb.PresenceState_PRESENCE_UNKNOWN || ev[1].State != wirepb.PresenceState_ONLINE {
		t.Fatalf("events %v, want unknown then online", ev)
	}
	if p, err := st.Privacy(ctx, "bob"); err != nil || p.Visibility != wirepb.PresenceVisibility_EVERYONE {
		t.Fatalf("stored privacy %v %v", p, err)
	}
}

func TestSubscriptionBoundAndDrops(t *testing.T) {
	ctx := context.Background()
	tr, _ := newStoreTracker(t, Options{FlapWindow: -1, MaxSubscriptions: 2})
	s := &fakeSub{viewer: "alice", room: 1}
	_, err := tr.Subscribe(ctx, s, []string{"bob", "carol", "dave"})
	if we := (*wire.Error)(nil); !errors.As(err, &we) || we.Code != wirepb.ErrorCode_TOO_MANY_SUBSCRIPTIONS {
		t.Fatalf("over the bound: %v", err)
	}
	if _, err := tr.Subscribe(ctx, s, []string{"bob", "bob", "carol"}); err != nil {
		t.Fatalf("duplicates count once: %v", err)
	}
	if _, err := tr.Subscribe(ctx, s, []string{"No"}); err == nil {
		t.Fatal("a bad name was accepted")
	}
	tr.Connected("bob")
	tr.Connected("carol") // the queue is full: dropped, never blocks
	if ev := s.events(); len(ev) != 1 {
		t.Fatalf("events %v", ev)
	}
	// Replacing the set drops the old subscriptions; Unsubscribe the rest.
	if _, err := tr.Subscribe(ctx, s, []string{"carol"}); err != nil {
		t.Fatal(err)
	}
	tr.Unsubscribe(s)
	tr.Disconnected("bob")
	tr.Disconnected("carol")
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.accts) != 0 || len(tr.subs) != 0 {
		t.Fatalf("state left behind: %d accounts, %d subscribers", len(tr.accts), len(tr.subs))
	}
}

// What presence writes, exactly: per account its last-seen time (8 bytes,
// Unix ms, big-endian) and its privacy setting. Who is online, who watches
// whom and the events pushed are never written.
func TestStoredRecords(t *testing.T) {
	ctx := context.Background()
	now := time.UnixMilli(1767225600123)
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tr := NewTracker(NewStore(db), Options{FlapWindow: -1, Now: func() time.Time { return now }})
	defer tr.Close()
	alice := &fakeSub{viewer: "alice"}
	if _, err := tr.Subscribe(ctx, alice, []string{"bob", "carol"}); err != nil {
		t.Fatal(err)
	}
	tr.Connected("bob")
	tr.Connected("carol") // still online at the end: nothing stored for carol
	tr.Disconnected("bob")
	priv, err := NormalizePrivacy(wirepb.PresenceVisibility_ALLOWLIST, []string{"alice"})
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.SetPrivacy(ctx, "bob", priv); err != nil {
		t.Fatal(err)
	}
	waitEvents(t, alice, 3) // bob online, carol online, bob offline
	kvs, err := store.Dump(db)
	if err != nil {
		t.Fatal(err)
	}
	privBytes, _ := proto.MarshalOptions{Deterministic: true}.Marshal(priv)
	want := []store.KV{
		{Key: []byte("osbob"), Value: binary.BigEndian.AppendUint64(nil, uint64(now.UnixMilli()))},
		{Key: []byte("ovbob"), Value: privBytes},
	}
	if len(kvs) != len(want) {
		t.Fatalf("stored %d records %q, want %d", len(kvs), kvs, len(want))
	}
	for i := range want {
		if !bytes.Equal(kvs[i].Key, want[i].Key) || !bytes.Equal(kvs[i].Value, want[i].Value) {
			t.Errorf("record %d: %q = %x, want %q = %x", i, kvs[i].Key, kvs[i].Value, want[i].Key, want[i].Value)
		}
	}
}
