package inbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
)

const testGroup = "0123456789abcdef0123456789abcdef"

// groupSend makes a GroupAppend of content from sender to every device in to.
func groupSend(from wire.DeviceAddr, clientMsgID, content string, to ...wire.DeviceAddr) GroupAppend {
	return GroupAppend{
		Sender: from, ClientMsgID: clientMsgID, Conversation: "g:" + testGroup,
		Env: &wirepb.Envelope{Sender: from.Account, SenderDevice: from.Device, GroupId: testGroup,
			Type: wirepb.EnvelopeType_SENDER_KEY_MESSAGE, ClientMsgId: clientMsgID},
		Body:       []byte(content),
		Recipients: to,
	}
}

func mustAppendGroup(t testing.TB, s *Store, m GroupAppend) Accepted {
	t.Helper()
	acc, err := s.AppendGroup(context.Background(), m)
	if err != nil {
		t.Fatalf("AppendGroup(%s): %v", m.ClientMsgID, err)
	}
	return acc
}

// bodyKeys returns the body ids that have a body ('b') and a refs record ('r').
func bodyKeys(t testing.TB, db *pebble.DB) (bodies, refs []uint64) {
	t.Helper()
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixBody}, UpperBound: []byte{prefixBody + 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		k := it.Key()
		if len(k) == 1 {
			continue // the counter
		}
		if len(k) != 10 {
			t.Fatalf("unexpected body key %x", k)
		}
		id := entryID(k[:9])
		switch k[9] {
		case 'b':
			bodies = append(bodies, id)
		case 'r':
			refs = append(refs, id)
		default:
			t.Fatalf("unexpected body key %x", k)
		}
	}
	return bodies, refs
}

func bodyRefCount(t testing.TB, s *Store, id uint64) uint32 {
	t.Helper()
	g := s.newGroup() // read-only use: its batch is never committed
	defer g.b.Close()
	b, err := g.body(id)
	if err != nil {
		t.Fatal(err)
	}
	return b.refs
}

func TestAppendGroup(t *testing.T) {
	ctx := context.Background()
	s, db := newStore(t, Options{})
	acc := mustAppendGroup(t, s, groupSend(alice1, "g1", "sender-key ciphertext", alice2, bob1, bob2, carol1))
	if acc.Seq != 1 || acc.Duplicate {
		t.Fatalf("accepted %+v", acc)
	}
	for _, d := range []wire.DeviceAddr{alice2, bob1, bob2, carol1} {
		items := rangeAll(t, s, d)
		if len(items) != 1 {
			t.Fatalf("%s holds %d entries", d, len(items))
		}
		e := items[0].Env
		want := &wirepb.Envelope{Id: 1, Sender: "alice", SenderDevice: 1, Seq: 1, ServerTimeMs: t0.UnixMilli(),
			Type: wirepb.EnvelopeType_SENDER_KEY_MESSAGE, Content: []byte("sender-key ciphertext"),
			ClientMsgId: "g1", GroupId: testGroup}
		if !proto.Equal(e, want) {
			t.Errorf("%s got %v, want %v", d, e, want)
		}
		if len(e.ProtoReflect().GetUnknown()) != 0 {
			t.Errorf("%s: the envelope carries the store's body reference", d)
		}
		got, err := s.Get(ctx, d, 1)
		if err != nil || !proto.Equal(got, want) || len(got.ProtoReflect().GetUnknown()) != 0 {
			t.Errorf("Get(%s, 1) = %v, %v", d, got, err)
		}
		// Size and Depth count the body: it is what the device downloads.
		if items[0].Size < len("sender-key ciphertext")+proto.Size(want)-len("sender-key ciphertext") {
			t.Errorf("%s: item size %d does not count the body", d, items[0].Size)
		}
		if got := depth(t, s, d); got != (depthWant{1, uint64(items[0].Size)}) {
			t.Errorf("%s: Depth %+v, want 1 entry of %d bytes", d, got, items[0].Size)
		}
	}
	if items := rangeAll(t, s, alice1); len(items) != 0 {
		t.Errorf("the sending device got %d entries", len(items))
	}
	bodies, refs := bodyKeys(t, db)
	if !slices.Equal(bodies, []uint64{1}) || !slices.Equal(refs, []uint64{1}) {
		t.Fatalf("bodies %v, refs %v; want one body", bodies, refs)
	}
	if n := bodyRefCount(t, s, 1); n != 4 {
		t.Errorf("refs = %d, want 4", n)
	}

	// The group has its own sequence; a retry is deduplicated (the id space
	// is the sender device's, shared with Append).
	if acc := mustAppendGroup(t, s, groupSend(alice1, "g2", "second", bob1)); acc.Seq != 2 {
		t.Errorf("second group send seq %d", acc.Seq)
	}
	dup := mustAppendGroup(t, s, groupSend(alice1, "g1", "other", bob1))
	if !dup.Duplicate || dup.Seq != 1 || !dup.ServerTime.Equal(acc.ServerTime) {
		t.Errorf("retry = %+v", dup)
	}
	if prev, ok, err := s.Lookup(ctx, alice1, "g2"); err != nil || !ok || prev.Seq != 2 {
		t.Errorf("Lookup(g2) = %+v %v %v", prev, ok, err)
	}
	if acc := mustAppend(t, s, send(alice1, "g1", "d:alice:bob", "1:1", bob1)); !acc.Duplicate {
		t.Errorf("a 1:1 send reusing a group send's id was stored: %+v", acc)
	}
	if got := contents(rangeAll(t, s, bob1)); !slices.Equal(got, []string{"sender-key ciphertext", "second"}) {
		t.Errorf("bob1 holds %q", got)
	}
}

func TestAppendGroupBodyGoesWithLastReference(t *testing.T) {
	ctx := context.Background()
	reg := prometheus.NewRegistry()
	s, db := newStore(t, Options{Registerer: reg})
	mustAppendGroup(t, s, groupSend(alice1, "g1", "body", bob1, bob2, carol1))
	mustAppend(t, s, send(alice1, "m1", "c", "plain", bob1)) // id 2 of bob1, no body

	ackOne := func(d wire.DeviceAddr, id uint64) {
		t.Helper()
		del, err := s.Ack(ctx, d, []uint64{id}, nil)
		if err != nil || len(del) != 1 {
			t.Fatalf("Ack(%s, %d) = %v, %v", d, id, del, err)
		}
	}
	ackOne(bob1, 1)
	ackOne(bob1, 2)
	if n := bodyRefCount(t, s, 1); n != 2 {
		t.Errorf("refs after one ack = %d, want 2", n)
	}
	// A repeated ack changes nothing.
	if del, err := s.Ack(ctx, bob1, []uint64{1}, nil); err != nil || len(del) != 0 {
		t.Fatalf("repeated ack = %v, %v", del, err)
	}
	if n := bodyRefCount(t, s, 1); n != 2 {
		t.Errorf("refs after a repeated ack = %d, want 2", n)
	}
	// The other devices still read the body.
	if got := contents(rangeAll(t, s, carol1)); !slices.Equal(got, []string{"body"}) {
		t.Errorf("carol1 holds %q", got)
	}
	ackOne(bob2, 1)
	ackOne(carol1, 1)
	if bodies, refs := bodyKeys(t, db); len(bodies)+len(refs) != 0 {
		t.Errorf("after the last ack: bodies %v, refs %v", bodies, refs)
	}
	for _, d := range []wire.DeviceAddr{bob1, bob2, carol1} {
		if got := depth(t, s, d); got != (depthWant{}) {
			t.Errorf("%s: Depth %+v after acking everything", d, got)
		}
	}
	stored, _ := metricValue(t, reg, "ferry_inbox_group_bodies_stored_total", nil)
	deleted, _ := metricValue(t, reg, "ferry_inbox_group_bodies_deleted_total", nil)
	if stored != 1 || deleted != 1 {
		t.Errorf("bodies stored %v, deleted %v; want 1, 1", stored, deleted)
	}
	// Body ids are not reused.
	mustAppendGroup(t, s, groupSend(alice1, "g2", "next", bob1))
	if bodies, _ := bodyKeys(t, db); !slices.Equal(bodies, []uint64{2}) {
		t.Errorf("next body ids %v, want [2]", bodies)
	}
}

// armedGate blocks the first commit after arm until release.
type armedGate struct {
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func newArmedGate() *armedGate {
	return &armedGate{entered: make(chan struct{}), release: make(chan struct{})}
}

func (a *armedGate) commit(b *pebble.Batch, o *pebble.WriteOptions) error {
	if a.armed.CompareAndSwap(true, false) {
		close(a.entered)
		<-a.release
	}
	return b.Commit(o)
}

// holdCommitter makes the committer wait inside a commit so that the ops
// queued meanwhile land in one group; it returns when that commit is blocked.
func holdCommitter(t *testing.T, s *Store, a *armedGate) <-chan result[Accepted] {
	t.Helper()
	a.armed.Store(true)
	ch := async(func() (Accepted, error) { return s.Append(context.Background(), send(carol1, "", "", "hold", carol1)) })
	<-a.entered
	return ch
}

func TestAppendGroupTwoAcksInOneCommit(t *testing.T) {
	ctx := context.Background()
	a := newArmedGate()
	s, db := newStore(t, Options{commit: a.commit})
	mustAppendGroup(t, s, groupSend(alice1, "g0", "zero", carol1))
	mustAppendGroup(t, s, groupSend(alice1, "g1", "body", bob1, bob2))
	hold := holdCommitter(t, s, a)
	x := async(func() ([]uint64, error) { return s.Ack(ctx, bob1, []uint64{1}, nil) })
	y := async(func() ([]uint64, error) { return s.Ack(ctx, bob2, []uint64{1}, nil) })
	waitQueued(t, s, 2)
	close(a.release)
	for _, ch := range []<-chan result[[]uint64]{x, y} {
		if r := <-ch; r.err != nil || len(r.v) != 1 {
			t.Fatalf("ack = %v, %v", r.v, r.err)
		}
	}
	if r := <-hold; r.err != nil {
		t.Fatal(r.err)
	}
	if bodies, _ := bodyKeys(t, db); !slices.Equal(bodies, []uint64{1}) {
		t.Errorf("bodies %v after both acks of body 2 in one group, want [1]", bodies)
	}
}

func TestAppendGroupExpiry(t *testing.T) {
	ctx := context.Background()
	const ttl = time.Hour
	clk := newClock()
	s, db := newStore(t, Options{TTL: ttl, Now: clk.Now})
	mustAppendGroup(t, s, groupSend(alice1, "g1", "old", bob1, bob2))
	clk.Set(30 * time.Minute)
	mustAppendGroup(t, s, groupSend(alice1, "g2", "new", bob1))
	if _, err := s.Ack(ctx, bob2, []uint64{1}, nil); err != nil {
		t.Fatal(err)
	}
	clk.Set(ttl)
	if n, err := s.ExpireNow(ctx); err != nil || n != 1 {
		t.Fatalf("ExpireNow = %d, %v; want 1", n, err)
	}
	if bodies, refs := bodyKeys(t, db); !slices.Equal(bodies, []uint64{2}) || !slices.Equal(refs, []uint64{2}) {
		t.Errorf("after expiry: bodies %v, refs %v; want [2]", bodies, refs)
	}
	if got := contents(rangeAll(t, s, bob1)); !slices.Equal(got, []string{"new"}) {
		t.Errorf("bob1 holds %q", got)
	}
	clk.Set(ttl + 30*time.Minute)
	if n, err := s.ExpireNow(ctx); err != nil || n != 1 {
		t.Fatalf("second ExpireNow = %d, %v; want 1", n, err)
	}
	if bodies, refs := bodyKeys(t, db); len(bodies)+len(refs) != 0 {
		t.Errorf("after expiry of everything: bodies %v, refs %v", bodies, refs)
	}
	if got := depth(t, s, bob1); got != (depthWant{}) {
		t.Errorf("bob1 Depth %+v", got)
	}
}

func TestAppendGroupDeleteDevice(t *testing.T) {
	ctx := context.Background()
	s, db := newStore(t, Options{})
	mustAppendGroup(t, s, groupSend(alice1, "g1", "one", bob1, bob2))
	mustAppendGroup(t, s, groupSend(alice1, "g2", "two", bob1))
	mustAppend(t, s, send(alice1, "m", "", "plain", bob1))
	if _, err := s.Ack(ctx, bob1, []uint64{1}, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteDevice(ctx, bob1); err != nil {
		t.Fatal(err)
	}
	bodies, _ := bodyKeys(t, db)
	if !slices.Equal(bodies, []uint64{1}) {
		t.Fatalf("bodies %v after deleting bob1, want [1] (bob2 still refers to it)", bodies)
	}
	if n := bodyRefCount(t, s, 1); n != 1 {
		t.Errorf("refs of body 1 = %d, want 1", n)
	}
	if err := s.DeleteDevice(ctx, bob2); err != nil {
		t.Fatal(err)
	}
	if bodies, refs := bodyKeys(t, db); len(bodies)+len(refs) != 0 {
		t.Errorf("bodies %v, refs %v after deleting every recipient", bodies, refs)
	}
}

func TestAppendGroupDeleteDeviceInOneCommit(t *testing.T) {
	// A group send, a DeleteDevice of one recipient, a send after it and a
	// second DeleteDevice, all in one commit group.
	ctx := context.Background()
	a := newArmedGate()
	s, db := newStore(t, Options{commit: a.commit})
	mustAppendGroup(t, s, groupSend(alice1, "g0", "stored", bob1, bob2)) // body 1, in Pebble
	hold := holdCommitter(t, s, a)
	x := async(func() (Accepted, error) { return s.AppendGroup(ctx, groupSend(alice1, "g1", "new", bob1, bob2)) })
	waitQueued(t, s, 1)
	d1 := async(func() (struct{}, error) { return struct{}{}, s.DeleteDevice(ctx, bob1) })
	waitQueued(t, s, 2)
	y := async(func() (Accepted, error) { return s.AppendGroup(ctx, groupSend(alice1, "g2", "after", bob1)) })
	waitQueued(t, s, 3)
	d2 := async(func() (struct{}, error) { return struct{}{}, s.DeleteDevice(ctx, bob1) })
	waitQueued(t, s, 4)
	close(a.release)
	for _, ch := range []<-chan result[Accepted]{hold, x, y} {
		if r := <-ch; r.err != nil {
			t.Fatal(r.err)
		}
	}
	for _, ch := range []<-chan result[struct{}]{d1, d2} {
		if r := <-ch; r.err != nil {
			t.Fatal(r.err)
		}
	}
	// bob2 alone refers to bodies 1 and 2; body 3 (only bob1) is gone.
	if bodies, refs := bodyKeys(t, db); !slices.Equal(bodies, []uint64{1, 2}) || !slices.Equal(refs, []uint64{1, 2}) {
		t.Errorf("bodies %v, refs %v; want [1 2]", bodies, refs)
	}
	for _, id := range []uint64{1, 2} {
		if n := bodyRefCount(t, s, id); n != 1 {
			t.Errorf("refs of body %d = %d, want 1", id, n)
		}
	}
	if items := rangeAll(t, s, bob1); len(items) != 0 {
		t.Errorf("bob1 holds %d entries", len(items))
	}
	if got := contents(rangeAll(t, s, bob2)); !slices.Equal(got, []string{"stored", "new"}) {
		t.Errorf("bob2 holds %q", got)
	}
}

func TestAppendGroupQuota(t *testing.T) {
	ctx := context.Background()
	reg := prometheus.NewRegistry()
	s, db := newStore(t, Options{MaxBytes: 1000, Registerer: reg})
	// The body counts in every recipient's quota.
	_, err := s.AppendGroup(ctx, groupSend(alice1, "big", string(make([]byte, 990)), bob1, bob2))
	var full *FullError
	if !errors.As(err, &full) || !errors.Is(err, ErrInboxFull) || !slices.Equal(full.Devices, []wire.DeviceAddr{bob1, bob2}) {
		t.Fatalf("AppendGroup over quota = %v", err)
	}
	if bodies, refs := bodyKeys(t, db); len(bodies)+len(refs) != 0 {
		t.Errorf("a rejected send left bodies %v, refs %v", bodies, refs)
	}
	if _, ok, _ := s.Lookup(ctx, alice1, "big"); ok {
		t.Error("a rejected send left a dedup record")
	}
	mustAppendGroup(t, s, groupSend(alice1, "ok", string(make([]byte, 600)), bob1))
	if _, err := s.AppendGroup(ctx, groupSend(alice1, "two", string(make([]byte, 600)), bob2, bob1)); !errors.As(err, &full) ||
		!slices.Equal(full.Devices, []wire.DeviceAddr{bob1}) {
		t.Errorf("second send = %v, want bob1 full", err)
	}
	// Server-made updates skip the quota.
	m := groupSend(alice1, "", string(make([]byte, 600)), bob1)
	m.NoQuota = true
	mustAppendGroup(t, s, m)
	if v, _ := metricValue(t, reg, "ferry_inbox_rejected_sends_total", map[string]string{"reason": "inbox_full"}); v != 2 {
		t.Errorf("rejected inbox_full = %v, want 2", v)
	}
}

func TestAppendGroupUpdate(t *testing.T) {
	// A GROUP_UPDATE: no dedup, no sequence, the GroupInfo is the shared body.
	s, db := newStore(t, Options{})
	info := &wirepb.GroupInfo{GroupId: testGroup, Name: "friends", Version: 3, AdminsOnly: true, ChangedBy: "alice",
		Members: []*wirepb.GroupMember{{Username: "alice", Admin: true, Devices: []*wirepb.GroupDevice{{DeviceId: 1, RegistrationId: 7}}},
			{Username: "bob", Devices: []*wirepb.GroupDevice{{DeviceId: 1, RegistrationId: 8}, {DeviceId: 2, RegistrationId: 9}}}}}
	m := GroupAppend{Sender: alice1, NoQuota: true,
		Env:        &wirepb.Envelope{Sender: "alice", SenderDevice: 1, GroupId: testGroup, Type: wirepb.EnvelopeType_GROUP_UPDATE, Group: info},
		Recipients: []wire.DeviceAddr{alice1, bob1, bob2}}
	for range 2 {
		if acc := mustAppendGroup(t, s, m); acc.Seq != 0 || acc.Duplicate {
			t.Fatalf("update accepted as %+v", acc)
		}
	}
	if m.Env.Group != info {
		t.Error("AppendGroup changed the caller's envelope")
	}
	for _, d := range m.Recipients {
		items := rangeAll(t, s, d)
		if len(items) != 2 {
			t.Fatalf("%s holds %d entries", d, len(items))
		}
		for _, it := range items {
			if !proto.Equal(it.Env.Group, info) || it.Env.Type != wirepb.EnvelopeType_GROUP_UPDATE || it.Env.Seq != 0 || len(it.Env.Content) != 0 {
				t.Errorf("%s: update %v", d, it.Env)
			}
		}
	}
	if bodies, _ := bodyKeys(t, db); len(bodies) != 2 {
		t.Errorf("%d bodies, want 2 (one per update)", len(bodies))
	}
}

func TestAppendGroupNoRecipients(t *testing.T) {
	// A member alone in its group: the send takes a sequence number and a
	// dedup record, nothing else.
	s, db := newStore(t, Options{})
	if acc := mustAppendGroup(t, s, groupSend(alice1, "g1", "alone", []wire.DeviceAddr{}...)); acc.Seq != 1 {
		t.Errorf("accepted %+v", acc)
	}
	if acc := mustAppendGroup(t, s, groupSend(alice1, "g1", "alone")); !acc.Duplicate {
		t.Errorf("retry %+v", acc)
	}
	if bodies, refs := bodyKeys(t, db); len(bodies)+len(refs) != 0 {
		t.Errorf("bodies %v, refs %v", bodies, refs)
	}
	if _, err := s.AppendGroup(context.Background(), GroupAppend{Sender: alice1}); wire.CodeOf(err) != wirepb.ErrorCode_BAD_REQUEST {
		t.Errorf("AppendGroup without an envelope = %v", err)
	}
}

// batchBytes counts the bytes of every committed batch.
type batchBytes struct{ n atomic.Int64 }

func (c *batchBytes) commit(b *pebble.Batch, o *pebble.WriteOptions) error {
	c.n.Add(int64(b.Len()))
	return b.Commit(o)
}

// recipients returns n devices: accounts user0.. with devicesEach devices each.
func recipients(n, devicesEach int) []wire.DeviceAddr {
	out := make([]wire.DeviceAddr, 0, n)
	for i := 0; len(out) < n; i++ {
		for d := 1; d <= devicesEach && len(out) < n; d++ {
			out = append(out, wire.DeviceAddr{Account: fmt.Sprintf("user%04d", i), Device: uint32(d)})
		}
	}
	return out
}

func TestAppendGroupBytesWrittenDoNotGrowWithBodyTimesDevices(t *testing.T) {
	const devices = 256
	to := recipients(devices, 2)
	written := func(bodySize int) int64 {
		c := &batchBytes{}
		s, _ := newStore(t, Options{commit: c.commit})
		// Warm up (the first write of each device's meta is the same either way).
		mustAppendGroup(t, s, groupSend(alice1, "warm", "x", to...))
		before := c.n.Load()
		mustAppendGroup(t, s, groupSend(alice1, "m", string(bytes.Repeat([]byte{'x'}, bodySize)), to...))
		return c.n.Load() - before
	}
	small, large := written(100), written(100_100)
	grow := large - small
	t.Logf("bytes written per group message to %d devices: %d with a 100-byte body, %d with a 100,100-byte body", devices, small, large)
	// The 100,000 more body bytes are written once (plus a few bytes of
	// size varint per entry), not once per device.
	if grow < 100_000 || grow > 100_000+4*devices {
		t.Errorf("a 100,000-byte bigger body wrote %d more bytes; want about 100,000", grow)
	}
	if per := small / devices; per > 150 {
		t.Errorf("%d bytes written per recipient device, want at most 150", per)
	}
}

// FuzzParseEntry: reading the server fields and the body reference of a
// stored entry never panics, and finds what withServerFields and
// withBodyRef wrote after any envelope.
func FuzzParseEntry(f *testing.F) {
	env, _ := proto.Marshal(&wirepb.Envelope{Sender: "alice", SenderDevice: 1, GroupId: testGroup, Content: []byte("x")})
	f.Add(env, uint64(1), int64(5), uint64(7), uint32(9))
	f.Add([]byte{}, uint64(0), int64(0), uint64(0), uint32(0))
	f.Add([]byte{0xc2, 0x3e, 0x01}, uint64(1), int64(-1), uint64(1<<63), uint32(1<<31))
	f.Add([]byte{0xc0, 0x3e, 0x05}, uint64(2), int64(3), uint64(0), uint32(0)) // an unknown field 1000 from outside
	f.Fuzz(func(t *testing.T, raw []byte, id uint64, timeMs int64, bodyID uint64, bodySize uint32) {
		_ = parseEntry(raw) // arbitrary bytes: no panic
		e0 := &wirepb.Envelope{}
		if proto.Unmarshal(raw, e0) != nil {
			return
		}
		base, _ := marshalEntries([]Entry{{Env: e0}}) // as Append stores it
		v := withServerFields(base[0], id, 0, timeMs)
		if bodyID != 0 {
			v = withBodyRef(v, bodyID, bodySize)
		}
		got := parseEntry(v)
		want := entryMeta{timeMs: timeMs, refAt: len(v)}
		if bodyID != 0 {
			want.bodyID, want.bodySize = bodyID, bodySize
			want.refAt = len(withServerFields(base[0], id, 0, timeMs))
		}
		if got != want {
			t.Fatalf("parseEntry = %+v, want %+v", got, want)
		}
		e := &wirepb.Envelope{}
		if err := proto.Unmarshal(v, e); err != nil || e.Id != id || e.ServerTimeMs != timeMs {
			t.Fatalf("the entry does not decode as an envelope: %v %v", e, err)
		}
	})
}

// RangeRaw hands out the same envelopes as Range, encoded, for 1:1 and
// group entries and group updates, from the body cache the second time.
func TestRangeRawMatchesRange(t *testing.T) {
	s, _ := newStore(t, Options{})
	mustAppend(t, s, send(alice1, "dm", "dm", "direct", bob1))
	mustAppendGroup(t, s, groupSend(alice1, "g1", "group text", bob1, bob2))
	upd := groupSend(alice1, "", "", bob1, bob2)
	upd.Env.Type, upd.Body = wirepb.EnvelopeType_GROUP_UPDATE, nil
	upd.Env.Group = &wirepb.GroupInfo{GroupId: testGroup, Name: "team", Version: 2,
		Members: []*wirepb.GroupMember{{Username: "alice"}, {Username: "bob"}}}
	mustAppendGroup(t, s, upd)
	for round := range 2 {
		for _, d := range []wire.DeviceAddr{bob1, bob2} {
			want := rangeAll(t, s, d)
			got, err := s.RangeRaw(context.Background(), d, 0, 100)
			if err != nil || len(got) != len(want) {
				t.Fatalf("RangeRaw(%s) = %d items, %v; want %d", d, len(got), err, len(want))
			}
			for i := range got {
				dec := &wirepb.Envelope{}
				if err := proto.Unmarshal(got[i].Raw, dec); err != nil {
					t.Fatal(err)
				}
				if !proto.Equal(dec, want[i].Env) || got[i].ID != want[i].ID || got[i].Size != want[i].Size {
					t.Fatalf("round %d %s item %d: raw %v, want %v", round, d, i, dec, want[i].Env)
				}
				if h := got[i].Env; h.Id != want[i].ID || h.Seq != want[i].Env.Seq || h.Type != want[i].Env.Type || h.Sender != "alice" {
					t.Fatalf("round %d %s item %d: head %v", round, d, i, h)
				}
			}
		}
	}
}
