package e2ee

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/ferryhq/ferry/wire/wirepb"
)

// Both sides set up a session at the same time (each sends a prekey
// message before seeing the other's), with every delivery order.
func TestSimultaneousInitiate(t *testing.T) {
	orders := [][]string{
		{"a1", "b1", "a2", "b2"},
		{"b1", "b2", "a1", "a2"},
		{"a2", "b1", "a1", "b2"},
		{"b1", "reply", "a1", "a2", "b2"},
		{"a1", "a2", "reply", "b1", "b2"},
		{"b2", "a2", "reply", "b1", "a1"},
	}
	for n, order := range orders {
		t.Run(fmt.Sprint(order), func(t *testing.T) {
			alice := newPeer(t, "alice", 1, 5)
			bob := newPeer(t, "bob", 1, 5)
			alice.connect(bob, n%2 == 0)
			bob.connect(alice, true)
			// aN: bob -> alice, bN: alice -> bob
			env := map[string]*wirepb.Envelope{
				"a1": alice.envFrom(bob, bob.encrypt(alice, "a1")),
				"b1": bob.envFrom(alice, alice.encrypt(bob, "b1")),
				"a2": alice.envFrom(bob, bob.encrypt(alice, "a2")),
				"b2": bob.envFrom(alice, alice.encrypt(bob, "b2")),
			}
			for _, k := range order {
				switch {
				case k == "reply":
					// bob answers on whatever session he has now.
					alice.receive(alice.envFrom(bob, bob.encrypt(alice, "reply")), "reply")
				case k[0] == 'a':
					alice.receive(env[k], k)
				default:
					bob.receive(env[k], k)
				}
			}
			for i := range 4 {
				s := fmt.Sprint("r", i)
				bob.receive(bob.envFrom(alice, alice.encrypt(bob, s)), s)
				alice.receive(alice.envFrom(bob, bob.encrypt(alice, s)), s)
				s = fmt.Sprint("q", i)
				alice.receive(alice.envFrom(bob, bob.encrypt(alice, s)), s)
				bob.receive(bob.envFrom(alice, alice.encrypt(bob, s)), s)
			}
		})
	}
}

// TestChaos runs random conversations: both sides send at random, the
// network reorders within a window, and either side sometimes starts a new
// session from a fresh bundle while messages are in flight. Every message
// must decrypt, exactly once.
func TestChaos(t *testing.T) {
	seeds := []uint64{1, 2, 3}
	steps := 250
	if testing.Short() {
		seeds, steps = seeds[:1], 80
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 0))
			alice := newPeer(t, "alice", 1, 50)
			bob := newPeer(t, "bob", 1, 50)
			alice.connect(bob, true)
			type inflight struct {
				to   *peer
				env  *wirepb.Envelope
				text string
			}
			var net []inflight
			send := func(from, to *peer) {
				if ok, _ := from.dev.HasSession(t.Context(), to.name, to.devID); !ok {
					from.connect(to, rng.IntN(2) == 0)
				}
				s := fmt.Sprintf("%s-%d", from.name, len(net)+rng.IntN(1000000))
				net = append(net, inflight{to, to.envFrom(from, from.encrypt(to, s)), s})
			}
			deliver := func() {
				i := rng.IntN(min(len(net), 4)) // reorder within a window of 4
				m := net[i]
				net = append(net[:i], net[i+1:]...)
				m.to.receive(m.env, m.text)
				if rng.IntN(10) == 0 { // and a redelivery
					if _, dup, err := m.to.dev.Receive(t.Context(), m.to.name, m.env); !dup || err != nil {
						t.Fatalf("redelivery: %v %v", dup, err)
					}
				}
			}
			for range steps {
				switch r := rng.IntN(100); {
				case r < 30:
					send(alice, bob)
				case r < 60:
					send(bob, alice)
				case r < 95:
					if len(net) > 0 {
						deliver()
					}
				case r < 97:
					alice.connect(bob, rng.IntN(2) == 0) // new session, old one archived
				default:
					bob.connect(alice, rng.IntN(2) == 0)
				}
			}
			for len(net) > 0 {
				deliver()
			}
		})
	}
}
