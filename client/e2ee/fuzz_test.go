package e2ee

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"

	"go.mau.fi/libsignal/protocol"
	"go.mau.fi/libsignal/session"

	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire/wirepb"
)

func TestPad(t *testing.T) {
	for _, c := range []struct{ in, out int }{
		{0, 160}, {1, 160}, {158, 160}, {159, 160}, {160, 320}, {319, 320}, {1000, 1120},
	} {
		in := bytes.Repeat([]byte{0}, c.in) // zeros: the hardest case for Unpad
		if c.in > 0 {
			in[0] = 0x80
		}
		p := Pad(in)
		if len(p) != c.out || len(p)%PadBlock != 0 {
			t.Fatalf("Pad(%d bytes) is %d bytes, want %d", c.in, len(p), c.out)
		}
		if !bytes.Equal(p[:c.in], in) || p[c.in] != 0x80 || !bytes.Equal(p[c.in+1:], make([]byte, c.out-c.in-1)) {
			t.Fatalf("Pad(%d bytes) = %x", c.in, p)
		}
		u, err := Unpad(p)
		if err != nil || !bytes.Equal(u, in) {
			t.Fatalf("Unpad(Pad(%d bytes)) = %d bytes, %v", c.in, len(u), err)
		}
		// The result must not let an append overwrite the padding.
		_ = append(u, 1)
		if p[c.in] != 0x80 {
			t.Fatal("Unpad result aliases the padding")
		}
	}
	for _, bad := range [][]byte{nil, {}, {0}, {0, 0, 0}, {1}, {0x80, 1}, {0x81, 0}, {1, 2, 3, 0}} {
		if _, err := Unpad(bad); !errors.Is(err, ErrBadPadding) {
			t.Fatalf("Unpad(%x): %v", bad, err)
		}
	}
	// Another bucket size is accepted: the rule is "strip zeros, then 0x80".
	if u, err := Unpad([]byte{'h', 'i', 0x80, 0, 0}); err != nil || string(u) != "hi" {
		t.Fatalf("Unpad of a short padding: %q %v", u, err)
	}
}

func FuzzUnpad(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0x80})
	f.Add(Pad([]byte("hello")))
	f.Add([]byte{1, 0x80, 0, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		orig := bytes.Clone(b)
		u, err := Unpad(b)
		if !bytes.Equal(b, orig) {
			t.Fatal("Unpad modified its input")
		}
		if err != nil {
			if !errors.Is(err, ErrBadPadding) {
				t.Fatal(err)
			}
			return
		}
		// b is u, 0x80, zeros.
		if len(u) >= len(b) || b[len(u)] != 0x80 || !bytes.Equal(b[len(u)+1:], make([]byte, len(b)-len(u)-1)) {
			t.Fatalf("Unpad(%x) = %x", b, u)
		}
		u2, err := Unpad(Pad(u))
		if err != nil || !bytes.Equal(u2, u) {
			t.Fatalf("round trip of %x: %x %v", u, u2, err)
		}
	})
}

// FuzzReceive feeds arbitrary envelope types and contents to a device that
// has a session with the sender. Nothing may panic; every envelope is either
// decrypted or recorded as failed, and is a duplicate on redelivery.
func FuzzReceive(f *testing.F) {
	// No fsync: the fuzzer needs fast executions (its input minimization
	// alone runs the target thousands of times).
	nosync := localstore.Options{NoSync: true}
	alice := newPeerWith(f, "alice", 1, 5, nosync)
	bob := newPeerWith(f, "bob", 1, 5, nosync)
	alice.connect(bob, true)
	pre := alice.encrypt(bob, "first")
	seeds := []*wirepb.DeviceCiphertext{pre}
	bob.receive(bob.envFrom(alice, pre), "first")
	alice.receive(alice.envFrom(bob, bob.encrypt(alice, "reply")), "reply")
	for _, s := range []string{"a", "", "a longer message that takes more than one padding block, " +
		"so more than one hundred and sixty bytes of plaintext, which it now does"}[:2] {
		seeds = append(seeds, alice.encrypt(bob, s))
	}
	carol := newPeerWith(f, "carol", 1, 0, nosync) // a prekey message bob has not seen
	carol.connect(bob, false)
	seeds = append(seeds, carol.encrypt(bob, "carol"))

	for _, ct := range seeds {
		f.Add(uint8(ct.Type), ct.Content)
		f.Add(uint8(wirepb.EnvelopeType_SIGNAL_MESSAGE+wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE-ct.Type), ct.Content)
	}
	f.Add(uint8(2), []byte{})
	f.Add(uint8(3), []byte{0x33})
	f.Add(uint8(3), []byte{0x23, 0x08, 0x01})
	f.Add(uint8(4), []byte{0x33, 0x0a, 0x00})
	f.Add(uint8(0), []byte{0x33})

	var mu sync.Mutex // bob's envelope counter
	f.Fuzz(func(t *testing.T, typ uint8, content []byte) {
		mu.Lock()
		env := bob.envelope(alice, "bob", wirepb.EnvelopeType(typ), content)
		mu.Unlock()
		m, dup, err := bob.dev.Receive(context.Background(), "bob", env)
		switch {
		case dup:
			t.Fatal("a new envelope id was a duplicate")
		case env.Type == wirepb.EnvelopeType_RECEIPT || env.Type == wirepb.EnvelopeType_GROUP_UPDATE:
			if m != nil || !errors.Is(err, ErrUnsupportedType) {
				t.Fatalf("%v: %v %v", env.Type, m, err)
			}
			return
		case m == nil:
			t.Fatalf("no message and error %v", err)
		case err != nil && (!errors.Is(err, ErrDecrypt) || !m.Failed):
			t.Fatalf("error %v with message %+v", err, m)
		case err == nil && m.Failed:
			t.Fatal("failed without an error")
		}
		if m, dup, err := bob.dev.Receive(context.Background(), "bob", env); m != nil || !dup || err != nil {
			t.Fatalf("redelivery: %v %v %v", m, dup, err)
		}
	})
	f.Cleanup(func() {
		// The session survived whatever was thrown at it.
		s := "still here"
		bob.receive(bob.envFrom(alice, alice.encrypt(bob, s)), s)
		f.Logf("libsignal panics recovered: %d", recovered.Load())
	})
}

// The library panics that the notes list are real; safe turns them into
// errors (the prechecks in Receive keep them from happening at all).
func TestSafeRecoversLibraryPanics(t *testing.T) {
	p := newPeer(t, "alice", 1, 0)
	before := recovered.Load()
	calls := map[string]func() error{
		"empty prekey message": func() error {
			_, err := protocol.NewPreKeySignalMessageFromBytes(nil, ser.PreKeySignalMessage, ser.SignalMessage)
			return err
		},
		"encrypt without a session": func() error {
			return p.st.Update(context.Background(), func(tx *localstore.Tx) error {
				ss := p.dev.sigStore(tx)
				addr := protocol.NewSignalAddress("nobody", 1)
				_, err := session.NewCipher(session.NewBuilder(ss, ss, ss, ss, addr, ser), addr).
					Encrypt(context.Background(), []byte("x"))
				return err
			})
		},
	}
	for name, call := range calls {
		if err := safe(call); !errors.Is(err, errLibPanic) {
			t.Errorf("%s: %v, want a recovered panic", name, err)
		}
	}
	if recovered.Load()-before != int64(len(calls)) {
		t.Fatalf("recovered %d panics", recovered.Load()-before)
	}
}
