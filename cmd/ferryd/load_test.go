package main

// Load for the crash and SIGTERM tests: pairs of raw SDK devices, a sender
// with one message in flight retrying under the same client message id, and
// a receiver that acks everything, both reconnecting whenever ferryd goes.

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"math/big"
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
	// dial, if set, replaces dialing srv and Auth (a cluster device follows
	// redirects over several nodes: cluster_harness_test.go).
	dial func(context.Context) (*client.Conn, error)
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
	bo := client.Backoff{Min: 20 * time.Millisecond, Max: 200 * time.Millisecond}
	for {
		if d.dial != nil {
			if conn, err := d.dial(ctx); err == nil {
				return conn, nil
			}
			if err := bo.Wait(ctx); err != nil {
				return nil, err
			}
			continue
		}
		conn, err := client.Dial(ctx, d.srv.url(), client.DialOptions{ClientName: "crash-test"})
		if err == nil {
			if _, err = conn.Auth(ctx, d.name, 1, d.key, false); err == nil {
				return conn, nil
			}
			conn.Close()
		}
		if err := bo.Wait(ctx); err != nil { // ferryd is restarting: jittered, as the SDK does
			return nil, err
		}
	}
}

// received is what a receiver saw of one message.
type received struct {
	envIDs map[uint64]bool
	seq    uint64
}

// load is the running load against one ferryd.
type load struct {
	t      *testing.T
	ctx    context.Context
	cancel context.CancelFunc
	stop   context.CancelFunc // stops the senders

	mu     sync.Mutex
	acked  map[string]uint64    // client msg id -> seq of its ✓
	got    map[string]*received // client msg id -> what its receiver saw
	order  map[int][]uint64     // pair -> seqs in first-arrival order
	closes map[int]int          // close codes receivers saw, by code
	gotCh  chan struct{}
	ackCh  chan struct{}
	wg     sync.WaitGroup
}

// startLoad registers pairs sender/receiver pairs on srv and starts them.
func startLoad(t *testing.T, srv *server, pairs int, timeout time.Duration) *load {
	t.Helper()
	ps := make([]loadPair, pairs)
	for i := range ps {
		ps[i] = loadPair{newCrashDevice(t, srv, fmt.Sprint("cs", i)), newCrashDevice(t, srv, fmt.Sprint("cr", i))}
	}
	return startLoadPairs(t, ps, timeout)
}

// loadPair is a sender and its receiver.
type loadPair struct{ s, r *crashDevice }

// startLoadPairs starts the load of startLoad on given devices.
func startLoadPairs(t *testing.T, ps []loadPair, timeout time.Duration) *load {
	t.Helper()
	l := &load{t: t, acked: map[string]uint64{}, got: map[string]*received{}, order: map[int][]uint64{},
		closes: map[int]int{}, gotCh: make(chan struct{}, 1), ackCh: make(chan struct{}, 1)}
	l.ctx, l.cancel = context.WithTimeout(context.Background(), timeout)
	sendCtx, stopSending := context.WithCancel(l.ctx)
	l.stop = stopSending
	t.Cleanup(func() { l.cancel(); l.wg.Wait() })
	ctx := l.ctx
	for i, p := range ps {
		l.wg.Add(2)
		go func() { // sender
			defer l.wg.Done()
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
					l.mu.Lock()
					l.acked[id] = r.GetSend().Seq
					l.mu.Unlock()
					poke(l.ackCh)
					break
				}
			}
		}()
		go func() { // receiver
			defer l.wg.Done()
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
					l.mu.Lock()
					rc := l.got[env.ClientMsgId]
					if rc == nil {
						rc = &received{envIDs: map[uint64]bool{}, seq: env.Seq}
						l.got[env.ClientMsgId] = rc
						l.order[i] = append(l.order[i], env.Seq)
					}
					rc.envIDs[env.Id] = true
					l.mu.Unlock()
					poke(l.gotCh)
					go conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
				}
				stop()
				var ce *client.CloseError
				if errors.As(conn.Err(), &ce) {
					l.mu.Lock()
					l.closes[ce.Code]++
					l.mu.Unlock()
				}
				conn.Close()
			}
		}()
	}
	return l
}

func poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (l *load) ackCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.acked)
}

// closeCount is how many receiver connections ended with code.
func (l *load) closeCount(code int) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closes[code]
}

// awaitRandomAcks waits for 1..40 more ✓s (a random point to strike at).
func (l *load) awaitRandomAcks(what string) {
	l.t.Helper()
	n, _ := rand.Int(rand.Reader, big.NewInt(40))
	want := l.ackCount() + 1 + int(n.Int64())
	for l.ackCount() < want {
		select {
		case <-l.ackCh:
		case <-l.ctx.Done():
			l.t.Fatalf("%s: %d ✓s, waiting for %d: %v", what, l.ackCount(), want, l.ctx.Err())
		}
	}
}

// finish stops sending, waits until every ✓'d message has arrived, stops
// the receivers, and checks each was stored once and arrived in seq order.
// It returns the number of ✓'d messages.
func (l *load) finish(what string) int {
	l.t.Helper()
	l.stop()
	missing := func() []string {
		l.mu.Lock()
		defer l.mu.Unlock()
		var out []string
		for id := range l.acked {
			if l.got[id] == nil {
				out = append(out, id)
			}
		}
		return out
	}
	deadline := time.After(60 * time.Second)
	for len(missing()) > 0 {
		select {
		case <-l.gotCh:
		case <-deadline:
			l.t.Fatalf("after %s, %d ✓'d messages never arrived: %v", what, len(missing()), missing())
		}
	}
	l.cancel()
	l.wg.Wait()

	l.mu.Lock()
	defer l.mu.Unlock()
	for id, seq := range l.acked {
		rc := l.got[id]
		if len(rc.envIDs) != 1 {
			l.t.Errorf("%s was stored %d times (envelope ids %v)", id, len(rc.envIDs), rc.envIDs)
		}
		if rc.seq != seq {
			l.t.Errorf("%s: ✓ said seq %d, the receiver got seq %d", id, seq, rc.seq)
		}
	}
	for i, seqs := range l.order {
		for j := 1; j < len(seqs); j++ {
			if seqs[j] <= seqs[j-1] {
				l.t.Fatalf("pair %d: seq %d arrived after %d", i, seqs[j], seqs[j-1])
			}
		}
	}
	return len(l.acked)
}
