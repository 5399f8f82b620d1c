package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/client/e2ee"
	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// A group of three people, bob with two devices: every send reaches every
// other member device exactly once, in group-sequence order; a removed
// member gets nothing afterwards.
func TestBlackBoxGroups(t *testing.T) {
	srv := startServer(t, t.TempDir())
	alice := register(t, srv, "alice")
	bob := register(t, srv, "bob")
	carol := register(t, srv, "carol")
	bob2, _ := link(t, srv, bob)

	out := mustFerry(t, alice, "group", "create", "team", "bob", "carol")
	if !strings.Contains(out, "created group team") {
		t.Fatalf("create printed %q", out)
	}
	if out := mustFerry(t, bob, "group", "info", "team"); !strings.Contains(out, "alice (admin)") || !strings.Contains(out, "bob: devices 1,2") {
		t.Fatalf("group info: %q", out)
	}

	// Alternate senders; everybody else sees every message once, in order.
	var want []string
	for i := range 3 {
		for _, s := range []struct{ name, home string }{{"alice", alice}, {"bob", bob}, {"carol", carol}} {
			text := fmt.Sprintf("%s-%d", s.name, i)
			mustFerry(t, s.home, "group", "send", "team", text)
			want = append(want, text)
		}
	}
	for name, home := range map[string]string{"alice": alice, "bob": bob, "bob2": bob2, "carol": carol} {
		got := parseLines(t, mustFerry(t, home, "recv", "--json"))
		var texts []string
		var last uint64
		for _, l := range got {
			if l.Group == "" || l.Type != "message" {
				continue // 1:1 traffic, and receipts (checked in TestBlackBoxReceiptsAreMarkers)
			}
			if l.Group != "team" {
				t.Fatalf("%s: group %q, want the name team", name, l.Group)
			}
			if l.Seq <= last {
				t.Fatalf("%s: seq %d after %d", name, l.Seq, last)
			}
			last = l.Seq
			texts = append(texts, l.Text)
		}
		var expect []string
		for _, w := range want {
			if !strings.HasPrefix(w, strings.TrimSuffix(name, "2")+"-") || name == "bob2" {
				expect = append(expect, w)
			}
		}
		if fmt.Sprint(texts) != fmt.Sprint(expect) {
			t.Fatalf("%s received %v, want %v", name, texts, expect)
		}
	}

	// Carol is removed: she is told, and gets nothing after.
	mustFerry(t, alice, "group", "remove", "team", "carol")
	mustFerry(t, alice, "group", "send", "team", "without carol")
	// Carol's device, which holds alice's old sender key, cannot read the
	// ciphertext the server stored for the others (alice rotated her key).
	env := newestGroupMessage(t, srv)
	if err := decryptAs(t, carol, "carol", env); !errors.Is(err, e2ee.ErrNoSenderKey) {
		t.Fatalf("carol's device on the message after her removal: %v, want ErrNoSenderKey", err)
	}
	for _, l := range parseLines(t, mustFerry(t, carol, "recv", "--json")) {
		if l.Text == "without carol" {
			t.Fatal("a removed member received a group message")
		}
	}
	for name, home := range map[string]string{"bob": bob, "bob2": bob2} {
		var msgs []line
		for _, l := range parseLines(t, mustFerry(t, home, "recv", "--json")) {
			if l.Type == "message" {
				msgs = append(msgs, l)
			}
		}
		if len(msgs) != 1 || msgs[0].Text != "without carol" {
			t.Fatalf("%s got %+v after the removal", name, msgs)
		}
	}
	if _, errs, code := ferry(t, carol, "group", "send", "team", "let me in"); code == 0 {
		t.Fatalf("a removed member could send: %q", errs)
	}
}

// Receipts are "up to seq N" markers: however many messages, a sender gets
// one delivered and one read line per reader device and conversation.
func TestBlackBoxReceiptsAreMarkers(t *testing.T) {
	srv := startServer(t, t.TempDir())
	alice := register(t, srv, "alice")
	bob := register(t, srv, "bob")
	carol := register(t, srv, "carol")

	for i := range 5 {
		mustFerry(t, alice, "send", "bob", fmt.Sprint("dm-", i))
	}
	mustFerry(t, bob, "recv")
	mustFerry(t, bob, "read", "alice")
	got := parseLines(t, mustFerry(t, alice, "recv", "--json"))
	kinds := map[string][]uint64{}
	for _, l := range got {
		kinds[l.Type] = append(kinds[l.Type], l.Seq)
	}
	if fmt.Sprint(kinds["delivered"]) != "[5]" || fmt.Sprint(kinds["read"]) != "[5]" {
		t.Fatalf("1:1 receipts %v, want one delivered and one read marker at seq 5", kinds)
	}
	if h := mustFerry(t, alice, "history", "bob"); strings.Count(h, "✓✓ read") != 5 {
		t.Fatalf("alice's history does not show all 5 read:\n%s", h)
	}

	mustFerry(t, alice, "group", "create", "team", "bob", "carol")
	for i := range 5 {
		mustFerry(t, alice, "group", "send", "team", fmt.Sprint("g-", i))
	}
	mustFerry(t, bob, "recv")
	mustFerry(t, carol, "recv")
	mustFerry(t, bob, "read", "team")
	got = parseLines(t, mustFerry(t, alice, "recv", "--json"))
	readers := map[string]map[string]uint64{"delivered": {}, "read": {}}
	lines := 0
	for _, l := range got {
		if l.Group == "" || (l.Type != "delivered" && l.Type != "read") {
			continue
		}
		if l.Group != "team" {
			t.Fatalf("receipt for group %q, want team", l.Group)
		}
		lines++
		readers[l.Type][l.From] = l.Seq
	}
	if lines != 3 || readers["delivered"]["bob"] != 5 || readers["delivered"]["carol"] != 5 || readers["read"]["bob"] != 5 {
		t.Fatalf("group receipts: %d lines, %v; want delivered from bob and carol and read from bob, each at seq 5", lines, readers)
	}
}

// newestGroupMessage stops srv, reads the newest group message body from its
// Pebble (opened read-only, as an auditor would) and starts it again.
func newestGroupMessage(t *testing.T, srv *server) *wirepb.Envelope {
	t.Helper()
	srv.term()
	defer srv.restart()
	db, err := store.Open(srv.data, store.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte{store.PrefixGroupBody}, UpperBound: []byte{store.PrefixGroupBody + 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	var newest *wirepb.Envelope
	for ok := it.First(); ok; ok = it.Next() {
		if k := it.Key(); len(k) != 10 || k[9] != 'b' {
			continue
		}
		env := &wirepb.Envelope{}
		if err := proto.Unmarshal(it.Value(), env); err != nil {
			t.Fatal(err)
		}
		if env.Type == wirepb.EnvelopeType_SENDER_KEY_MESSAGE {
			newest = env // bodies are in id order
		}
	}
	if newest == nil {
		t.Fatal("no group message body in the store")
	}
	newest.Id = 1 << 40 // an id the device has not seen
	return newest
}

// decryptAs hands env to the Signal state of the device in home, as if its
// server had delivered it.
func decryptAs(t *testing.T, home, username string, env *wirepb.Envelope) error {
	t.Helper()
	ctx := context.Background()
	st, err := localstore.Open(filepath.Join(home, "device.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	dev, err := e2ee.Load(ctx, st)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = dev.Receive(ctx, username, env)
	return err
}
