package relay

import (
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

func groupCreate(t *testing.T, c *client.Conn, name string, members ...string) (*wirepb.GroupInfo, error) {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GroupCreate{GroupCreate: &wirepb.GroupCreate{Name: name, Members: members}}})
	return r.GetGroup(), err
}

func groupChange(t *testing.T, c *client.Conn, id string, op wirepb.GroupChange_Op, members ...string) (*wirepb.GroupInfo, error) {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GroupChange{GroupChange: &wirepb.GroupChange{GroupId: id, Op: op, Members: members}}})
	return r.GetGroup(), err
}

func getGroup(t *testing.T, c *client.Conn, id string) (*wirepb.GroupInfo, error) {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GetGroup{GetGroup: &wirepb.GetGroup{GroupId: id}}})
	return r.GetGroup(), err
}

func listGroups(t *testing.T, c *client.Conn) ([]*wirepb.GroupInfo, error) {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ListGroups{ListGroups: &wirepb.ListGroups{}}})
	return r.GetListGroups().GetGroups(), err
}

// groupSendAs sends content to g as from sees it (version and view hash of g).
func groupSendAs(t *testing.T, c *client.Conn, from wire.DeviceAddr, id string, g *wirepb.GroupInfo, content string) (*wirepb.SendResult, error) {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GroupSend{GroupSend: &wirepb.GroupSend{
		ClientMsgId: id, GroupId: g.GroupId, MembershipVersion: g.Version, ViewHash: wire.GroupViewHash(g, from),
		Type: wirepb.EnvelopeType_SENDER_KEY_MESSAGE, Content: []byte(content)}}})
	return r.GetGroupSend(), err
}

// quiet checks that no envelope arrives on c for a little while.
func quiet(t *testing.T, c *client.Conn, who string) {
	t.Helper()
	timeout := time.After(150 * time.Millisecond)
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				return
			}
			if e := ev.GetEnvelope(); e != nil {
				t.Fatalf("%s got an unexpected envelope: %v", who, e)
			}
		case <-timeout:
			return
		}
	}
}

// nextNonReceipt waits for the next envelope on c that is not a receipt
// marker, acking the markers on the way.
func nextNonReceipt(t *testing.T, c *client.Conn) *wirepb.Envelope {
	t.Helper()
	for {
		env := nextEnvelope(t, c)
		if env.Type != wirepb.EnvelopeType_RECEIPT {
			return env
		}
		ack(t, c, env.Id)
	}
}

// expectMarkers reads the envelopes arriving on c until it is quiet: they
// must be DELIVERED markers of group, and the newest per reader device
// must be want (reader device: seq). It acks them.
func expectMarkers(t *testing.T, c *client.Conn, who, group string, want map[wire.DeviceAddr]uint64) {
	t.Helper()
	got := map[wire.DeviceAddr]uint64{}
	for _, env := range settle(t, c) {
		r := env.Receipt
		if env.Type != wirepb.EnvelopeType_RECEIPT || r.GetKind() != wirepb.ReceiptKind_DELIVERED || r.GroupId != group {
			t.Fatalf("%s got %v, want DELIVERED markers", who, env)
		}
		got[wire.DeviceAddr{Account: r.Username, Device: r.DeviceId}] = r.Seq
		ack(t, c, env.Id)
	}
	if !maps.Equal(got, want) {
		t.Fatalf("%s got markers %v, want %v", who, got, want)
	}
}

// memberNames lists a GroupInfo's members as "name", or "name*" for an admin.
func memberNames(g *wirepb.GroupInfo) []string {
	out := []string{}
	for _, m := range g.GetMembers() {
		s := m.Username
		if m.Admin {
			s += "*"
		}
		out = append(out, s)
	}
	return out
}

// expectUpdate waits for the next envelope on c and checks it is the
// GROUP_UPDATE want, made by from.
func expectUpdate(t *testing.T, c *client.Conn, who string, from wire.DeviceAddr, want *wirepb.GroupInfo) *wirepb.Envelope {
	t.Helper()
	env := nextNonReceipt(t, c)
	if env.Type != wirepb.EnvelopeType_GROUP_UPDATE || env.GroupId != want.GroupId || env.Sender != from.Account ||
		env.SenderDevice != from.Device || env.Seq != 0 || len(env.Content) != 0 || env.ClientMsgId != "" {
		t.Fatalf("%s: update envelope %v", who, env)
	}
	if !proto.Equal(env.Group, want) {
		t.Fatalf("%s: update holds %v, want %v", who, env.Group, want)
	}
	ack(t, c, env.Id)
	return env
}

// groupBodies counts the shared bodies the inbox holds.
func groupBodies(t *testing.T, db *pebble.DB) int {
	t.Helper()
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte{store.PrefixGroupBody}, UpperBound: []byte{store.PrefixGroupBody + 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	n := 0
	for ok := it.First(); ok; ok = it.Next() {
		if k := it.Key(); len(k) > 1 && k[len(k)-1] == 'b' {
			n++
		}
	}
	return n
}

func TestGroupMembership(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	alice, a1 := e.registerPrimary("alice")
	alice2, a2 := e.addDevice("alice")
	bob, bc := e.registerPrimary("bob")
	carol, cc := e.registerPrimary("carol")

	g, err := groupCreate(t, a1, "friends", "bob", "bob", "alice")
	if err != nil {
		t.Fatal(err)
	}
	want := &wirepb.GroupInfo{GroupId: g.GroupId, Name: "friends", Version: 1, AdminsOnly: true, ChangedBy: "alice",
		Members: []*wirepb.GroupMember{
			{Username: "alice", Admin: true, Devices: []*wirepb.GroupDevice{{DeviceId: 1, RegistrationId: alice.reg}, {DeviceId: alice2.id, RegistrationId: alice2.reg}}},
			{Username: "bob", Devices: []*wirepb.GroupDevice{{DeviceId: 1, RegistrationId: bob.reg}}}}}
	if !proto.Equal(g, want) {
		t.Fatalf("created %v, want %v", g, want)
	}
	// Every device of every member hears of it; the body is stored once.
	if n := groupBodies(t, e.db); n != 1 {
		t.Errorf("%d bodies stored for one GROUP_UPDATE", n)
	}
	for who, c := range map[string]*client.Conn{"alice1": a1, "alice2": a2, "bob": bc} {
		expectUpdate(t, c, who, alice.addr(), want)
	}
	quiet(t, cc, "carol")
	if n := groupBodies(t, e.db); n != 0 {
		t.Errorf("%d bodies left after every device acked", n)
	}

	// Non-members do not see the group; plain members cannot change it.
	_, err = getGroup(t, cc, g.GroupId)
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_GROUP)
	_, err = groupChange(t, cc, g.GroupId, wirepb.GroupChange_LEAVE)
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_GROUP)
	_, err = groupChange(t, bc, g.GroupId, wirepb.GroupChange_ADD, "carol")
	wantErr(t, err, wirepb.ErrorCode_NOT_ADMIN)
	_, err = groupChange(t, a1, g.GroupId, wirepb.GroupChange_ADD, "nobody")
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_ACCOUNT)
	_, err = groupChange(t, a1, "not-an-id", wirepb.GroupChange_ADD, "carol")
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST)
	_, err = getGroup(t, a1, "0123456789abcdef0123456789abcdef")
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_GROUP)
	_, err = groupCreate(t, a1, "")
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST)
	if got, err := getGroup(t, bc, g.GroupId); err != nil || !proto.Equal(got, want) {
		t.Fatalf("bob's GetGroup = %v, %v", got, err)
	}

	// An admin adds carol: the new membership reaches everyone, carol too.
	g2, err := groupChange(t, a2, g.GroupId, wirepb.GroupChange_ADD, "carol")
	if err != nil {
		t.Fatal(err)
	}
	if g2.Version != 2 || g2.ChangedBy != "alice" || !slices.Equal(memberNames(g2), []string{"alice*", "bob", "carol"}) ||
		len(g2.Members[2].Devices) != 1 || g2.Members[2].Devices[0].RegistrationId != carol.reg {
		t.Fatalf("after add: %v", g2)
	}
	for who, c := range map[string]*client.Conn{"alice1": a1, "alice2": a2, "bob": bc, "carol": cc} {
		expectUpdate(t, c, who, alice2.addr(), g2)
	}
	if gs, err := listGroups(t, cc); err != nil || len(gs) != 1 || !proto.Equal(gs[0], g2) {
		t.Fatalf("carol's ListGroups = %v, %v", gs, err)
	}
	// A retried add changes nothing, and tells everyone the membership again.
	if g3, err := groupChange(t, a1, g.GroupId, wirepb.GroupChange_ADD, "carol"); err != nil || !proto.Equal(g3, g2) {
		t.Fatalf("retried add = %v, %v", g3, err)
	}
	for who, c := range map[string]*client.Conn{"alice1": a1, "alice2": a2, "bob": bc, "carol": cc} {
		expectUpdate(t, c, who, alice.addr(), g2)
	}

	// bob becomes admin and removes carol.
	g3, err := groupChange(t, a1, g.GroupId, wirepb.GroupChange_ADMIN, "bob")
	if err != nil || !slices.Equal(memberNames(g3), []string{"alice*", "bob*", "carol"}) {
		t.Fatalf("admin: %v, %v", g3, err)
	}
	for who, c := range map[string]*client.Conn{"alice1": a1, "alice2": a2, "bob": bc, "carol": cc} {
		expectUpdate(t, c, who, alice.addr(), g3)
	}
	g4, err := groupChange(t, bc, g.GroupId, wirepb.GroupChange_REMOVE, "carol")
	if err != nil || g4.Version != 4 || !slices.Equal(memberNames(g4), []string{"alice*", "bob*"}) {
		t.Fatalf("remove: %v, %v", g4, err)
	}
	// The removed member learns it is out.
	for who, c := range map[string]*client.Conn{"alice1": a1, "alice2": a2, "bob": bc, "carol": cc} {
		expectUpdate(t, c, who, bob.addr(), g4)
	}
	_, err = getGroup(t, cc, g.GroupId)
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_GROUP)
	if gs, err := listGroups(t, cc); err != nil || len(gs) != 0 {
		t.Fatalf("carol's ListGroups after removal = %v, %v", gs, err)
	}

	// alice leaves; bob stays admin. Then bob leaves and the group is gone.
	g5, err := groupChange(t, a1, g.GroupId, wirepb.GroupChange_LEAVE)
	if err != nil || g5.Version != 5 || !slices.Equal(memberNames(g5), []string{"bob*"}) {
		t.Fatalf("leave: %v, %v", g5, err)
	}
	for who, c := range map[string]*client.Conn{"alice1": a1, "alice2": a2, "bob": bc} {
		expectUpdate(t, c, who, alice.addr(), g5)
	}
	g6, err := groupChange(t, bc, g.GroupId, wirepb.GroupChange_LEAVE)
	if err != nil || g6.Version != 6 || len(g6.Members) != 0 {
		t.Fatalf("last leave: %v, %v", g6, err)
	}
	expectUpdate(t, bc, "bob", bob.addr(), g6)
	_, err = getGroup(t, bc, g.GroupId)
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_GROUP)

	// Acking updates made no receipts.
	quiet(t, a1, "alice1")
	quiet(t, bc, "bob")
	quiet(t, cc, "carol")
}

func TestGroupFull(t *testing.T) {
	e := newGroupEnv(t, Config{}, device.Options{}, group.Options{MaxMembers: 2})
	_, a1 := e.registerPrimary("alice")
	e.registerPrimary("bob")
	e.registerPrimary("carol")
	_, err := groupCreate(t, a1, "g", "bob", "carol")
	wantErr(t, err, wirepb.ErrorCode_GROUP_FULL)
	g, err := groupCreate(t, a1, "g", "bob")
	if err != nil {
		t.Fatal(err)
	}
	_, err = groupChange(t, a1, g.GroupId, wirepb.GroupChange_ADD, "carol")
	wantErr(t, err, wirepb.ErrorCode_GROUP_FULL)
}

// recvGroupMessage waits for the next envelope on c and checks it is the
// group message content from from with seq.
func recvGroupMessage(t *testing.T, c *client.Conn, who string, from wire.DeviceAddr, groupID, clientMsgID, content string, seq uint64) {
	t.Helper()
	env := nextNonReceipt(t, c)
	if env.Type != wirepb.EnvelopeType_SENDER_KEY_MESSAGE || env.GroupId != groupID || env.Sender != from.Account ||
		env.SenderDevice != from.Device || env.Seq != seq || string(env.Content) != content || env.ClientMsgId != clientMsgID ||
		env.To != "" || env.Group != nil || env.ServerTimeMs == 0 || len(env.ProtoReflect().GetUnknown()) != 0 {
		t.Fatalf("%s: got %v, want %q seq %d from %s", who, env, content, seq, from)
	}
	ack(t, c, env.Id)
}

func TestGroupSend(t *testing.T) {
	e := newDevEnv(t, Config{MaxMessageBytes: 1000}, device.Options{})
	alice, a1 := e.registerPrimary("alice")
	alice2, a2 := e.addDevice("alice")
	bob, bc := e.registerPrimary("bob")
	_, cc := e.registerPrimary("carol")
	_, dc := e.registerPrimary("dave")
	g, err := groupCreate(t, a1, "friends", "bob", "carol")
	if err != nil {
		t.Fatal(err)
	}
	for who, c := range map[string]*client.Conn{"alice1": a1, "alice2": a2, "bob": bc, "carol": cc} {
		expectUpdate(t, c, who, alice.addr(), g)
	}

	r, err := groupSendAs(t, a1, alice.addr(), "m1", g, "ct-1")
	if err != nil || r.Seq != 1 || r.Duplicate || r.ServerTimeMs == 0 {
		t.Fatalf("send: %v, %v", r, err)
	}
	// Every other member device gets it once, with the group's seq; the
	// sending device gets nothing.
	for who, c := range map[string]*client.Conn{"alice2": a2, "bob": bc, "carol": cc} {
		recvGroupMessage(t, c, who, alice.addr(), g.GroupId, "m1", "ct-1", 1)
	}
	// The acks left alice's devices one DELIVERED marker per reader device
	// (none from alice2: it is her own).
	expectMarkers(t, a1, "alice1", g.GroupId, map[wire.DeviceAddr]uint64{bob.addr(): 1, {Account: "carol", Device: 1}: 1})

	// A retry is deduplicated: same result, nothing new stored.
	r2, err := groupSendAs(t, a1, alice.addr(), "m1", g, "ct-1")
	if err != nil || !r2.Duplicate || r2.Seq != 1 || r2.ServerTimeMs != r.ServerTimeMs {
		t.Fatalf("retry: %v, %v", r2, err)
	}
	// Another member's send continues the group's sequence.
	if r, err := groupSendAs(t, bc, bob.addr(), "b1", g, "ct-2"); err != nil || r.Seq != 2 {
		t.Fatalf("bob's send: %v, %v", r, err)
	}
	for who, c := range map[string]*client.Conn{"alice1": a1, "alice2": a2, "carol": cc} {
		recvGroupMessage(t, c, who, bob.addr(), g.GroupId, "b1", "ct-2", 2)
	}
	expectMarkers(t, bc, "bob", g.GroupId, map[wire.DeviceAddr]uint64{alice.addr(): 2, alice2.addr(): 2, {Account: "carol", Device: 1}: 2})

	// A stale membership version: GROUP_STALE with the current membership.
	old := proto.CloneOf(g)
	old.Version = 0
	_, err = groupSendAs(t, a1, alice.addr(), "m2", old, "ct-3")
	wantErr(t, err, wirepb.ErrorCode_GROUP_STALE)
	if we := err.(*wire.Error); !proto.Equal(we.Group, g) {
		t.Fatalf("stale error holds %v, want %v", we.Group, g)
	}

	// A member adds a device: the view is stale though the version is not.
	bob2, b2c := e.addDevice("bob")
	_, err = groupSendAs(t, a1, alice.addr(), "m2", g, "ct-3")
	wantErr(t, err, wirepb.ErrorCode_GROUP_STALE)
	cur := err.(*wire.Error).Group
	if cur.Version != g.Version || len(cur.Members[1].Devices) != 2 || cur.Members[1].Devices[1].DeviceId != bob2.id ||
		cur.Members[1].Devices[1].RegistrationId != bob2.reg {
		t.Fatalf("stale view error holds %v", cur)
	}
	// The view hash is the sender's: another device's view does not do.
	_, err = groupSendAs(t, a1, alice2.addr(), "m2", cur, "ct-3")
	wantErr(t, err, wirepb.ErrorCode_GROUP_STALE)
	// The retry with the same id and the current view goes through.
	if r, err := groupSendAs(t, a1, alice.addr(), "m2", cur, "ct-3"); err != nil || r.Seq != 3 {
		t.Fatalf("send after re-sync: %v, %v", r, err)
	}
	for who, c := range map[string]*client.Conn{"alice2": a2, "bob": bc, "bob2": b2c, "carol": cc} {
		recvGroupMessage(t, c, who, alice.addr(), g.GroupId, "m2", "ct-3", 3)
	}

	// Bad sends.
	_, err = groupSendAs(t, dc, wire.DeviceAddr{Account: "dave", Device: 1}, "d1", cur, "x")
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_GROUP)
	unknown := proto.CloneOf(cur)
	unknown.GroupId = "0123456789abcdef0123456789abcdef"
	_, err = groupSendAs(t, a1, alice.addr(), "x1", unknown, "x")
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_GROUP)
	bad := proto.CloneOf(cur)
	bad.GroupId = "0123456789ABCDEF0123456789ABCDEF"
	_, err = groupSendAs(t, a1, alice.addr(), "x1", bad, "x")
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST)
	_, err = groupSendAs(t, a1, alice.addr(), "", cur, "x")
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST)
	_, err = groupSendAs(t, a1, alice.addr(), "x1", cur, "")
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST)
	_, err = groupSendAs(t, a1, alice.addr(), "x1", cur, string(make([]byte, 1001)))
	wantErr(t, err, wirepb.ErrorCode_MESSAGE_TOO_LARGE)
	_, err = a1.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GroupSend{GroupSend: &wirepb.GroupSend{
		ClientMsgId: "x1", GroupId: cur.GroupId, MembershipVersion: cur.Version, ViewHash: wire.GroupViewHash(cur, alice.addr()),
		Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("x")}}})
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST)

	// A removed member's devices get nothing after the removal.
	g2, err := groupChange(t, a1, g.GroupId, wirepb.GroupChange_REMOVE, "carol")
	if err != nil {
		t.Fatal(err)
	}
	for who, c := range map[string]*client.Conn{"alice1": a1, "alice2": a2, "bob": bc, "bob2": b2c, "carol": cc} {
		expectUpdate(t, c, who, alice.addr(), g2)
	}
	_, err = groupSendAs(t, cc, wire.DeviceAddr{Account: "carol", Device: 1}, "c1", cur, "x")
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_GROUP)
	_, err = groupSendAs(t, a1, alice.addr(), "m3", cur, "ct-4") // the old version
	wantErr(t, err, wirepb.ErrorCode_GROUP_STALE)
	if r, err := groupSendAs(t, a1, alice.addr(), "m3", g2, "ct-4"); err != nil || r.Seq != 4 {
		t.Fatalf("send after removal: %v, %v", r, err)
	}
	for who, c := range map[string]*client.Conn{"alice2": a2, "bob": bc, "bob2": b2c} {
		recvGroupMessage(t, c, who, alice.addr(), g.GroupId, "m3", "ct-4", 4)
	}
	quiet(t, cc, "carol")
	expectMarkers(t, a1, "alice1", g.GroupId, map[wire.DeviceAddr]uint64{bob.addr(): 4, bob2.addr(): 4})
	if n := groupBodies(t, e.db); n != 0 {
		t.Errorf("%d bodies left after every device acked", n)
	}
}

func TestGroupSendAlone(t *testing.T) {
	// A member alone in a group with one device: the send is accepted
	// (it takes a sequence number) and goes nowhere.
	e := newDevEnv(t, Config{}, device.Options{})
	alice, a1 := e.registerPrimary("alice")
	g, err := groupCreate(t, a1, "me")
	if err != nil {
		t.Fatal(err)
	}
	expectUpdate(t, a1, "alice", alice.addr(), g)
	if r, err := groupSendAs(t, a1, alice.addr(), "m1", g, "x"); err != nil || r.Seq != 1 {
		t.Fatalf("send: %v, %v", r, err)
	}
	quiet(t, a1, "alice")
}

func TestSyncToAnotherAccount(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	alice, a1 := e.registerPrimary("alice")
	bob, bc := e.registerPrimary("bob")
	bob2, b2c := e.addDevice("bob")
	syncTo := func(id, user string, dev, reg uint32) (*wirepb.SendResult, error) {
		r, err := a1.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_SyncToDevice{SyncToDevice: &wirepb.SyncToDevice{
			Username: user, ClientMsgId: id, DeviceId: dev, RegistrationId: reg,
			Type: wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE, Content: []byte("skdm-" + id)}}})
		return r.GetSyncToDevice(), err
	}
	r, err := syncTo("k1", "bob", bob2.id, bob2.reg)
	if err != nil || r.Seq != 0 || r.Duplicate {
		t.Fatalf("sync: %v, %v", r, err)
	}
	env := nextEnvelope(t, b2c)
	if env.Sender != "alice" || env.SenderDevice != 1 || env.To != "bob" || env.Seq != 0 || string(env.Content) != "skdm-k1" ||
		env.Type != wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE || env.ClientMsgId != "k1" {
		t.Fatalf("envelope %v", env)
	}
	quiet(t, bc, "bob1") // only the named device
	if r2, err := syncTo("k1", "bob", bob2.id, bob2.reg); err != nil || !r2.Duplicate {
		t.Fatalf("retry: %v, %v", r2, err)
	}
	_, err = syncTo("k2", "bob", bob.id, bob.reg+1)
	wantErr(t, err, wirepb.ErrorCode_DEVICE_MISMATCH)
	if mm := err.(*wire.Error).Mismatch; len(mm.GetStale()) != 1 || mm.Stale[0].Username != "bob" || mm.Stale[0].DeviceId != 1 {
		t.Fatalf("mismatch %v", mm)
	}
	_, err = syncTo("k2", "bob", 9, 1)
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_DEVICE)
	_, err = syncTo("k2", "nobody", 1, 1)
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_ACCOUNT)
	_, err = syncTo("k2", "alice", 1, alice.reg) // its own device, named by account
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST)
	// Acking it makes no receipt for the sender.
	ack(t, b2c, env.Id)
	quiet(t, a1, "alice")
}
