package shardmove_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/presence"
	"github.com/ferryhq/ferry/push"
	"github.com/ferryhq/ferry/shardmove"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

var now = time.UnixMilli(1_700_000_000_000)

// node is one ferryd's stores on an in-memory Pebble.
type node struct {
	db   *pebble.DB
	dev  *device.Store
	keys *keys.Store
	in   *inbox.Store
	grp  *group.Store
	push *push.Store
	pres *presence.Store
	all  []shardmove.Store
}

func newNode(t *testing.T) *node {
	t.Helper()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	clock := func() time.Time { return now }
	n := &node{db: db, dev: device.New(db, device.Options{Now: clock})}
	n.keys = keys.New(db, keys.Options{Now: clock})
	if n.in, err = inbox.New(db, inbox.Options{SweepInterval: -1, Now: clock}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.in.Close() })
	n.grp = group.New(db, n.dev, group.Options{Now: clock})
	n.push = push.NewStore(db)
	n.pres = presence.NewStore(db)
	n.all = []shardmove.Store{n.dev, n.keys, n.in, n.grp, n.push, n.pres}
	return n
}

// must returns v; a test that gets an error here is broken, so it panics
// (Go cannot pass a call's two results after a *testing.T).
func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func dev(a string, d uint32) wire.DeviceAddr { return wire.DeviceAddr{Account: a, Device: d} }

// world is what fill put on the source.
type world struct {
	inX, groupX map[string]bool // account names and group ids (as strings) of shard X
	g1, g2      string          // group ids (hex): g1 on shard X, g2 on shard Y
	devices     []wire.DeviceAddr
}

func (w *world) filter(x bool) store.ShardFilter {
	return store.ShardFilter{
		Account: func(u string) bool { return w.inX[u] == x },
		Group:   func(id []byte) bool { return w.groupX[string(id)] == x },
	}
}

// fill gives the source accounts on shard X (alice, bob) and Y (carol,
// dave), with 1:1 and group entries (group bodies shared across both
// shards), markers, dedup records, sequences, keys, push and presence.
func fill(t *testing.T, n *node) *world {
	t.Helper()
	ctx := context.Background()
	w := &world{inX: map[string]bool{"alice": true, "bob": true}, groupX: map[string]bool{}}
	for i, u := range []string{"alice", "bob", "carol", "dave"} {
		pub, _, _ := ed25519.GenerateKey(nil)
		must(n.dev.Register(ctx, u, pub, uint32(i+1)))
		w.devices = append(w.devices, dev(u, 1))
	}
	pub, _, _ := ed25519.GenerateKey(nil)
	must(n.dev.AddDevice(ctx, "alice", pub, 9))
	w.devices = append(w.devices, dev("alice", 2))

	msg := func(from, to wire.DeviceAddr, text string) inbox.Entry {
		return inbox.Entry{To: to, Env: &wirepb.Envelope{Sender: from.Account, SenderDevice: from.Device,
			Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte(text)}}
	}
	sends := []inbox.Send{
		{Sender: dev("alice", 1), ClientMsgID: "m1", Conversation: "d:alice:carol",
			Entries: []inbox.Entry{msg(dev("alice", 1), dev("carol", 1), "a->c")}},
		{Sender: dev("carol", 1), ClientMsgID: "m2", Conversation: "d:bob:carol",
			Entries: []inbox.Entry{msg(dev("carol", 1), dev("bob", 1), "c->b")}},
		{Sender: dev("dave", 1), ClientMsgID: "m3", Conversation: "d:alice:dave",
			Entries: []inbox.Entry{msg(dev("dave", 1), dev("alice", 1), "d->a"), msg(dev("dave", 1), dev("alice", 2), "d->a")}},
		{Sender: dev("carol", 1), ClientMsgID: "m4", Conversation: "d:carol:dave",
			Entries: []inbox.Entry{msg(dev("carol", 1), dev("dave", 1), "c->d")}},
	}
	for _, s := range sends {
		must(n.in.Append(ctx, s))
	}
	g1 := must(n.grp.Create(ctx, "alice", "one", []string{"bob", "carol"}))
	g2 := must(n.grp.Create(ctx, "carol", "two", []string{"dave", "alice"}))
	w.groupX[string(g1.Id)] = true
	w.g1, w.g2 = group.FormatID(g1.Id), group.FormatID(g2.Id)
	gsend := func(from wire.DeviceAddr, id, cmid string, to ...wire.DeviceAddr) {
		t.Helper()
		must(n.in.AppendGroup(ctx, inbox.GroupAppend{Sender: from, ClientMsgID: cmid, Conversation: "g:" + id,
			Env:  &wirepb.Envelope{Sender: from.Account, SenderDevice: from.Device, GroupId: id, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE},
			Body: []byte("body " + cmid), Recipients: to}))
	}
	// Each body is shared by entries of both shards.
	gsend(dev("alice", 1), w.g1, "g1a", dev("alice", 2), dev("bob", 1), dev("carol", 1))
	gsend(dev("bob", 1), w.g1, "g1b", dev("alice", 1), dev("alice", 2), dev("carol", 1))
	gsend(dev("carol", 1), w.g2, "g2a", dev("dave", 1), dev("alice", 1), dev("alice", 2))
	receipt := func(to wire.DeviceAddr, reader string, seq uint64) inbox.Entry {
		return inbox.Entry{To: to, Coalesce: "r:" + reader, Env: &wirepb.Envelope{Type: wirepb.EnvelopeType_RECEIPT,
			Receipt: &wirepb.Receipt{Username: reader, Seq: seq}}}
	}
	must(n.in.AppendMarkers(ctx, []inbox.Entry{receipt(dev("alice", 1), "carol", 1), receipt(dev("carol", 1), "alice", 1)}))
	must(n.in.AppendMarkers(ctx, []inbox.Entry{receipt(dev("alice", 1), "carol", 2)})) // replaces the first

	// Keys, device lists and push registrations, written as their stores
	// store them (their own tests cover the upload paths).
	b := n.db.NewBatch()
	for _, d := range w.devices {
		sk := store.DeviceKey([]byte{store.PrefixKeys, 's'}, d.Account, d.Device)
		v, _ := proto.Marshal(&storepb.DeviceKeys{IdentityKey: bytes.Repeat([]byte{5}, 33), SignedPrekeyId: 1})
		b.Set(sk, v, nil)
		for id := range uint32(3) {
			ok := binary.BigEndian.AppendUint32(store.DeviceKey([]byte{store.PrefixKeys, 'o'}, d.Account, d.Device), id+1)
			b.Set(ok, bytes.Repeat([]byte{5}, 33), nil)
		}
		if err := n.push.Put(ctx, d, &wirepb.PushRegistration{Kind: wirepb.PushKind_FCM, Token: "tok-" + d.String()}); err != nil {
			t.Fatal(err)
		}
	}
	for _, u := range []string{"alice", "carol"} {
		b.Set(append([]byte{store.PrefixDeviceList}, u...), []byte("list of "+u), nil)
		if err := n.pres.SetLastSeen(ctx, u, now.Add(-time.Minute)); err != nil {
			t.Fatal(err)
		}
		if err := n.pres.SetPrivacy(ctx, u, &wirepb.PresencePrivacy{Visibility: wirepb.PresenceVisibility_NOBODY}); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Commit(pebble.Sync); err != nil {
		t.Fatal(err)
	}
	return w
}

// inboxes returns what Range serves of every device.
func inboxes(t *testing.T, n *node, devs []wire.DeviceAddr) map[wire.DeviceAddr][]inbox.Item {
	t.Helper()
	out := make(map[wire.DeviceAddr][]inbox.Item)
	for _, d := range devs {
		out[d] = must(n.in.Range(context.Background(), d, 0, 1000))
	}
	return out
}

func sameItems(t *testing.T, what string, got, want []inbox.Item) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d entries, want %d", what, len(got), len(want))
	}
	for i := range got {
		if got[i].ID != want[i].ID || !proto.Equal(got[i].Env, want[i].Env) {
			t.Fatalf("%s: entry %d = %d %v, want %d %v", what, i, got[i].ID, got[i].Env, want[i].ID, want[i].Env)
		}
	}
}

// keySet returns the keys of db but the inbox's node-local ones (bodies,
// fan-out) and the cluster's.
func keySet(t *testing.T, db *pebble.DB) map[string]bool {
	t.Helper()
	out := make(map[string]bool)
	for _, kv := range must(store.Dump(db)) {
		switch kv.Key[0] {
		case store.PrefixGroupBody, store.PrefixFanout, store.PrefixCluster:
			continue
		}
		out[string(kv.Key)] = true
	}
	return out
}

func bodyKeys(t *testing.T, db *pebble.DB) int {
	t.Helper()
	n := 0
	for _, kv := range must(store.Dump(db)) {
		if kv.Key[0] == store.PrefixGroupBody && len(kv.Key) > 1 {
			n++
		}
	}
	return n
}

// export runs Export and passes every record through its wire encoding.
func export(t *testing.T, n *node, f store.ShardFilter) []*storepb.ShardRecord {
	t.Helper()
	var recs []*storepb.ShardRecord
	err := shardmove.Export(context.Background(), n.all, f, func(r *storepb.ShardRecord) error {
		b, err := proto.Marshal(r)
		if err != nil {
			return err
		}
		c := &storepb.ShardRecord{}
		if err := proto.Unmarshal(b, c); err != nil {
			return err
		}
		recs = append(recs, c)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

func TestMoveShard(t *testing.T) {
	ctx := context.Background()
	src, dst := newNode(t), newNode(t)
	w := fill(t, src)
	before := inboxes(t, src, w.devices)
	keysBefore := keySet(t, src.db)
	fX := w.filter(true)

	recs := export(t, src, fX)
	for range 2 { // importing twice is harmless
		if err := shardmove.Import(ctx, dst.all, recs); err != nil {
			t.Fatal(err)
		}
	}
	if err := shardmove.Drop(ctx, src.all, fX); err != nil {
		t.Fatal(err)
	}

	// Nothing lost, nothing duplicated: the keys split between the nodes.
	keysDst, keysSrc := keySet(t, dst.db), keySet(t, src.db)
	for k := range keysBefore {
		if keysDst[k] == keysSrc[k] {
			t.Errorf("key %q: on target %v, on source %v", k, keysDst[k], keysSrc[k])
		}
	}
	for k := range keysDst {
		if !keysBefore[k] {
			t.Errorf("target has new key %q", k)
		}
	}
	for k := range keysSrc {
		if !keysBefore[k] {
			t.Errorf("source has new key %q", k)
		}
	}
	// Two bodies are referred to by shard X's entries; the second import
	// freed the first import's copies.
	if got := bodyKeys(t, dst.db); got != 3*2 {
		t.Errorf("target has %d body keys, want 6 (3 bodies)", got)
	}

	afterSrc, afterDst := inboxes(t, src, w.devices), inboxes(t, dst, w.devices)
	for _, d := range w.devices {
		want, empty := afterDst[d], afterSrc[d]
		if !w.inX[d.Account] {
			want, empty = afterSrc[d], afterDst[d]
		}
		sameItems(t, "serving "+d.String(), want, before[d])
		if len(empty) != 0 {
			t.Errorf("%s: the other node serves %d entries", d, len(empty))
		}
	}

	tests := []struct {
		sender   wire.DeviceAddr
		cmid     string
		onTarget bool
	}{
		{dev("alice", 1), "m1", true},
		{dev("alice", 1), "g1a", true},
		{dev("bob", 1), "g1b", true},
		{dev("carol", 1), "m2", false},
		{dev("carol", 1), "g2a", false},
		{dev("dave", 1), "m3", false},
	}
	for _, tc := range tests {
		on, off := dst, src
		if !tc.onTarget {
			on, off = src, dst
		}
		if _, ok := must2(on.in.Lookup(ctx, tc.sender, tc.cmid)); !ok {
			t.Errorf("dedup %s %s: not found where it belongs", tc.sender, tc.cmid)
		}
		if _, ok := must2(off.in.Lookup(ctx, tc.sender, tc.cmid)); ok {
			t.Errorf("dedup %s %s: found on the other node", tc.sender, tc.cmid)
		}
	}

	// Sequences continue on the node that owns them.
	seqs := []struct {
		n    *node
		conv string
		want uint64
	}{
		{dst, "d:alice:carol", 2},
		{dst, "d:bob:carol", 2},
		{dst, "d:alice:dave", 2},
		{src, "d:carol:dave", 2},
		{dst, "g:" + w.g1, 3},
		{src, "g:" + w.g2, 2},
		{src, "d:alice:bob", 1}, // never existed
	}
	for _, tc := range seqs {
		acc, err := tc.n.in.Append(ctx, inbox.Send{Sender: dev("alice", 1), Conversation: tc.conv,
			Entries: []inbox.Entry{{To: dev("bob", 2), Env: &wirepb.Envelope{Type: wirepb.EnvelopeType_SIGNAL_MESSAGE}}}})
		if err != nil {
			t.Fatal(err)
		}
		if acc.Seq != tc.want {
			t.Errorf("%s: next seq %d, want %d", tc.conv, acc.Seq, tc.want)
		}
	}

	// Accounts, groups, keys, push, presence.
	for _, u := range []string{"alice", "bob", "carol", "dave"} {
		on, off := src, dst
		if w.inX[u] {
			on, off = dst, src
		}
		if _, err := on.dev.Account(ctx, u); err != nil {
			t.Errorf("account %s: %v", u, err)
		}
		if _, err := off.dev.Account(ctx, u); !errors.Is(err, device.ErrUnknownAccount) {
			t.Errorf("account %s on the other node: %v", u, err)
		}
		n, signed := must2(on.keys.Count(ctx, dev(u, 1)))
		if n != 3 || !signed {
			t.Errorf("keys of %s: %d, %v", u, n, signed)
		}
		if n, signed := must2(off.keys.Count(ctx, dev(u, 1))); n != 0 || signed {
			t.Errorf("keys of %s on the other node: %d, %v", u, n, signed)
		}
		if reg := must(on.push.Get(ctx, dev(u, 1))); reg.GetToken() != "tok-"+dev(u, 1).String() {
			t.Errorf("push of %s: %v", u, reg)
		}
		if reg, err := off.push.Get(ctx, dev(u, 1)); err == nil && reg != nil {
			t.Errorf("push of %s on the other node: %v", u, reg)
		}
	}
	if _, ok := must2(dst.pres.LastSeen(ctx, "alice")); !ok {
		t.Error("alice's last seen did not move")
	}
	if _, ok := must2(src.pres.LastSeen(ctx, "alice")); ok {
		t.Error("alice's last seen stayed")
	}
	if p := must(dst.pres.Privacy(ctx, "alice")); p.Visibility != wirepb.PresenceVisibility_NOBODY {
		t.Errorf("alice's privacy on the target: %v", p)
	}
	if p := must(src.pres.Privacy(ctx, "carol")); p.Visibility != wirepb.PresenceVisibility_NOBODY {
		t.Errorf("carol's privacy on the source: %v", p)
	}
	if g := must(dst.grp.Get(ctx, w.g1)); len(g.Members) != 3 {
		t.Errorf("group one on the target: %v", g)
	}
	if _, err := src.grp.Get(ctx, w.g1); err == nil {
		t.Error("group one stayed on the source")
	}
	if _, err := dst.grp.Get(ctx, w.g2); err == nil {
		t.Error("group two moved")
	}
	for _, tc := range []struct {
		n    *node
		user string
		want []string
	}{
		{dst, "carol", []string{w.g1}}, // the member index goes with the group
		{dst, "alice", []string{w.g1}},
		{src, "alice", []string{w.g2}},
		{src, "carol", []string{w.g2}},
	} {
		var got []string
		for _, g := range must(tc.n.grp.ListFor(ctx, tc.user)) {
			got = append(got, group.FormatID(g.Id))
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("groups of %s: %v, want %v", tc.user, got, tc.want)
		}
	}

	// The bodies' reference counts are exact on both nodes: acking every
	// remaining entry deletes every body.
	for _, n := range []*node{src, dst} {
		for _, d := range append(w.devices, dev("bob", 2)) {
			var ids []uint64
			for _, it := range must(n.in.Range(ctx, d, 0, 1000)) {
				ids = append(ids, it.ID)
			}
			must(n.in.Ack(ctx, d, ids, nil))
		}
		if got := bodyKeys(t, n.db); got != 0 {
			t.Errorf("%d body keys left after acking everything", got)
		}
	}
}

func must2[A, B any](a A, b B, err error) (A, B) {
	if err != nil {
		panic(err)
	}
	return a, b
}

func TestImportRejects(t *testing.T) {
	src := newNode(t)
	w := fill(t, src)
	recs := export(t, src, w.filter(true))
	var entry, body int = -1, -1
	for i, r := range recs {
		if r.Store == inbox.ShardStoreName && r.Key[0] == store.PrefixInbox && entry < 0 {
			entry = i
		}
		if r.Store == inbox.ShardStoreName && r.Key[0] == store.PrefixGroupBody {
			body = i
		}
	}
	if entry < 0 || body < 0 {
		t.Fatal("no inbox entry or body exported")
	}
	tests := []struct {
		name   string
		change func([]*storepb.ShardRecord) []*storepb.ShardRecord
		want   error
	}{
		{"unknown store", func(rs []*storepb.ShardRecord) []*storepb.ShardRecord {
			return append(rs, &storepb.ShardRecord{Store: "nope", Key: []byte("a")})
		}, shardmove.ErrUnknownStore},
		{"key of another store", func(rs []*storepb.ShardRecord) []*storepb.ShardRecord {
			return append(rs, &storepb.ShardRecord{Store: device.ShardStoreName, Key: []byte("palice\x00\x00\x00\x00\x01")})
		}, store.ErrShardRecord},
		{"entry missing", func(rs []*storepb.ShardRecord) []*storepb.ShardRecord {
			return slices.Delete(rs, entry, entry+1)
		}, store.ErrShardRecord},
		{"body missing", func(rs []*storepb.ShardRecord) []*storepb.ShardRecord {
			return slices.Delete(rs, body, body+1)
		}, store.ErrShardRecord},
		{"wrong refs", func(rs []*storepb.ShardRecord) []*storepb.ShardRecord {
			rs[body].BodyRefs++
			return rs
		}, store.ErrShardRecord},
		{"fan-out key", func(rs []*storepb.ShardRecord) []*storepb.ShardRecord {
			return append(rs, &storepb.ShardRecord{Store: inbox.ShardStoreName, Key: []byte("f")})
		}, store.ErrShardRecord},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dst := newNode(t)
			rs := make([]*storepb.ShardRecord, len(recs))
			for i, r := range recs {
				rs[i] = proto.CloneOf(r)
			}
			err := shardmove.Import(context.Background(), dst.all, tc.change(rs))
			if !errors.Is(err, tc.want) {
				t.Fatalf("Import: %v, want %v", err, tc.want)
			}
			// The inbox writes nothing of a rejected import.
			for _, kv := range must(store.Dump(dst.db)) {
				if bytes.IndexByte([]byte{store.PrefixInbox, store.PrefixInboxMeta, store.PrefixGroupBody}, kv.Key[0]) >= 0 {
					t.Fatalf("rejected import wrote %q", kv.Key)
				}
			}
		})
	}
}
