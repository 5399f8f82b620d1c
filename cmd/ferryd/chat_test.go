package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// tmuxSession drives `ferry chat` in a detached tmux session on a private
// socket, so the test sees exactly what a user's terminal shows.
type tmuxSession struct {
	t    *testing.T
	bin  string
	sock string
	name string
}

func (s *tmuxSession) tmux(args ...string) string {
	s.t.Helper()
	cmd := exec.Command(s.bin, append([]string{"-u", "-S", s.sock}, args...)...)
	cmd.Env = append(os.Environ(), "TERM=xterm-256color", "LANG=C.UTF-8", "LC_ALL=C.UTF-8")
	out, err := cmd.CombinedOutput()
	if err != nil {
		s.t.Fatalf("tmux %v: %v\n%s", args, err, out)
	}
	return string(out)
}

func (s *tmuxSession) screen() string { return s.tmux("capture-pane", "-p", "-t", s.name) }

// typeText types text (literally) and, if enter, presses Enter.
func (s *tmuxSession) typeText(text string, enter bool) {
	s.tmux("send-keys", "-t", s.name, "-l", text)
	if enter {
		s.tmux("send-keys", "-t", s.name, "Enter")
	}
}

// wait polls the screen until re matches it, or fails at the deadline.
func (s *tmuxSession) wait(re string) {
	s.t.Helper()
	rx := regexp.MustCompile("(?m)" + re)
	deadline := time.Now().Add(30 * time.Second)
	for {
		scr := s.screen()
		if rx.MatchString(scr) {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s's screen never matched %q; it shows:\n%s", s.name, re, scr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Two `ferry chat` screens: a message typed in alice's goes ✓ (committed),
// ✓✓ (bob's device acked it), read (bob opened the conversation); bob sees
// alice's history and live messages, alice sees bob online and typing.
func TestBlackBoxChatScreen(t *testing.T) {
	bin, err := exec.LookPath("tmux")
	if err != nil {
		t.Skip("tmux is not installed: the chat screen test drives `ferry chat` in tmux")
	}
	srv := startServer(t, t.TempDir(), "--presence-flap-window", "100ms")
	aliceHome := register(t, srv, "alice")
	bobHome := register(t, srv, "bob")

	sock := filepath.Join(t.TempDir(), "tmux.sock")
	open := func(name, home, peer string) *tmuxSession {
		s := &tmuxSession{t: t, bin: bin, sock: sock, name: name}
		s.tmux("new-session", "-d", "-s", name, "-x", "110", "-y", "30",
			filepath.Join(binDir, "ferry")+" --home "+home+" chat "+peer+"; echo chat exited $?; sleep 3600")
		return s
	}
	quit := func(s *tmuxSession) {
		s.tmux("send-keys", "-t", s.name, "Escape")
		s.wait(`chat exited 0`)
	}
	t.Cleanup(func() { _ = exec.Command(bin, "-S", sock, "kill-server").Run() })

	alice := open("alice", aliceHome, "bob")
	alice.wait(`chat with bob · last seen `)
	alice.typeText("hello-1", true)
	alice.wait(`me: hello-1 ✓\s*$`)

	mustFerry(t, bobHome, "recv") // bob's device takes it and acks: ✓✓
	alice.wait(`me: hello-1 ✓✓\s*$`)

	bob := open("bob", bobHome, "alice") // opening it sends a read marker
	bob.wait(`alice: hello-1`)
	alice.wait(`me: hello-1 ✓✓ read\s*$`)
	alice.wait(`chat with bob · online`)

	bob.typeText("hey alice", false)
	alice.wait(`bob is typing…`)
	bob.typeText("", true)
	alice.wait(`bob: hey alice`)
	bob.wait(`me: hey alice ✓✓ read\s*$`) // alice's screen is open: read at once

	alice.typeText("hello-2", true)
	bob.wait(`alice: hello-2`)
	alice.wait(`me: hello-2 ✓✓ read\s*$`)
	if strings.Contains(alice.screen()+bob.screen(), "chat exited") {
		t.Fatalf("a chat exited:\n%s\n%s", alice.screen(), bob.screen())
	}

	// The same for a group (each device has one receiving connection, so
	// the 1:1 screens close first).
	quit(alice)
	quit(bob)
	mustFerry(t, aliceHome, "group", "create", "team", "bob")
	ag := open("alice-team", aliceHome, "--group team")
	bg := open("bob-team", bobHome, "--group team")
	ag.wait(`group team \(2 members\) · online: bob`)
	bg.wait(`group team \(2 members\) · online: alice`)
	ag.typeText("team-1", false)
	bg.wait(`alice is typing…`)
	ag.typeText("", true)
	bg.wait(`alice: team-1`)
	ag.wait(`me: team-1 ✓✓ read\s*$`)
}
