package e2ee

import (
	"context"
	"errors"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// FuzzGroupReceive feeds arbitrary contents as SENDER_KEY_MESSAGE envelopes
// from alice to bob, who holds alice's sender key for the group. Nothing may
// panic; every envelope is either decrypted to a text alice really sent or
// recorded as failed, and is a duplicate on redelivery.
func FuzzGroupReceive(f *testing.F) {
	nosync := localstore.Options{NoSync: true}
	alice := newPeerWith(f, "alice", 1, 5, nosync)
	bob := newPeerWith(f, "bob", 1, 5, nosync)
	alice.connect(bob, true)
	alice.distribute(testGroup, bob)
	sent := map[string]bool{}
	for i, s := range []string{"a", "", "a longer message that takes more than one padding block, " +
		"so more than one hundred and sixty bytes of plaintext, which it now does, yes", "z"} {
		ct := alice.groupEncrypt(testGroup, s)
		sent[s] = true
		if i == 0 {
			bob.groupReceive(bob.groupEnvelope(alice, testGroup, 1, ct), s) // seen: a replay
		}
		f.Add(ct)
		f.Add(ct[:len(ct)-1])
	}
	f.Add([]byte{})
	f.Add([]byte{0x33})
	f.Add(make([]byte, 200))
	before := recovered.Load()

	var mu sync.Mutex // bob's envelope counter
	f.Fuzz(func(t *testing.T, content []byte) {
		mu.Lock()
		env := bob.groupEnvelope(alice, testGroup, 7, content)
		mu.Unlock()
		m, dup, err := bob.dev.Receive(context.Background(), "bob", env)
		switch {
		case dup || m == nil:
			t.Fatalf("%v %v %v", m, dup, err)
		case err != nil && (!errors.Is(err, ErrDecrypt) || !m.Failed || m.Text != ""):
			t.Fatalf("error %v with message %+v", err, m)
		case err == nil && (m.Failed || !sent[m.Text] || m.Group != testGroup):
			t.Fatalf("accepted %+v", m)
		}
		if m, dup, err := bob.dev.Receive(context.Background(), "bob", env); m != nil || !dup || err != nil {
			t.Fatalf("redelivery: %v %v %v", m, dup, err)
		}
	})
	f.Cleanup(func() {
		s := "still here"
		bob.groupReceive(bob.groupEnvelope(alice, testGroup, 8, alice.groupEncrypt(testGroup, s)), s)
		if n := recovered.Load() - before; n != 0 {
			f.Errorf("%d libsignal panics recovered: validate more", n)
		}
	})
}

// FuzzSenderKeyDistribution feeds arbitrary sender key distributions (group
// id and message bytes) in pairwise messages from alice to bob. Nothing may
// panic; each is stored or refused with ErrInvalidSenderKey, never adds a
// history row, and the pairwise session survives.
func FuzzSenderKeyDistribution(f *testing.F) {
	nosync := localstore.Options{NoSync: true}
	alice := newPeerWith(f, "alice", 1, 5, nosync)
	bob := newPeerWith(f, "bob", 1, 5, nosync)
	alice.connect(bob, true)
	good := alice.skdm(testGroup)
	f.Add(testGroup, good)
	f.Add("g", good[:len(good)-1])
	f.Add("g", good[:1])
	f.Add("", good)
	f.Add(testGroup, []byte{})
	f.Add(testGroup, append([]byte{0x23}, good[1:]...))
	before := recovered.Load()

	var mu sync.Mutex // alice's session and bob's envelope counter
	f.Fuzz(func(t *testing.T, group string, msg []byte) {
		if !utf8.ValidString(group) {
			return // alice cannot encode it (proto3 strings are UTF-8)
		}
		mu.Lock()
		defer mu.Unlock()
		// (The peer helpers call f's methods, which a fuzz function must not.)
		ct, err := alice.dev.Encrypt(context.Background(), "bob", 1,
			&wirepb.Content{SenderKey: &wirepb.SenderKeyDistribution{GroupId: group, Message: msg}})
		if err != nil {
			t.Fatal(err)
		}
		env := bob.envelope(alice, "bob", ct.Type, ct.Content)
		m, dup, err := bob.dev.Receive(context.Background(), "bob", env)
		if dup || m == nil || !m.SenderKey || m.LocalID != 0 {
			t.Fatalf("msg %+v dup %v err %v", m, dup, err)
		}
		if err != nil && (!errors.Is(err, ErrDecrypt) || !errors.Is(err, ErrInvalidSenderKey) || !m.Failed) {
			t.Fatalf("error %v with message %+v", err, m)
		}
		if err == nil && m.Failed {
			t.Fatal("failed without an error")
		}
		if err == nil {
			if ok, _ := bob.dev.HasSenderKey(context.Background(), group, "alice", 1); !ok {
				t.Fatal("accepted but not stored")
			}
		}
	})
	f.Cleanup(func() {
		if h := bob.history("alice"); len(h) != 0 {
			f.Errorf("history rows: %+v", h)
		}
		s := "still here"
		bob.receive(bob.envFrom(alice, alice.encrypt(bob, s)), s)
		if n := recovered.Load() - before; n != 0 {
			f.Errorf("%d libsignal panics recovered: validate more", n)
		}
	})
}
