package route

import (
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/internal/redistest"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/relay"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/redis/go-redis/v9"
)

var secret = []byte("0123456789abcdef0123456789abcdef")

func TestSignVerify(t *testing.T) {
	now := time.Now()
	body := []byte("a call")
	good := sign(secret, body, now)
	tests := []struct {
		name   string
		secret []byte
		body   []byte
		header string
		now    time.Time
		ok     bool
	}{
		{"good", secret, body, good, now, true},
		{"skew within bound", secret, body, good, now.Add(maxSkew - time.Second), true},
		{"other secret", []byte("another secret of 32 bytes......"), body, good, now, false},
		{"tampered body", secret, []byte("a calL"), good, now, false},
		{"too old", secret, body, good, now.Add(maxSkew + time.Second), false},
		{"from the future", secret, body, good, now.Add(-maxSkew - time.Second), false},
		{"no header", secret, body, "", now, false},
		{"no mac", secret, body, strings.Split(good, ".")[0], now, false},
		{"bad hex", secret, body, strings.Split(good, ".")[0] + ".zz", now, false},
		{"bad time", secret, body, "x." + strings.Split(good, ".")[1], now, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := verify(tc.secret, tc.body, tc.header, tc.now)
			if (err == nil) != tc.ok {
				t.Fatalf("verify = %v, want ok=%v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrAuth) {
				t.Fatalf("verify error %v is not ErrAuth", err)
			}
		})
	}
}

// FuzzVerify: the header of an outside caller never panics the check, and
// only the right MAC passes.
func FuzzVerify(f *testing.F) {
	now := time.UnixMilli(1_700_000_000_000)
	f.Add([]byte("body"), sign(secret, []byte("body"), now))
	f.Add([]byte(""), "1700000000000.")
	f.Add([]byte("x"), "..")
	f.Fuzz(func(t *testing.T, body []byte, header string) {
		if verify(secret, body, header, now) != nil {
			return
		}
		ts, sig, _ := strings.Cut(header, ".")
		mac := hmac.New(sha256.New, secret)
		mac.Write([]byte(ts + "."))
		mac.Write(body)
		if !strings.EqualFold(sig, hex.EncodeToString(mac.Sum(nil))) {
			t.Fatalf("header %q passed but is not the MAC of the body", header)
		}
	})
}

func TestNodeURL(t *testing.T) {
	for in, want := range map[string]string{
		"ws://127.0.0.1:7600":        "http://127.0.0.1:7600/v1/node",
		"wss://chat.example/v1/ws":   "https://chat.example/v1/node",
		"http://10.0.0.1:80?x=1":     "http://10.0.0.1:80/v1/node",
		"https://node-3.example:443": "https://node-3.example:443/v1/node",
	} {
		got, err := nodeURL(in)
		if err != nil || got != want {
			t.Errorf("nodeURL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := nodeURL("ftp://x"); err == nil {
		t.Error("nodeURL accepted ftp://")
	}
}

// testNode is one in-process cluster node: its stores on an in-memory
// Pebble, a cluster.Node, a Router and its call handler on httptest.
type testNode struct {
	node   *cluster.Node
	r      *Router
	local  Locals
	routed struct {
		accounts relay.Accounts
		inbox    relay.Inbox
	}
	srv *httptest.Server
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func newTestNode(t *testing.T, rdb redis.UniversalClient, id string, bootstrap bool) *testNode {
	t.Helper()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	var h atomic.Pointer[http.Handler]
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { (*h.Load()).ServeHTTP(w, r) }))
	ib, err := inbox.New(db, inbox.Options{Logger: quiet, FanoutInline: 4, FanoutChunk: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Close()
		_ = ib.Close()
		_ = db.Close()
	})
	node, err := cluster.NewNode(rdb, cluster.NewStore(db), cluster.Config{NodeID: id, Advertise: "ws" + strings.TrimPrefix(srv.URL, "http"),
		Shards: 8, Bootstrap: bootstrap, NoFreshClaims: true, LeaseTTL: 5 * time.Second, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if err := node.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	r, err := NewRouter(Config{Node: node, Secret: secret, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	n := &testNode{node: node, r: r, srv: srv}
	acc := device.New(db, device.Options{})
	n.local = Locals{Accounts: acc, Prekeys: keys.New(db, keys.Options{}), Inbox: ib,
		Groups: group.New(db, r.Accounts(acc), group.Options{AcceptID: r.AcceptGroupID})}
	n.routed.accounts, _, n.routed.inbox, _ = r.Deps(n.local)
	handler := r.Handler()
	h.Store(&handler)
	return n
}

// nameOn returns a username starting with prefix whose shard is s.
func nameOn(t *testing.T, m cluster.ShardMap, s cluster.ShardID, prefix string) string {
	t.Helper()
	for i := 0; i < 100000; i++ {
		if name := prefix + strconv.Itoa(i); m.Account(name) == s {
			return name
		}
	}
	t.Fatalf("no username on shard %d", s)
	return ""
}

func register(t *testing.T, n *testNode, name string) wire.DeviceAddr {
	t.Helper()
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	d, err := n.routed.accounts.Register(context.Background(), name, pub, 7)
	if err != nil {
		t.Fatalf("register %s: %v", name, err)
	}
	return wire.DeviceAddr{Account: name, Device: d.Id}
}

// A 1:1 send from a node's account to another node's: the conversation's
// owner allocates the sequence, each part is stored on its owner once, a
// retry is a duplicate everywhere, and only the owner serves the inbox.
func TestSplitSend(t *testing.T) {
	rs := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: rs.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	ctx := context.Background()
	a := newTestNode(t, rdb, "a", true)
	b := newTestNode(t, rdb, "b", false)
	for s, n := range map[cluster.ShardID]*testNode{0: a, 1: a, 2: b, 3: b} {
		if _, err := n.node.Claim(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	m := a.r.ShardMap()
	// lo on a, hi on b, with lo < hi so that "d:lo:hi" is lo's (a's).
	lo, hi := nameOn(t, m, 0, "alice"), nameOn(t, m, 2, "zed")
	alice, alice2 := register(t, a, lo), wire.DeviceAddr{}
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	d2, err := a.local.Accounts.AddDevice(ctx, lo, pub, 8)
	if err != nil {
		t.Fatal(err)
	}
	alice2 = wire.DeviceAddr{Account: lo, Device: d2.Id}
	bob := register(t, b, hi)

	env := func(text string) *wirepb.Envelope {
		return &wirepb.Envelope{Sender: alice.Account, SenderDevice: alice.Device, To: bob.Account,
			Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte(text), ClientMsgId: text}
	}
	send := func(n *testNode, from wire.DeviceAddr, id string, to ...wire.DeviceAddr) inbox.Accepted {
		t.Helper()
		var es []inbox.Entry
		for _, d := range to {
			es = append(es, inbox.Entry{To: d, Env: env(id)})
		}
		acc, err := n.routed.inbox.Append(ctx, inbox.Send{Sender: from, ClientMsgID: id,
			Conversation: "d:" + lo + ":" + hi, Entries: es})
		if err != nil {
			t.Fatalf("send %s: %v", id, err)
		}
		return acc
	}
	// alice (on a) to bob (on b) and her second device; then bob to alice.
	if acc := send(a, alice, "m1", bob, alice2); acc.Seq != 1 || acc.Duplicate {
		t.Fatalf("m1 = %+v, want seq 1", acc)
	}
	if acc := send(a, alice, "m1", bob, alice2); acc.Seq != 1 || !acc.Duplicate {
		t.Fatalf("m1 again = %+v, want a duplicate of seq 1", acc)
	}
	if acc := send(b, bob, "m2", alice, alice2); acc.Seq != 2 || acc.Duplicate {
		t.Fatalf("m2 from bob = %+v, want seq 2 (one counter for both directions)", acc)
	}
	// Only the owners serve the inboxes, each entry once.
	count := func(n *testNode, dev wire.DeviceAddr) []uint64 {
		t.Helper()
		items, err := n.routed.inbox.Range(ctx, dev, 0, 100)
		if err != nil {
			t.Fatalf("range %s: %v", dev, err)
		}
		var seqs []uint64
		for _, it := range items {
			seqs = append(seqs, it.Env.Seq)
		}
		return seqs
	}
	if got := count(b, bob); len(got) != 1 || got[0] != 1 {
		t.Fatalf("bob's inbox seqs %v, want [1]", got)
	}
	if got := count(a, alice2); len(got) != 2 || got[0] != 1 || got[1] != 2 {
		t.Fatalf("alice.2's inbox seqs %v, want [1 2]", got)
	}
	if _, err := a.routed.inbox.Range(ctx, bob, 0, 10); wire.CodeOf(err) != wirepb.ErrorCode_UNAVAILABLE {
		t.Fatalf("bob's inbox read on a: %v, want UNAVAILABLE", err)
	}
	// Remote account reads go to the owner.
	if acct, err := a.routed.accounts.Account(ctx, bob.Account); err != nil || len(acct.Devices) != 1 {
		t.Fatalf("bob's account from a: %v, %v", acct, err)
	}
	if _, err := a.routed.accounts.Account(ctx, nameOn(t, m, 2, "yves")); wire.CodeOf(err) != wirepb.ErrorCode_UNKNOWN_ACCOUNT {
		t.Fatalf("unknown account from a: %v, want UNKNOWN_ACCOUNT", err)
	}
	// b gives bob's shard up: a's send fails retryably and stores nothing.
	if err := b.node.Release(ctx, m.Account(bob.Account)); err != nil {
		t.Fatal(err)
	}
	b.node.Hold(m.Account(bob.Account))
	_, err = a.routed.inbox.Append(ctx, inbox.Send{Sender: alice, ClientMsgID: "m3",
		Conversation: "d:" + lo + ":" + hi, Entries: []inbox.Entry{{To: bob, Env: env("m3")}}})
	if we := (*wire.Error)(nil); !errors.As(err, &we) || !we.Retryable {
		t.Fatalf("send to a shard nobody serves: %v, want a retryable error", err)
	}
	// alice's shard owns the conversation, so its part (with m3's sequence
	// number) committed first; but the send is not whole, and the sender's
	// own dedup record (the seal, Lookup's answer) is not there yet.
	if _, found, err := a.routed.inbox.Lookup(ctx, alice, "m3"); err != nil || found {
		t.Fatalf("Lookup m3 after a failed part = %v, %v; want not found", found, err)
	}
	if _, found, err := a.routed.inbox.Lookup(ctx, alice, "m1"); err != nil || !found {
		t.Fatalf("Lookup m1 (stored everywhere) = %v, %v; want found", found, err)
	}
	// b takes it back; the retry lands once.
	b.node.Unhold(m.Account(bob.Account))
	if _, err := b.node.Claim(ctx, m.Account(bob.Account)); err != nil {
		t.Fatal(err)
	}
	a.r.forget(m.Account(bob.Account))
	send(a, alice, "m3", bob)
	if acc, found, err := a.routed.inbox.Lookup(ctx, alice, "m3"); err != nil || !found || acc.Seq != 3 {
		t.Fatalf("Lookup m3 after the retry = %+v, %v, %v; want seq 3", acc, found, err)
	}
	if got := count(b, bob); len(got) != 2 || got[1] != 3 {
		t.Fatalf("bob's inbox seqs %v, want [1 3]", got)
	}
}

// A call without the cluster secret's MAC is refused before it is read.
func TestHandlerAuth(t *testing.T) {
	rs := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: rs.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	a := newTestNode(t, rdb, "a", true)
	for _, hdr := range []string{"", "1.00", sign([]byte("not the cluster secret, 32 bytes"), []byte("x"), time.Now())} {
		req, _ := http.NewRequest(http.MethodPost, a.srv.URL+Path, strings.NewReader("x"))
		if hdr != "" {
			req.Header.Set(AuthHeader, hdr)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("header %q: HTTP %d, want 401", hdr, resp.StatusCode)
		}
	}
}

// A group's parts on other nodes keep the group's order: a small message
// is not handed out ahead of a large one still being fanned out there.
func TestGroupPartsKeepOrder(t *testing.T) {
	rs := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: rs.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	ctx := context.Background()
	a := newTestNode(t, rdb, "a", true)
	b := newTestNode(t, rdb, "b", false)
	for s, n := range map[cluster.ShardID]*testNode{0: a, 1: a, 2: b, 3: b, 4: b, 5: b, 6: b, 7: b} {
		if _, err := n.node.Claim(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	m := a.r.ShardMap()
	sender := register(t, a, nameOn(t, m, 0, "alice"))
	var gid [16]byte
	for i := 0; m.Group(gid) != 0; i++ {
		gid[0], gid[1] = byte(i), byte(i>>8)
	}
	conv := "g:" + hex.EncodeToString(gid[:])
	// 40 devices on b: over the inline bound (4), so b queues the part and
	// writes it one entry per commit.
	var many []wire.DeviceAddr
	for i := range 40 {
		many = append(many, wire.DeviceAddr{Account: nameOn(t, m, 2, "bob"+strconv.Itoa(i)+"x"), Device: 1})
	}
	last := many[len(many)-1]
	send := func(id string, to []wire.DeviceAddr) {
		t.Helper()
		_, err := a.routed.inbox.AppendGroup(ctx, inbox.GroupAppend{Sender: sender, ClientMsgID: id, Conversation: conv,
			Env: &wirepb.Envelope{Sender: sender.Account, SenderDevice: 1, GroupId: hex.EncodeToString(gid[:]),
				Type: wirepb.EnvelopeType_SENDER_KEY_MESSAGE, ClientMsgId: id}, Body: []byte(id), Recipients: to})
		if err != nil {
			t.Fatalf("group send %s: %v", id, err)
		}
	}
	send("big", many)
	send("small", []wire.DeviceAddr{last})
	var seqs []uint64
	for deadline := time.Now().Add(10 * time.Second); len(seqs) < 2 && time.Now().Before(deadline); {
		items, err := b.routed.inbox.Range(ctx, last, 0, 10)
		if err != nil {
			t.Fatal(err)
		}
		seqs = seqs[:0]
		for _, it := range items {
			seqs = append(seqs, it.Env.Seq)
		}
		time.Sleep(5 * time.Millisecond) // polling the inbox: the fan-out runs on b's committer
	}
	if len(seqs) != 2 || seqs[0] != 1 || seqs[1] != 2 {
		t.Fatalf("%s's inbox holds seqs %v in id order, want [1 2]", last, seqs)
	}
}

// How a send is split depends on shards only: a send whose first attempt
// stored its conversation part while the recipient's shard was unserved,
// retried after that shard came to the sender's node, is recognized as the
// same send (its original sequence number), not stored anew.
func TestRetryAfterShardMovesKeepsItsSequence(t *testing.T) {
	rs := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: rs.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	ctx := context.Background()
	a := newTestNode(t, rdb, "a", true)
	b := newTestNode(t, rdb, "b", false)
	for s, n := range map[cluster.ShardID]*testNode{0: a, 2: b} {
		if _, err := n.node.Claim(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	m := a.r.ShardMap()
	lo, hi := nameOn(t, m, 0, "alice"), nameOn(t, m, 2, "zed")
	alice := register(t, a, lo)
	bob := wire.DeviceAddr{Account: hi, Device: 1}
	send := func() (inbox.Accepted, error) {
		return a.routed.inbox.Append(ctx, inbox.Send{Sender: alice, ClientMsgID: "m1", Conversation: "d:" + lo + ":" + hi,
			Entries: []inbox.Entry{{To: bob, Env: &wirepb.Envelope{Sender: lo, SenderDevice: 1, To: hi,
				Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("x"), ClientMsgId: "m1"}}}})
	}
	first, _ := a.routed.inbox.Append(ctx, inbox.Send{Sender: alice, ClientMsgID: "m0", Conversation: "d:" + lo + ":" + hi})
	// bob's shard is served by nobody: the conversation's part (alice's
	// shard) takes seq first+1, bob's part fails.
	if err := b.node.Release(ctx, 2); err != nil {
		t.Fatal(err)
	}
	b.node.Hold(2)
	if _, err := send(); err == nil {
		t.Fatal("send to an unserved shard succeeded")
	}
	// bob's shard comes to a (both shards local now); the retry is the same send.
	if _, err := a.node.Claim(ctx, 2); err != nil {
		t.Fatal(err)
	}
	acc, err := send()
	if err != nil {
		t.Fatal(err)
	}
	if want := first.Seq + 1; acc.Seq != want {
		t.Fatalf("retry got seq %d, want the first attempt's %d", acc.Seq, want)
	}
}
