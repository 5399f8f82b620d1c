package e2ee

import (
	"context"
	"testing"

	"github.com/ferryhq/ferry/wire/wirepb"
)

// BenchmarkRoundTrip is one Encrypt plus one Receive on an established
// session, each a durable (fsynced) transaction.
func BenchmarkRoundTrip(b *testing.B) {
	alice := newPeer(b, "alice", 1, 5)
	bob := newPeer(b, "bob", 1, 5)
	alice.connect(bob, true)
	bob.receive(bob.envFrom(alice, alice.encrypt(bob, "x")), "x")
	alice.receive(alice.envFrom(bob, bob.encrypt(alice, "x")), "x")
	c := &wirepb.Content{Text: "a message of ordinary length"}
	b.ResetTimer()
	for range b.N {
		ct, err := alice.dev.Encrypt(context.Background(), "bob", 1, c)
		if err != nil {
			b.Fatal(err)
		}
		if _, _, err := bob.dev.Receive(context.Background(), "bob", bob.envFrom(alice, ct)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReceiveForged is the cost of rejecting (and recording) a forged
// message.
func BenchmarkReceiveForged(b *testing.B) {
	alice := newPeer(b, "alice", 1, 5)
	bob := newPeer(b, "bob", 1, 5)
	alice.connect(bob, true)
	ct := alice.encrypt(bob, "x")
	c := append([]byte{}, ct.Content...)
	c[len(c)-1] ^= 1
	b.ResetTimer()
	for range b.N {
		env := bob.envelope(alice, "bob", wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE, c)
		if _, _, err := bob.dev.Receive(context.Background(), "bob", env); err == nil {
			b.Fatal("forged message accepted")
		}
	}
}
