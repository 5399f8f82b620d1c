package e2ee

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/ferryhq/ferry/wire/wirepb"
)

// The identity verifier (the client's check against signed device lists)
// blocks sessions with unknown keys on both sides: no session is built from
// a bundle it rejects, and a session-creating message from a device it
// rejects is recorded as failed.
func TestIdentityVerifier(t *testing.T) {
	alice, bob, mallory := newPeer(t, "alice", 1, 5), newPeer(t, "bob", 1, 5), newPeer(t, "bob", 2, 5)
	errNotListed := errors.New("not on the list")
	allowOnly := func(key []byte) func(string, uint32, []byte) error {
		return func(_ string, _ uint32, k []byte) error {
			if !bytes.Equal(k, key) {
				return errNotListed
			}
			return nil
		}
	}
	alice.dev.SetIdentityVerifier(allowOnly(bob.dev.IdentityKey()))
	// Sending side: a bundle with an unlisted key builds nothing.
	err := alice.dev.BuildSession(context.Background(), "bob", mallory.bundle(true))
	if !errors.Is(err, ErrUntrustedIdentity) || !errors.Is(err, errNotListed) {
		t.Fatalf("BuildSession with an unlisted key: %v", err)
	}
	if ok, _ := alice.dev.HasSession(context.Background(), "bob", 2); ok {
		t.Fatal("a session was built with a rejected key")
	}
	alice.connect(bob, true) // the listed key works
	bob.receive(bob.envFrom(alice, alice.encrypt(bob, "hello")), "hello")

	// Receiving side: bob accepts only alice's listed key; mallory's
	// prekey message claiming to be another alice device fails.
	bob.dev.SetIdentityVerifier(allowOnly(alice.dev.IdentityKey()))
	fake := newPeer(t, "alice", 1, 5)
	fake.connect(bob, true)
	ct, err := fake.dev.Encrypt(context.Background(), "bob", 1, &wirepb.Content{Text: "i am alice"})
	if err != nil {
		t.Fatal(err)
	}
	if err := bob.receiveFail(bob.envFrom(fake, ct)); !errors.Is(err, ErrUntrustedIdentity) {
		t.Fatalf("message from an unlisted identity: %v", err)
	}
	// The real alice still gets through.
	bob.receive(bob.envFrom(alice, alice.encrypt(bob, "still me")), "still me")
}
