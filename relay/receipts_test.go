package relay

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// settle collects every envelope that arrives on c until it is quiet for a
// while, without acking.
func settle(t *testing.T, c *client.Conn) []*wirepb.Envelope {
	t.Helper()
	var out []*wirepb.Envelope
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				t.Fatalf("connection closed: %v", c.Err())
			}
			if e := ev.GetEnvelope(); e != nil {
				out = append(out, e)
			}
		case <-time.After(300 * time.Millisecond):
			return out
		}
	}
}

func receiptsOf(envs []*wirepb.Envelope) []*wirepb.Receipt {
	var out []*wirepb.Receipt
	for _, e := range envs {
		if e.Type == wirepb.EnvelopeType_RECEIPT {
			out = append(out, e.Receipt)
		}
	}
	return out
}

func reads(rs []*wirepb.Receipt) []*wirepb.Receipt {
	var out []*wirepb.Receipt
	for _, r := range rs {
		if r.Kind == wirepb.ReceiptKind_READ {
			out = append(out, r)
		}
	}
	return out
}

func nonReceipts(envs []*wirepb.Envelope) []*wirepb.Envelope {
	var out []*wirepb.Envelope
	for _, e := range envs {
		if e.Type != wirepb.EnvelopeType_RECEIPT {
			out = append(out, e)
		}
	}
	return out
}

// pending returns the receipts held in dev's inbox.
func (e *env) pending(dev wire.DeviceAddr) []*wirepb.Receipt {
	e.t.Helper()
	items, err := e.inbox.Range(context.Background(), dev, 0, 1<<20)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []*wirepb.Receipt
	for _, it := range items {
		if it.Env.Type == wirepb.EnvelopeType_RECEIPT {
			out = append(out, it.Env.Receipt)
		}
	}
	return out
}

// ackChunks acks the ids of envs in acks of n ids; it returns how many acks.
func ackChunks(t *testing.T, c *client.Conn, envs []*wirepb.Envelope, n int) int {
	t.Helper()
	acks := 0
	for i := 0; i < len(envs); i += n {
		var ids []uint64
		for _, e := range envs[i:min(i+n, len(envs))] {
			ids = append(ids, e.Id)
		}
		ack(t, c, ids...)
		acks++
	}
	return acks
}

// sendAll sends a 1:1 message from from to every device of to and from's
// other devices.
func sendAll(t *testing.T, c *client.Conn, from *mdev, id, to string, devs ...*mdev) {
	t.Helper()
	s := &wirepb.Send{ClientMsgId: id, To: to}
	for _, d := range devs {
		if d.addr() != from.addr() {
			s.Ciphertexts = append(s.Ciphertexts, &wirepb.DeviceCiphertext{Username: d.name, DeviceId: d.id,
				RegistrationId: d.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("ct-" + id)})
		}
	}
	if _, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: s}}); err != nil {
		t.Fatalf("send %s: %v", id, err)
	}
}

func markRead(t *testing.T, c *client.Conn, m *wirepb.MarkRead) error {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_MarkRead{MarkRead: m}})
	if err == nil && r.GetMarkRead() == nil {
		t.Fatalf("mark_read answered %v", r)
	}
	return err
}

func isMarker(r *wirepb.Receipt, kind wirepb.ReceiptKind, reader wire.DeviceAddr, to, groupID string, seq uint64) bool {
	return r.GetKind() == kind && r.Username == reader.Account && r.DeviceId == reader.Device && r.To == to &&
		r.GroupId == groupID && r.Seq == seq && r.ClientMsgId == ""
}

func TestDirectReceiptMarkers(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	alice, a1 := e.registerPrimary("alice")
	alice2, a2 := e.addDevice("alice")
	bob, bc := e.registerPrimary("bob")
	bob2, b2c := e.addDevice("bob")
	all := []*mdev{alice, alice2, bob, bob2}

	const n = 20
	for i := 1; i <= n; i++ {
		sendAll(t, a1, alice, fmt.Sprint("m", i), "bob", all...)
	}
	a1.Close() // alice1 comes back after the acks
	got := settle(t, bc)
	if len(got) != n {
		t.Fatalf("bob got %d envelopes, want %d", len(got), n)
	}
	acks := ackChunks(t, bc, got, 6)
	// alice2 is online: it is handed at most one marker per ack.
	sync := settle(t, a2)
	if rs := receiptsOf(sync); len(rs) == 0 || len(rs) > acks {
		t.Fatalf("alice2 got %d receipts for %d acks", len(rs), acks)
	}
	ackChunks(t, a2, nonReceipts(sync), 64) // sync copies: no receipt for alice
	// Either way, one marker is pending, from bob1, up to seq 20.
	for _, d := range []*mdev{alice, alice2} {
		if rs := e.pending(d.addr()); len(rs) != 1 || !isMarker(rs[0], wirepb.ReceiptKind_DELIVERED, bob.addr(), "bob", "", n) {
			t.Fatalf("%s holds receipts %v, want one DELIVERED up to %d", d.addr(), rs, n)
		}
	}
	a1 = e.authDev(alice, false)
	rs := receiptsOf(settle(t, a1))
	if len(rs) != 1 || !isMarker(rs[0], wirepb.ReceiptKind_DELIVERED, bob.addr(), "bob", "", n) {
		t.Fatalf("alice1 got receipts %v after reconnecting, want one DELIVERED up to %d", rs, n)
	}
	for _, d := range []*mdev{bob, bob2} {
		if rs := e.pending(d.addr()); len(rs) != 0 {
			t.Fatalf("%s holds receipts %v, want none (acks of sync copies make none)", d.addr(), rs)
		}
	}

	// bob1 marks the conversation read: alice's devices and bob2 hear of it.
	if err := markRead(t, bc, &wirepb.MarkRead{Peer: "alice", Seq: n}); err != nil {
		t.Fatal(err)
	}
	for _, x := range []struct {
		who string
		c   *client.Conn
	}{{"alice1", a1}, {"alice2", a2}, {"bob2", b2c}} { // bob2 last: its acks make DELIVERED markers for alice
		envs := settle(t, x.c)
		rs := receiptsOf(envs)
		if len(rs) != 1 || !isMarker(rs[0], wirepb.ReceiptKind_READ, bob.addr(), "alice", "", n) {
			t.Fatalf("%s got %v, want one READ up to %d", x.who, envs, n)
		}
		if x.who != "alice1" { // alice1 leaves it pending
			ackChunks(t, x.c, envs, 64)
		}
	}
	if rs := e.pending(bob.addr()); len(rs) != 0 {
		t.Fatalf("bob1 holds %v, want nothing of its own mark", rs)
	}
	// A lower mark from another of bob's devices does not replace the
	// pending one; a higher one does, with that device named.
	if err := markRead(t, b2c, &wirepb.MarkRead{Peer: "alice", Seq: 5}); err != nil {
		t.Fatal(err)
	}
	if rs := reads(e.pending(alice.addr())); len(rs) != 1 || !isMarker(rs[0], wirepb.ReceiptKind_READ, bob.addr(), "alice", "", n) {
		t.Fatalf("alice1 holds READs %v, want one up to %d", rs, n)
	}
	if err := markRead(t, b2c, &wirepb.MarkRead{Peer: "alice", Seq: n + 1}); err != nil {
		t.Fatal(err)
	}
	if rs := reads(e.pending(alice.addr())); len(rs) != 1 || !isMarker(rs[0], wirepb.ReceiptKind_READ, bob2.addr(), "alice", "", n+1) {
		t.Fatalf("alice1 holds READs %v, want one up to %d from bob2", rs, n+1)
	}

	// Bad requests.
	wantErr(t, markRead(t, bc, &wirepb.MarkRead{Seq: 1}), wirepb.ErrorCode_BAD_REQUEST)
	wantErr(t, markRead(t, bc, &wirepb.MarkRead{Peer: "alice", GroupId: "0123456789abcdef0123456789abcdef", Seq: 1}), wirepb.ErrorCode_BAD_REQUEST)
	wantErr(t, markRead(t, bc, &wirepb.MarkRead{Peer: "alice"}), wirepb.ErrorCode_BAD_REQUEST)
	wantErr(t, markRead(t, bc, &wirepb.MarkRead{Peer: "nobody", Seq: 1}), wirepb.ErrorCode_UNKNOWN_ACCOUNT)
	wantErr(t, markRead(t, bc, &wirepb.MarkRead{GroupId: "0123456789abcdef0123456789abcdef", Seq: 1}), wirepb.ErrorCode_UNKNOWN_GROUP)
	wantErr(t, markRead(t, bc, &wirepb.MarkRead{GroupId: "nothex", Seq: 1}), wirepb.ErrorCode_BAD_REQUEST)
}

func TestGroupReceiptMarkers(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	alice, a1 := e.registerPrimary("alice")
	alice2, a2 := e.addDevice("alice")
	bob, bc := e.registerPrimary("bob")
	carol, cc := e.registerPrimary("carol")
	dave, dc := e.registerPrimary("dave")
	g, err := groupCreate(t, a1, "team", "bob", "carol")
	if err != nil {
		t.Fatal(err)
	}
	conns := map[*mdev]*client.Conn{alice: a1, alice2: a2, bob: bc, carol: cc}
	for d, c := range conns {
		expectUpdate(t, c, d.name, alice.addr(), g)
	}

	// 10 messages from alice1 and bob, interleaved.
	maxSeq := map[string]uint64{}
	for i := range 10 {
		from, c := alice, a1
		if i%3 == 1 {
			from, c = bob, bc
		}
		r, err := groupSendAs(t, c, from.addr(), fmt.Sprint("g", i), g, "x")
		if err != nil {
			t.Fatal(err)
		}
		maxSeq[from.name] = r.Seq
	}
	// Every reader device acks what it got, in acks of 3.
	for _, d := range []*mdev{alice2, bob, carol, alice} {
		var msgs []*wirepb.Envelope
		for _, env := range settle(t, conns[d]) {
			if env.Type == wirepb.EnvelopeType_SENDER_KEY_MESSAGE {
				msgs = append(msgs, env)
			}
		}
		ackChunks(t, conns[d], msgs, 3)
	}

	want := map[wire.DeviceAddr][]wire.DeviceAddr{ // sender device: reader devices
		alice.addr():  {bob.addr(), carol.addr()},
		alice2.addr(): {bob.addr(), carol.addr()},
		bob.addr():    {alice.addr(), alice2.addr(), carol.addr()},
		carol.addr():  nil,
	}
	for sender, readers := range want {
		rs := e.pending(sender)
		if len(rs) != len(readers) {
			t.Fatalf("%s holds %d receipts %v, want one per reader device %v", sender, len(rs), rs, readers)
		}
		for _, rd := range readers {
			found := 0
			for _, r := range rs {
				if isMarker(r, wirepb.ReceiptKind_DELIVERED, rd, "", g.GroupId, maxSeq[sender.Account]) {
					found++
				}
			}
			if found != 1 {
				t.Fatalf("%s holds %v, want one DELIVERED from %s up to %d", sender, rs, rd, maxSeq[sender.Account])
			}
		}
	}

	// carol reads: every other member device and none of hers (she has one).
	if err := markRead(t, cc, &wirepb.MarkRead{GroupId: g.GroupId, Seq: 10}); err != nil {
		t.Fatal(err)
	}
	for _, d := range []*mdev{alice, alice2, bob} {
		n := 0
		for _, r := range e.pending(d.addr()) {
			if isMarker(r, wirepb.ReceiptKind_READ, carol.addr(), "", g.GroupId, 10) {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("%s holds %v, want one READ from carol", d.addr(), e.pending(d.addr()))
		}
	}
	if rs := e.pending(carol.addr()); len(rs) != 0 {
		t.Fatalf("carol holds %v", rs)
	}
	// A non-member may not mark it.
	wantErr(t, markRead(t, dc, &wirepb.MarkRead{GroupId: g.GroupId, Seq: 1}), wirepb.ErrorCode_UNKNOWN_GROUP)
	_ = dave
}
