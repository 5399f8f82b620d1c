package relay

import (
	"testing"
)

// TestAckIsScopedToOwnInbox: acking another device's envelope ids deletes
// nothing of theirs; the owner still gets the envelope.
func TestAckIsScopedToOwnInbox(t *testing.T) {
	e := newEnv(t, Config{})
	_, ac := e.register("alice")
	bob, bc := e.register("bob")
	_, mc := e.register("mallory")
	if _, err := send(t, ac, "m1", bob, "for bob"); err != nil {
		t.Fatal(err)
	}
	env := nextEnvelope(t, bc)
	if n := ack(t, mc, env.Id, env.Id+1, 1, 2, 3); n != 0 {
		t.Fatalf("mallory's ack of bob's ids deleted %d", n)
	}
	if n := ack(t, bc, env.Id); n != 1 {
		t.Fatalf("bob's own ack deleted %d, want 1 (his entry was still there)", n)
	}
}
