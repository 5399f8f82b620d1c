package main

import (
	"fmt"
	"strings"
	"testing"
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
			if l.Group == "" {
				continue
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
	for _, l := range parseLines(t, mustFerry(t, carol, "recv", "--json")) {
		if l.Text == "without carol" {
			t.Fatal("a removed member received a group message")
		}
	}
	for name, home := range map[string]string{"bob": bob, "bob2": bob2} {
		got := parseLines(t, mustFerry(t, home, "recv", "--json"))
		if len(got) != 1 || got[0].Text != "without carol" {
			t.Fatalf("%s got %+v after the removal", name, got)
		}
	}
	if _, errs, code := ferry(t, carol, "group", "send", "team", "let me in"); code == 0 {
		t.Fatalf("a removed member could send: %q", errs)
	}
}
