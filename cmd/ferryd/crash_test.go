package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"math/big"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// crashDevice is one raw SDK device that reconnects whenever its
// connection dies (ferryd being killed) until its context ends.
type crashDevice struct {
	srv  *server
	name string
	key  ed25519.PrivateKey
	reg  uint32
}

func newCrashDevice(t *testing.T, srv *server, name string) *crashDevice {
	t.Helper()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	d := &crashDevice{srv: srv, name: name, key: key, reg: 7}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := client.Dial(ctx, srv.url(), client.DialOptions{ClientName: "crash-test"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Register(ctx, name, key, d.reg); err != nil {
		t.Fatal(err)
	}
	return d
}

// connect dials and authenticates, retrying while ferryd is down.
func (d *crashDevice) connect(ctx context.Context) (*client.Conn, error) {
	for {
		conn, err := client.Dial(ctx, d.srv.url(), client.DialOptions{ClientName: "crash-test"})
		if err == nil {
			if _, err = conn.Auth(ctx, d.name, 1, d.key, false); err == nil {
				return conn, nil
			}
			conn.Close()
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond): // ferryd is restarting: a short backoff, as a client would
		}
	}
}

// received is what a receiver saw of one message.
type received struct {
	envIDs map[uint64]bool
	seq    uint64
}

// TestBlackBoxCrashLoop: senders keep sending (one message in flight each,
// retrying with the same client message id after a failure) while ferryd is
// SIGKILLed at random points and restarted, 20 times (FERRY_SOAK=1: 200).
// Every ✓'d message is delivered to its receiver exactly once (one stored
// envelope; redeliveries of that envelope are dropped by id), and each
// conversation's messages arrive in seq order.
func TestBlackBoxCrashLoop(t *testing.T) {
	cycles := 20
	if os.Getenv("FERRY_SOAK") != "" {
		cycles = 200
	}
	// Senders go as fast as the store lets them: the send rate limit is
	// not what this test is about (limits_test.go).
	srv := startServer(t, t.TempDir(), "--send-rate", "inf")
	const pairs = 4
	type pair struct{ s, r *crashDevice }
	ps := make([]pair, pairs)
	for i := range ps {
		ps[i] = pair{newCrashDevice(t, srv, fmt.Sprint("cs", i)), newCrashDevice(t, srv, fmt.Sprint("cr", i))}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	sendCtx, stopSending := context.WithCancel(ctx)
	defer stopSending()

	var (
		mu    sync.Mutex
		acked = map[string]uint64{}    // client msg id -> seq of its ✓
		got   = map[string]*received{} // client msg id -> what its receiver saw
		order = map[int][]uint64{}     // pair -> seqs in first-arrival order
		gotCh = make(chan struct{}, 1)
		ackCh = make(chan struct{}, 1)
		wg    sync.WaitGroup
	)
	poke := func(ch chan struct{}) {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	for i, p := range ps {
		wg.Add(2)
		go func() { // sender
			defer wg.Done()
			var conn *client.Conn
			defer func() {
				if conn != nil {
					conn.Close()
				}
			}()
			for n := 0; sendCtx.Err() == nil; n++ {
				id := fmt.Sprintf("p%d-%d", i, n)
				for sendCtx.Err() == nil { // until ✓ (the same id every try)
					if conn == nil {
						c, err := p.s.connect(sendCtx)
						if err != nil {
							return
						}
						conn = c
					}
					r, err := conn.Do(sendCtx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
						ClientMsgId: id, To: p.r.name, Ciphertexts: []*wirepb.DeviceCiphertext{{Username: p.r.name, DeviceId: 1,
							RegistrationId: p.r.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("ciphertext " + id)}}}}})
					if err != nil {
						conn.Close()
						conn = nil
						continue
					}
					mu.Lock()
					acked[id] = r.GetSend().Seq
					mu.Unlock()
					poke(ackCh)
					break
				}
			}
		}()
		go func() { // receiver
			defer wg.Done()
			for ctx.Err() == nil {
				conn, err := p.r.connect(ctx)
				if err != nil {
					return
				}
				stop := context.AfterFunc(ctx, func() { conn.Close() })
				for ev := range conn.Events() {
					env := ev.GetEnvelope()
					if env == nil || env.Type != wirepb.EnvelopeType_SIGNAL_MESSAGE {
						if env != nil {
							go conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
						}
						continue
					}
					mu.Lock()
					rc := got[env.ClientMsgId]
					if rc == nil {
						rc = &received{envIDs: map[uint64]bool{}, seq: env.Seq}
						got[env.ClientMsgId] = rc
						order[i] = append(order[i], env.Seq)
					}
					rc.envIDs[env.Id] = true
					mu.Unlock()
					poke(gotCh)
					go conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
				}
				stop()
				conn.Close()
			}
		}()
	}

	ackCount := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(acked)
	}
	for cycle := range cycles {
		// Kill at a random point: after 1..40 more ✓s.
		n, _ := rand.Int(rand.Reader, big.NewInt(40))
		want := ackCount() + 1 + int(n.Int64())
		for ackCount() < want {
			select {
			case <-ackCh:
			case <-ctx.Done():
				t.Fatalf("cycle %d: %d ✓s, waiting for %d: %v", cycle, ackCount(), want, ctx.Err())
			}
		}
		srv.kill9()
		srv.restart()
	}
	stopSending()

	// Every ✓'d message reaches its receiver.
	missing := func() []string {
		mu.Lock()
		defer mu.Unlock()
		var out []string
		for id := range acked {
			if got[id] == nil {
				out = append(out, id)
			}
		}
		return out
	}
	deadline := time.After(60 * time.Second)
	for len(missing()) > 0 {
		select {
		case <-gotCh:
		case <-deadline:
			t.Fatalf("after %d crashes, %d ✓'d messages never arrived: %v", cycles, len(missing()), missing())
		}
	}
	cancel()
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	for id, seq := range acked {
		rc := got[id]
		if len(rc.envIDs) != 1 {
			t.Errorf("%s was stored %d times (envelope ids %v)", id, len(rc.envIDs), rc.envIDs)
		}
		if rc.seq != seq {
			t.Errorf("%s: ✓ said seq %d, the receiver got seq %d", id, seq, rc.seq)
		}
	}
	for i, seqs := range order {
		for j := 1; j < len(seqs); j++ {
			if seqs[j] <= seqs[j-1] {
				t.Fatalf("pair %d: seq %d arrived after %d", i, seqs[j], seqs[j-1])
			}
		}
	}
	t.Logf("%d SIGKILL/restart cycles, %d messages ✓'d, every one delivered once, in order", cycles, len(acked))
}
