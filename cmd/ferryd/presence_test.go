package main

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// bgProc is a long-running ferry command (recv --wait) with its output.
type bgProc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{} // closed when it has exited
}

// background starts a long-running ferry command; it is killed when the
// test ends.
func background(t *testing.T, home string, args ...string) *bgProc {
	t.Helper()
	p := &bgProc{out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(filepath.Join(binDir, "ferry"), append([]string{"--home", home}, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGCONT)
		_ = p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

type presenceLine struct {
	Username string `json:"username"`
	State    string `json:"state"`
	LastSeen string `json:"last_seen"`
}

// presenceOf runs `ferry presence NAME --json` as home.
func presenceOf(t *testing.T, home, name string) presenceLine {
	t.Helper()
	var p presenceLine
	out := mustFerry(t, home, "presence", name, "--json")
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		t.Fatalf("presence --json printed %q: %v", out, err)
	}
	return p
}

// waitPresence polls until home sees name in state, or fails at the deadline.
func waitPresence(t *testing.T, home, name, state string, within time.Duration) presenceLine {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		p := presenceOf(t, home, name)
		if p.State == state {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's presence is %+v after %v, want %s", name, p, within, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Bob is online while his receiving process runs; a process that stops
// answering pings (SIGSTOP) or dies (SIGKILL) is last seen within two ping
// intervals (plus the flap window); hidden presence is "unknown", and the
// privacy setting survives a restart.
func TestBlackBoxPresence(t *testing.T) {
	const ping, flap = time.Second, 300 * time.Millisecond
	data := t.TempDir()
	srv := startServer(t, data, "--ping-interval", ping.String(), "--presence-flap-window", flap.String())
	alice := register(t, srv, "alice")
	bob := register(t, srv, "bob")
	carol := register(t, srv, "carol")

	if out := mustFerry(t, alice, "presence", "dave"); strings.TrimSpace(out) != "unknown" {
		t.Fatalf("never-seen account: %q, want unknown", out)
	}
	// Registering was bob's first connection; it ended.
	waitPresence(t, alice, "bob", "offline", 30*time.Second)
	if out := mustFerry(t, alice, "presence", "bob"); !strings.HasPrefix(out, "last seen ") {
		t.Fatalf("bob after registering: %q, want last seen", out)
	}

	// Where it matters (the deadline below): the time from the peer going
	// silent to the server's last-seen stamp.
	detect := 2*ping + flap + 2*time.Second // slack for a loaded machine
	checkLastSeen := func(p presenceLine, from time.Time) {
		t.Helper()
		ts, err := time.Parse(time.RFC3339Nano, p.LastSeen)
		if err != nil {
			t.Fatalf("last seen %q: %v", p.LastSeen, err)
		}
		if ts.Before(from.Add(-time.Second)) || ts.After(from.Add(2*ping+2*time.Second)) { // slack for a loaded machine
			t.Fatalf("last seen %v, %v after the peer went away; want within two ping intervals", ts, ts.Sub(from))
		}
	}

	recv := background(t, bob, "recv", "--wait", "5m").cmd
	waitPresence(t, alice, "bob", "online", 30*time.Second)

	// Silent but connected: only the missing pongs tell.
	stopped := time.Now()
	if err := recv.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	checkLastSeen(waitPresence(t, alice, "bob", "offline", detect+5*time.Second), stopped)
	_ = recv.Process.Signal(syscall.SIGCONT)
	waitPresence(t, alice, "bob", "online", 30*time.Second) // it reconnects

	killed := time.Now()
	if err := recv.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	checkLastSeen(waitPresence(t, alice, "bob", "offline", detect+5*time.Second), killed)

	// Privacy: hidden is "unknown", never a made-up value.
	mustFerry(t, bob, "privacy", "presence", "allow", "carol")
	if out := mustFerry(t, alice, "presence", "bob"); strings.TrimSpace(out) != "unknown" {
		t.Fatalf("alice, not allowed: %q, want unknown", out)
	}
	if p := presenceOf(t, carol, "bob"); p.State != "offline" || p.LastSeen == "" {
		t.Fatalf("carol, allowed: %+v", p)
	}
	mustFerry(t, bob, "privacy", "presence", "nobody")
	srv.term()
	srv.restart()
	for _, home := range []string{alice, carol} {
		if p := presenceOf(t, home, "bob"); p.State != "unknown" || p.LastSeen != "" {
			t.Fatalf("hidden after a restart: %+v, want unknown", p)
		}
	}
	if out := mustFerry(t, bob, "privacy", "presence"); !strings.Contains(out, "nobody") {
		t.Fatalf("bob's setting after restart: %q", out)
	}
	mustFerry(t, bob, "privacy", "presence", "everyone")
	if p := presenceOf(t, alice, "bob"); p.State != "offline" {
		t.Fatalf("visible again: %+v", p)
	}
}

// A typing indicator reaches a connected device, is never stored (a device
// that connects later gets nothing, no inbox entry, no bytes on disk).
func TestBlackBoxTypingNeverStored(t *testing.T) {
	data := t.TempDir()
	srv := startServer(t, data)
	alice := register(t, srv, "alice")
	bob := register(t, srv, "bob")

	recv := background(t, alice, "recv", "--json", "--wait", "5m")
	out := recv.out
	waitPresence(t, bob, "alice", "online", 30*time.Second)
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), `"type":"typing"`) {
		if time.Now().After(deadline) {
			t.Fatalf("alice never saw bob typing; she printed %q", out.String())
		}
		mustFerry(t, bob, "typing", "alice")
		time.Sleep(300 * time.Millisecond) // paces the retries (rate limit), not a synchronization
	}
	mustFerry(t, bob, "typing", "--stop", "alice")
	for !strings.Contains(out.String(), `"type":"typing_stopped"`) {
		if time.Now().After(deadline) {
			t.Fatalf("alice never saw bob stop; she printed %q", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	var l line
	for _, s := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		if strings.Contains(s, `"typing"`) {
			if err := json.Unmarshal([]byte(s), &l); err != nil || l.From != "bob" || l.FromDevice != 1 {
				t.Fatalf("typing line %q: %+v %v", s, l, err)
			}
		}
	}
	_ = recv.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-recv.done:
	case <-time.After(30 * time.Second):
		t.Fatal("recv did not stop on SIGTERM")
	}

	if later := mustFerry(t, alice, "recv", "--json"); strings.Contains(later, "typing") {
		t.Fatalf("typing was handed over again after a reconnect: %q", later)
	}
	srv.term()
	if n := inboxEntries(t, data); n != 0 {
		t.Fatalf("%d inbox entries after typing, want 0", n)
	}
	// Nor logged, at debug level: no line says who typed to whom or
	// watched whose presence.
	for _, l := range strings.Split(srv.log.String(), "\n") {
		if low := strings.ToLower(strings.ReplaceAll(l, data, "DATA")); strings.Contains(low, "typing") || strings.Contains(low, "presence") {
			t.Errorf("ferryd logged %q", l)
		}
	}
	var needles []string
	for _, on := range []bool{true, false} {
		ev := &wirepb.TypingEvent{Username: "bob", DeviceId: 1, Typing: on, TtlMs: 6000}
		b, _ := proto.Marshal(ev)
		needles = append(needles, string(b))
	}
	grepTree(t, data, needles)
}
