package e2ee

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"testing"

	"go.mau.fi/libsignal/protocol"
	"google.golang.org/protobuf/proto"

	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire/wirepb"
)

const testGroup = "0123456789abcdef0123456789abcdef"

// skdm returns p's distribution message for group.
func (p *peer) skdm(group string) []byte {
	p.t.Helper()
	b, err := p.dev.SenderKeyDistribution(context.Background(), group)
	if err != nil {
		p.t.Fatalf("%s: SenderKeyDistribution: %v", p.name, err)
	}
	return b
}

// sendSenderKey sends msg for group pairwise from p to to (p needs a
// session with to) and returns to's Receive result.
func (p *peer) sendSenderKey(to *peer, group string, msg []byte) (*localstore.Message, error) {
	p.t.Helper()
	ct, err := p.dev.Encrypt(context.Background(), to.name, to.devID,
		&wirepb.Content{SenderKey: &wirepb.SenderKeyDistribution{GroupId: group, Message: msg}})
	if err != nil {
		p.t.Fatal(err)
	}
	env := to.envelope(p, to.name, ct.Type, ct.Content)
	env.Seq = 0 // SyncToDevice
	m, dup, err := to.dev.Receive(context.Background(), to.name, env)
	if dup || m == nil || !m.SenderKey || m.LocalID != 0 || m.EnvelopeID != env.Id {
		p.t.Fatalf("%s: sender key from %s: msg %+v dup %v err %v", to.name, p.name, m, dup, err)
	}
	if seen, _ := to.st.Seen(context.Background(), env.Id); !seen {
		p.t.Fatal("sender key envelope not marked seen")
	}
	return m, err
}

// distribute hands p's current sender key for group to every device in to.
func (p *peer) distribute(group string, to ...*peer) {
	p.t.Helper()
	msg := p.skdm(group)
	for _, r := range to {
		if m, err := p.sendSenderKey(r, group, msg); err != nil || m.Failed {
			p.t.Fatalf("%s: sender key from %s: %+v %v", r.name, p.name, m, err)
		}
		if ok, err := r.dev.HasSenderKey(context.Background(), group, p.name, p.devID); err != nil || !ok {
			p.t.Fatalf("%s holds no sender key of %s after distribution (%v)", r.name, p.name, err)
		}
	}
}

func (p *peer) groupEncrypt(group, text string) []byte {
	p.t.Helper()
	c := &wirepb.Content{Text: text, SentTimeMs: 1}
	b, err := p.dev.GroupEncrypt(context.Background(), group, c)
	if err != nil {
		p.t.Fatalf("%s: GroupEncrypt: %v", p.name, err)
	}
	if !bytes.Equal(c.GroupCheck, GroupCheck(group, text)) {
		p.t.Fatal("GroupEncrypt did not set the group check")
	}
	return b
}

// groupEnvelope wraps a sender-key message as the server would deliver it
// to p: seq is the group's.
func (p *peer) groupEnvelope(from *peer, group string, seq uint64, content []byte) *wirepb.Envelope {
	p.envID++
	return &wirepb.Envelope{Id: p.envID, Sender: from.name, SenderDevice: from.devID, Seq: seq,
		ServerTimeMs: 1700000000000 + int64(seq), Type: wirepb.EnvelopeType_SENDER_KEY_MESSAGE,
		Content: content, ClientMsgId: fmt.Sprintf("g%d-%d", seq, p.envID), GroupId: group}
}

func (p *peer) groupReceive(env *wirepb.Envelope, text string) *localstore.Message {
	p.t.Helper()
	m := p.receive(env, text)
	if m.Group != env.GroupId || m.Peer != "" || m.SenderKey || m.Outgoing != (env.Sender == p.name) {
		p.t.Fatalf("%s: group row %+v", p.name, m)
	}
	return m
}

// groupFail delivers env and expects a failed row in the group's history;
// it returns the error.
func (p *peer) groupFail(env *wirepb.Envelope) error {
	p.t.Helper()
	err := p.receiveFail(env)
	h, herr := p.st.History(context.Background(), "", env.GroupId)
	if herr != nil {
		p.t.Fatal(herr)
	}
	for _, m := range h {
		if m.EnvelopeID == env.Id && m.Failed && m.Group == env.GroupId && m.Peer == "" {
			return err
		}
	}
	p.t.Fatalf("no failed row for envelope %d in group %s", env.Id, env.GroupId)
	return nil
}

func (p *peer) groupHistory(group string) []string {
	p.t.Helper()
	h, err := p.st.History(context.Background(), "", group)
	if err != nil {
		p.t.Fatal(err)
	}
	var out []string
	for _, m := range h {
		if m.Failed {
			out = append(out, fmt.Sprintf("%d:FAILED", m.Seq))
		} else {
			out = append(out, fmt.Sprintf("%d:%s", m.Seq, m.Text))
		}
	}
	return out
}

// groupOf sets up alice (1 device) and bob (2 devices) with pairwise
// sessions from alice to both of bob's devices.
func groupOf(t *testing.T, o localstore.Options) (alice, bob1, bob2 *peer) {
	alice = newPeerWith(t, "alice", 1, 5, o)
	bob1 = newPeerWith(t, "bob", 1, 5, o)
	bob2 = newPeerWith(t, "bob", 2, 5, o)
	alice.connect(bob1, true)
	alice.connect(bob2, true)
	return
}

func TestGroupMessaging(t *testing.T) {
	ctx := context.Background()
	alice, bob1, bob2 := groupOf(t, localstore.Options{})
	alice.distribute(testGroup, bob1, bob2)
	// Nothing of the distribution reached the history.
	if h := bob1.history("alice"); len(h) != 0 {
		t.Fatalf("sender key left a history row: %+v", h)
	}

	const n = 50
	cts := make([][]byte, n)
	var want []string
	for i := range n {
		cts[i] = alice.groupEncrypt(testGroup, fmt.Sprint("m", i))
		want = append(want, fmt.Sprintf("%d:m%d", i+1, i))
	}
	// bob1 in order, bob2 shuffled: one ciphertext serves both.
	for i := range n {
		bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, uint64(i+1), cts[i]), fmt.Sprint("m", i))
	}
	for _, i := range mrand.Perm(n) {
		bob2.groupReceive(bob2.groupEnvelope(alice, testGroup, uint64(i+1), cts[i]), fmt.Sprint("m", i))
	}
	for _, b := range []*peer{bob1, bob2} {
		if got := b.groupHistory(testGroup); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("%s.%d group history %v", b.name, b.devID, got)
		}
		if h := b.history("alice"); len(h) != 0 {
			t.Fatalf("group messages in the 1:1 history: %+v", h)
		}
	}
	// Redelivery is a duplicate; a replay under a new envelope id fails.
	env := bob1.groupEnvelope(alice, testGroup, 1, cts[0])
	env.Id = 3 // delivered before
	if m, dup, err := bob1.dev.Receive(ctx, "bob", env); m != nil || !dup || err != nil {
		t.Fatalf("redelivery %v %v %v", m, dup, err)
	}
	bob1.groupFail(bob1.groupEnvelope(alice, testGroup, 1, cts[0]))

	// bob1 sends to the group: alice and his own other device (a sync
	// copy: Outgoing).
	bob1.connect(alice, true)
	bob1.connect(bob2, true)
	bob1.distribute(testGroup, alice, bob2)
	ct := bob1.groupEncrypt(testGroup, "from bob")
	alice.groupReceive(alice.groupEnvelope(bob1, testGroup, n+1, ct), "from bob")
	if m := bob2.groupReceive(bob2.groupEnvelope(bob1, testGroup, n+1, ct), "from bob"); !m.Outgoing {
		t.Fatal("own account's group message not outgoing")
	}
	// alice's own group messages are not in her history as received.
	if got := alice.groupHistory(testGroup); fmt.Sprint(got) != fmt.Sprintf("[%d:from bob]", n+1) {
		t.Fatalf("alice's group history %v", got)
	}

	// A second group has its own key.
	const other = "other-group"
	if bytes.Equal(alice.skdm(other), alice.skdm(testGroup)) {
		t.Fatal("two groups share a sender key")
	}
	bob1.groupFail(bob1.groupEnvelope(alice, other, 1, alice.groupEncrypt(other, "x")))
}

func TestGroupNoSenderKey(t *testing.T) {
	ctx := context.Background()
	alice, bob1, bob2 := groupOf(t, localstore.Options{})
	alice.distribute(testGroup, bob1)
	ct := alice.groupEncrypt(testGroup, "hello")
	err := bob2.groupFail(bob2.groupEnvelope(alice, testGroup, 1, ct))
	if !errors.Is(err, ErrNoSenderKey) || !errors.Is(err, ErrDecrypt) {
		t.Fatalf("without the key: %v", err)
	}
	// The key arrives late (re-sent on request): later messages decrypt,
	// the failed one stays failed.
	alice.distribute(testGroup, bob2)
	bob2.groupReceive(bob2.groupEnvelope(alice, testGroup, 2, alice.groupEncrypt(testGroup, "again")), "again")
	if got := bob2.groupHistory(testGroup); fmt.Sprint(got) != "[1:FAILED 2:again]" {
		t.Fatalf("history %v", got)
	}
	// A message from a device of the same account without a key, and one
	// without a group id.
	bob1.groupFail(bob1.groupEnvelope(bob2, testGroup, 3, ct))
	e := bob1.groupEnvelope(alice, "", 3, ct)
	if err := bob1.receiveFail(e); errors.Is(err, ErrNoSenderKey) {
		t.Fatal(err)
	}
	if h, _ := bob1.st.History(ctx, "alice", ""); len(h) != 1 || !h[0].Failed {
		t.Fatalf("group message without group id filed as %+v", h)
	}
	// bob1 still has the key.
	bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, 1, ct), "hello")
}

// After a rotation, a device that holds only the old key (a removed member)
// cannot read new messages; one that got the new key can, and still reads
// late messages under the old key.
func TestRotateSenderKey(t *testing.T) {
	ctx := context.Background()
	alice, bob1, bob2 := groupOf(t, localstore.Options{})
	if err := alice.st.SaveGroup(ctx, &wirepb.GroupInfo{GroupId: testGroup, Name: "g", Version: 1}); err != nil {
		t.Fatal(err)
	}
	alice.distribute(testGroup, bob1, bob2)
	if err := alice.st.MarkDistributed(ctx, testGroup, []string{"bob.1", "bob.2"}); err != nil {
		t.Fatal(err)
	}
	old := checkedSKDM(t, alice.skdm(testGroup))
	bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, 1, alice.groupEncrypt(testGroup, "before")), "before")
	late := alice.groupEncrypt(testGroup, "late") // under the old key, delivered after the rotation

	if err := alice.dev.RotateSenderKey(ctx, testGroup); err != nil {
		t.Fatal(err)
	}
	if d, err := alice.st.Distributed(ctx, testGroup); err != nil || d != nil {
		t.Fatalf("distribution set after rotation: %v %v", d, err)
	}
	// No sending key until the next distribution message makes one.
	if _, err := alice.dev.GroupEncrypt(ctx, testGroup, &wirepb.Content{Text: "x"}); !errors.Is(err, ErrNoSenderKey) {
		t.Fatalf("GroupEncrypt after rotation: %v", err)
	}
	now := checkedSKDM(t, alice.skdm(testGroup))
	// bob1 was removed: he gets nothing new.
	ct := alice.groupEncrypt(testGroup, "after")
	if now.ID == old.ID || bytes.Equal(now.SigningKey, old.SigningKey) || bytes.Equal(now.ChainKey, old.ChainKey) {
		t.Fatal("rotation kept the key")
	}
	err := bob1.groupFail(bob1.groupEnvelope(alice, testGroup, 3, ct))
	if !errors.Is(err, ErrNoSenderKey) {
		t.Fatalf("removed member: %v", err)
	}
	// bob2 gets the new key (from the iteration after "after").
	alice.distribute(testGroup, bob2)
	ct2 := alice.groupEncrypt(testGroup, "after 2")
	bob1.groupFail(bob1.groupEnvelope(alice, testGroup, 4, ct2))
	bob2.groupReceive(bob2.groupEnvelope(alice, testGroup, 4, ct2), "after 2")
	bob2.groupReceive(bob2.groupEnvelope(alice, testGroup, 2, late), "late")
	// The distribution message came after "after": its key is not in it.
	bob2.groupFail(bob2.groupEnvelope(alice, testGroup, 3, ct))
	if got := bob2.groupHistory(testGroup); fmt.Sprint(got) != "[2:late 3:FAILED 4:after 2]" {
		t.Fatalf("bob2 history %v", got)
	}
	// Rotating twice in a row and rotating a group never used are fine.
	for range 2 {
		if err := alice.dev.RotateSenderKey(ctx, "unused"); err != nil {
			t.Fatal(err)
		}
	}

	// ForgetGroup drops received keys too.
	if err := bob2.dev.ForgetGroup(ctx, testGroup); err != nil {
		t.Fatal(err)
	}
	if ok, _ := bob2.dev.HasSenderKey(ctx, testGroup, "alice", 1); ok {
		t.Fatal("key kept after ForgetGroup")
	}
	err = bob2.groupFail(bob2.groupEnvelope(alice, testGroup, 5, alice.groupEncrypt(testGroup, "gone")))
	if !errors.Is(err, ErrNoSenderKey) {
		t.Fatal(err)
	}
}

func checkedSKDM(t *testing.T, b []byte) *protocol.SenderKeyDistributionMessageStructure {
	t.Helper()
	s, err := checkSKDM(b)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// A re-sent distribution of a key bob holds changes nothing: skipped
// message keys survive it.
func TestSenderKeyResent(t *testing.T) {
	alice, bob1, _ := groupOf(t, localstore.Options{})
	alice.distribute(testGroup, bob1)
	var cts [][]byte
	for i := range 5 {
		cts = append(cts, alice.groupEncrypt(testGroup, fmt.Sprint(i)))
	}
	bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, 5, cts[4]), "4")
	alice.distribute(testGroup, bob1) // now at iteration 5
	for i := range 4 {
		bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, uint64(i+1), cts[i]), fmt.Sprint(i))
	}
}

func TestGroupEncryptArguments(t *testing.T) {
	ctx := context.Background()
	p := newPeer(t, "alice", 1, 0)
	long := strings.Repeat("a", MaxGroupIDLen+1)
	for _, g := range []string{"", long, "has space", "tab\t", "é"} {
		if _, err := p.dev.GroupEncrypt(ctx, g, &wirepb.Content{}); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("GroupEncrypt(%q): %v", g, err)
		}
		if _, err := p.dev.SenderKeyDistribution(ctx, g); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("SenderKeyDistribution(%q): %v", g, err)
		}
		if err := p.dev.RotateSenderKey(ctx, g); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("RotateSenderKey(%q): %v", g, err)
		}
		if err := p.dev.ForgetGroup(ctx, g); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("ForgetGroup(%q): %v", g, err)
		}
	}
	for _, c := range []*wirepb.Content{nil, {History: &wirepb.HistoryChunk{}},
		{SenderKey: &wirepb.SenderKeyDistribution{GroupId: testGroup}}} {
		if _, err := p.dev.GroupEncrypt(ctx, testGroup, c); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("GroupEncrypt(%v): %v", c, err)
		}
	}
	// No key yet.
	if _, err := p.dev.GroupEncrypt(ctx, testGroup, &wirepb.Content{Text: "x"}); !errors.Is(err, ErrNoSenderKey) {
		t.Fatalf("GroupEncrypt without a key: %v", err)
	}
	// A group message is signed (SignedSerialize) and padded.
	p.skdm(testGroup)
	b := p.groupEncrypt(testGroup, "x")
	s, err := checkSenderKeyMessage(b)
	if err != nil || len(s.Signature) != 64 || len(s.CipherText) != PadBlock+16 {
		t.Fatalf("sender key message: %+v %v", s, err)
	}
	if _, ok, _ := p.st.Group(ctx, testGroup); ok {
		t.Fatal("GroupEncrypt saved a group")
	}
}

// Flipping any byte of a sender-key message never yields a row with other
// text, and leaves the receiver's state intact.
func TestTamperedGroupMessages(t *testing.T) {
	alice, bob1, _ := groupOf(t, localstore.Options{NoSync: true})
	alice.distribute(testGroup, bob1)
	const text = "the real text"
	ct := alice.groupEncrypt(testGroup, text)
	accepted := 0
	for i := range ct {
		for _, x := range []byte{0x01, 0x80, 0xff} {
			bad := bytes.Clone(ct)
			bad[i] ^= x
			env := bob1.groupEnvelope(alice, testGroup, 1, bad)
			m, dup, err := bob1.dev.Receive(context.Background(), "bob", env)
			switch {
			case dup || m == nil:
				t.Fatalf("byte %d ^%#x: %v %v %v", i, x, m, dup, err)
			case err == nil && (m.Failed || m.Text != text):
				t.Fatalf("byte %d ^%#x: accepted as %+v", i, x, m)
			case err == nil:
				accepted++
			case !errors.Is(err, ErrDecrypt) || !m.Failed || m.Text != "":
				t.Fatalf("byte %d ^%#x: %+v %v", i, x, m, err)
			}
		}
	}
	if accepted > 0 {
		t.Logf("%d variants decrypted to the same text", accepted)
		return
	}
	bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, 1, ct), text)
	// Truncations and extensions.
	for _, bad := range [][]byte{ct[:len(ct)-1], ct[:len(ct)-64], ct[:1], append(bytes.Clone(ct), 0)} {
		bob1.groupFail(bob1.groupEnvelope(alice, testGroup, 2, bad))
	}
	bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, 2, alice.groupEncrypt(testGroup, "next")), "next")
}

// The group check catches plaintexts that decrypt but are not the group's
// message: unpadded, not a Content, without or with a wrong check, or a
// message of another group whose key was (somehow) the same.
func TestGroupCheck(t *testing.T) {
	ctx := context.Background()
	alice, bob1, _ := groupOf(t, localstore.Options{NoSync: true})
	alice.distribute(testGroup, bob1)
	seq := uint64(0)
	raw := func(pt []byte) *wirepb.Envelope {
		t.Helper()
		b, err := alice.dev.groupEncryptRaw(ctx, testGroup, pt)
		if err != nil {
			t.Fatal(err)
		}
		seq++
		return bob1.groupEnvelope(alice, testGroup, seq, b)
	}
	content := func(c *wirepb.Content) []byte {
		b, err := proto.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		return Pad(b)
	}
	for i, pt := range [][]byte{
		{1, 2, 3},
		Pad([]byte{0xff, 0xff}),
		content(&wirepb.Content{Text: "no check"}),
		content(&wirepb.Content{Text: "short check", GroupCheck: GroupCheck(testGroup, "short check")[:15]}),
		content(&wirepb.Content{Text: "wrong text", GroupCheck: GroupCheck(testGroup, "other text")}),
		content(&wirepb.Content{Text: "wrong group", GroupCheck: GroupCheck("other", "wrong group")}),
	} {
		if err := bob1.groupFail(raw(pt)); errors.Is(err, ErrNoSenderKey) {
			t.Fatalf("plaintext %d: %v", i, err)
		}
	}
	bob1.groupReceive(raw(content(&wirepb.Content{Text: "ok", GroupCheck: GroupCheck(testGroup, "ok")})), "ok")

	// Move alice's key for testGroup into the slot of another group in
	// bob1's store: the message decrypts there, the check refuses it.
	err := bob1.st.Update(ctx, func(tx *localstore.Tx) error {
		r, ok, err := tx.SenderKey(ctx, testGroup, "alice:1")
		if err != nil || !ok {
			return fmt.Errorf("%v %v", ok, err)
		}
		return tx.SaveSenderKey(ctx, "other", "alice:1", r)
	})
	if err != nil {
		t.Fatal(err)
	}
	ct := alice.groupEncrypt(testGroup, "for testGroup")
	if err := bob1.groupFail(bob1.groupEnvelope(alice, "other", 1, ct)); !strings.Contains(err.Error(), errGroupCheck.Error()) {
		t.Fatalf("message moved to another group: %v", err)
	}
	bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, 99, ct), "for testGroup")
}

// A wrong chain key (here: alice's key id and signing key with another
// chain key) decrypts some messages to garbage without an error from
// libsignal; the group check refuses every one of them.
func TestWrongChainKeyGarbage(t *testing.T) {
	ctx := context.Background()
	alice, bob1, _ := groupOf(t, localstore.Options{NoSync: true})
	good := checkedSKDM(t, alice.skdm(testGroup))
	ct := alice.groupEncrypt(testGroup, "secret")
	s, err := checkSenderKeyMessage(ct)
	if err != nil {
		t.Fatal(err)
	}
	from := protocol.NewSignalAddress("alice", 1)
	garbage, tries := 0, 0
	err = bob1.st.Update(ctx, func(tx *localstore.Tx) error {
		ss := bob1.dev.sigStore(tx)
		for ; tries < 2000 && garbage < 50; tries++ {
			forged := *good
			forged.ChainKey = make([]byte, 32)
			rand.Read(forged.ChainKey)
			if err := tx.DeleteSenderKeys(ctx, testGroup); err != nil {
				return err
			}
			sk := &wirepb.SenderKeyDistribution{GroupId: testGroup, Message: ser.SenderKeyDistributionMessage.Serialize(&forged)}
			if err := processSenderKey(ctx, ss, from, sk); err != nil {
				return err
			}
			// libsignal decrypts in place: every try needs its own copy.
			msg := *s
			msg.CipherText = bytes.Clone(s.CipherText)
			pt, err := decryptGroup(ctx, ss, testGroup, from, &msg)
			if err != nil {
				continue // bad CBC padding (libsignal checks only its length byte)
			}
			garbage++
			c, err := decodeContent(pt)
			if err == nil {
				err = checkGroupContent(testGroup, c)
			}
			if err == nil {
				return fmt.Errorf("garbage %x passed as %q", pt, c.Text)
			}
		}
		return errRollback
	})
	if !errors.Is(err, errRollback) {
		t.Fatal(err)
	}
	t.Logf("%d tries, %d decrypted to garbage without a libsignal error", tries, garbage)
	if garbage == 0 {
		t.Fatal("never decrypted to garbage: the test does not test anything")
	}
	// End to end: a device with a forged chain key records failures only.
	forged := *good
	forged.ChainKey = bytes.Repeat([]byte{7}, 32)
	alice.sendSenderKey(bob1, testGroup, ser.SenderKeyDistributionMessage.Serialize(&forged))
	bob1.groupFail(bob1.groupEnvelope(alice, testGroup, 1, ct))
	for i := range 20 {
		bob1.groupFail(bob1.groupEnvelope(alice, testGroup, uint64(i+2), alice.groupEncrypt(testGroup, "x")))
	}
}

func TestMalformedSenderKeyDistribution(t *testing.T) {
	alice, bob1, _ := groupOf(t, localstore.Options{NoSync: true})
	good := alice.skdm(testGroup)
	s := checkedSKDM(t, good)
	reser := func(f func(*protocol.SenderKeyDistributionMessageStructure)) []byte {
		c := *s
		f(&c)
		return ser.SenderKeyDistributionMessage.Serialize(&c)
	}
	random := make([]byte, 80)
	rand.Read(random)
	bad := map[string][]byte{
		"nil":            nil,
		"empty":          {},
		"one byte":       {0x33},
		"one other byte": {0x00},
		"random":         random,
		"random 0x33":    append([]byte{0x33}, random...),
		"version 0x23":   append([]byte{0x23}, good[1:]...),
		"version 0x34":   append([]byte{0x34}, good[1:]...),
		"no signing key": reser(func(c *protocol.SenderKeyDistributionMessageStructure) { c.SigningKey = nil }),
		"short signing key": reser(func(c *protocol.SenderKeyDistributionMessageStructure) {
			c.SigningKey = c.SigningKey[:32]
		}),
		"signing key type": reser(func(c *protocol.SenderKeyDistributionMessageStructure) {
			c.SigningKey = append([]byte{0x06}, c.SigningKey[1:]...)
		}),
		"no chain key":    reser(func(c *protocol.SenderKeyDistributionMessageStructure) { c.ChainKey = nil }),
		"short chain key": reser(func(c *protocol.SenderKeyDistributionMessageStructure) { c.ChainKey = c.ChainKey[:31] }),
		"too long":        append(bytes.Clone(good), make([]byte, maxSKDM)...),
	}
	for i := range len(good) - 1 {
		bad[fmt.Sprint("truncated to ", i)] = good[:i]
	}
	before := recovered.Load()
	for name, b := range bad {
		m, err := alice.sendSenderKey(bob1, testGroup, b)
		if !errors.Is(err, ErrDecrypt) || !errors.Is(err, ErrInvalidSenderKey) || !m.Failed {
			t.Fatalf("%s: %+v %v", name, m, err)
		}
		if _, err := checkSKDM(b); err == nil {
			t.Fatalf("%s: checkSKDM accepted it", name)
		}
	}
	for _, g := range []string{"", "has space", strings.Repeat("x", MaxGroupIDLen+1)} {
		m, err := alice.sendSenderKey(bob1, g, good)
		if !errors.Is(err, ErrInvalidSenderKey) || !m.Failed {
			t.Fatalf("group id %q: %+v %v", g, m, err)
		}
	}
	if n := recovered.Load() - before; n != 0 {
		t.Fatalf("%d library panics reached safe(): validate more", n)
	}
	if ok, _ := bob1.dev.HasSenderKey(context.Background(), testGroup, "alice", 1); ok {
		t.Fatal("a malformed distribution stored a key")
	}
	if h := bob1.history("alice"); len(h) != 0 {
		t.Fatalf("history rows: %+v", h)
	}
	// The pairwise session and the group still work.
	alice.distribute(testGroup, bob1)
	bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, 1, alice.groupEncrypt(testGroup, "fine")), "fine")
	bob1.receive(bob1.envFrom(alice, alice.encrypt(bob1, "1:1")), "1:1")
}

func TestGroupPersistence(t *testing.T) {
	alice, bob1, bob2 := groupOf(t, localstore.Options{})
	alice.distribute(testGroup, bob1, bob2)
	key := checkedSKDM(t, alice.skdm(testGroup))
	var cts [][]byte
	for i := range 6 {
		cts = append(cts, alice.groupEncrypt(testGroup, fmt.Sprint(i)))
	}
	bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, 4, cts[3]), "3")

	alice.reopen()
	bob1.reopen()
	bob2.reopen()

	if k := checkedSKDM(t, alice.skdm(testGroup)); k.ID != key.ID || !bytes.Equal(k.SigningKey, key.SigningKey) || k.Iteration != 6 {
		t.Fatalf("alice's key after reopen: id %d iteration %d", k.ID, k.Iteration)
	}
	cts = append(cts, alice.groupEncrypt(testGroup, "6"))
	for _, i := range []int{6, 0, 2, 1, 5, 4} {
		bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, uint64(i+1), cts[i]), fmt.Sprint(i))
	}
	for i := range cts {
		bob2.groupReceive(bob2.groupEnvelope(alice, testGroup, uint64(i+1), cts[i]), fmt.Sprint(i))
	}
	bob1.reopen()
	if got := bob1.groupHistory(testGroup); fmt.Sprint(got) != "[1:0 2:1 3:2 4:3 5:4 6:5 7:6]" {
		t.Fatalf("history after reopen %v", got)
	}
}

// A device whose store was written by schema version 1 (before groups)
// keeps its sessions after the migration and can join a group.
func TestGroupsAfterMigrationFromV1(t *testing.T) {
	alice, bob1, _ := groupOf(t, localstore.Options{})
	bob1.receive(bob1.envFrom(alice, alice.encrypt(bob1, "v1")), "v1")
	// Turn bob1's file back into a version 1 file.
	if err := bob1.st.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite", bob1.path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{`DROP TABLE sender_keys`, `DROP TABLE groups`, `DROP INDEX messages_by_group`, `ALTER TABLE messages DROP COLUMN read`,
		`PRAGMA user_version = 1`} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	st, err := localstore.Open(bob1.path)
	if err != nil {
		t.Fatal(err)
	}
	bob1.st = st
	if bob1.dev, err = Load(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	alice.distribute(testGroup, bob1)
	bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, 1, alice.groupEncrypt(testGroup, "v2")), "v2")
	if h := bob1.history("alice"); len(h) != 1 || h[0].Text != "v1" {
		t.Fatalf("1:1 history %+v", h)
	}
}

// Corrupt stored sender keys are errors, not panics. A message that needs
// one is recorded as failed (as with a corrupt session).
func TestCorruptSenderKeyRecord(t *testing.T) {
	ctx := context.Background()
	alice, bob1, _ := groupOf(t, localstore.Options{})
	alice.distribute(testGroup, bob1)
	ct := alice.groupEncrypt(testGroup, "x")
	before := recovered.Load()
	for _, rec := range [][]byte{{}, []byte("{"), []byte(`{"SenderKeyStates":[null]}`),
		[]byte(`{"SenderKeyStates":[{"KeyID":1}]}`),
		[]byte(`{"SenderKeyStates":[{"KeyID":1,"SenderChainKey":{"Iteration":0,"ChainKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}]}`)} {
		err := bob1.st.Update(ctx, func(tx *localstore.Tx) error { return tx.SaveSenderKey(ctx, testGroup, "alice:1", rec) })
		if err != nil {
			t.Fatal(err)
		}
		if err := bob1.groupFail(bob1.groupEnvelope(alice, testGroup, 1, ct)); !errors.Is(err, errCorrupt) {
			t.Fatalf("record %q: %v", rec, err)
		}
		err = alice.st.Update(ctx, func(tx *localstore.Tx) error {
			return tx.SaveSenderKey(ctx, testGroup, localstore.OwnSenderKey, rec)
		})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := alice.dev.GroupEncrypt(ctx, testGroup, &wirepb.Content{}); !errors.Is(err, errCorrupt) {
			t.Fatalf("own record %q: %v", rec, err)
		}
	}
	if n := recovered.Load() - before; n != 0 {
		t.Fatalf("%d library panics on corrupt records", n)
	}
	// Rotation recovers the sender, a new distribution the receiver.
	if err := alice.dev.RotateSenderKey(ctx, testGroup); err != nil {
		t.Fatal(err)
	}
	alice.distribute(testGroup, bob1)
	bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, 2, alice.groupEncrypt(testGroup, "y")), "y")
}

// Two processes (a `ferry recv` and a `ferry send`) send to the group from
// one store at once: the chain never forks, every message decrypts.
func TestGroupEncryptTwoProcesses(t *testing.T) {
	ctx := context.Background()
	alice, bob1, _ := groupOf(t, localstore.Options{})
	alice.distribute(testGroup, bob1)
	st2, err := localstore.Open(alice.path)
	if err != nil {
		t.Fatal(err)
	}
	defer st2.Close()
	other, err := Load(ctx, st2)
	if err != nil {
		t.Fatal(err)
	}
	const n = 15
	out := make([][][]byte, 2)
	var wg sync.WaitGroup
	for w, d := range []*Device{alice.dev, other} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range n {
				b, err := d.GroupEncrypt(ctx, testGroup, &wirepb.Content{Text: fmt.Sprintf("%d-%d", w, i)})
				if err != nil {
					t.Error(err)
					return
				}
				out[w] = append(out[w], b)
			}
		}()
	}
	wg.Wait()
	seq := uint64(0)
	for w := range out {
		for i, b := range out[w] {
			seq++
			bob1.groupReceive(bob1.groupEnvelope(alice, testGroup, seq, b), fmt.Sprintf("%d-%d", w, i))
		}
	}
}
