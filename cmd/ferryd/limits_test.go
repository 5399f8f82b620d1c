package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/proto"
)

// TestBlackBoxMessageSizeAndStdin: `ferryd --max-message-bytes N` is the
// limit a send meets, and `ferry send NAME -` reads the text from standard
// input: a text that fits is delivered whole, one that does not fails with
// MESSAGE_TOO_LARGE, stores nothing, and the next send works.
func TestBlackBoxMessageSizeAndStdin(t *testing.T) {
	srv := startServer(t, t.TempDir(), "--max-message-bytes", "4096")
	alice := register(t, srv, "alice")
	bob := register(t, srv, "bob")

	fits := strings.Repeat("line of text\n", 100) + "last line" // 1.3 KB, several lines
	if out, errs, code := ferryStdin(t, alice, fits+"\n", "send", "bob", "-"); code != 0 {
		t.Fatalf("ferry send bob - : exit %d\n%s\n%s", code, out, errs)
	}
	big := strings.Repeat("x", 8000)
	_, errs, code := ferryStdin(t, alice, big, "send", "bob", "-")
	if code == 0 || !strings.Contains(errs, "MESSAGE_TOO_LARGE") {
		t.Fatalf("8 KB text through a 4 KiB limit: exit %d, stderr %q", code, errs)
	}
	mustFerry(t, alice, "send", "bob", "after the big one")
	got := parseLines(t, mustFerry(t, bob, "recv", "--json"))
	if len(got) != 2 || got[0].Text != fits || got[1].Text != "after the big one" {
		t.Fatalf("bob got %+v", got)
	}
}

// floodStats counts what the flooder was told.
type floodStats struct {
	sends, rateLimited, otherSendErr atomic.Int64
	frameTooLarge, badRequest        atomic.Int64
	refused                          atomic.Int64 // upgrades answered 429 (new connections per IP)
	mu                               sync.Mutex
	closes                           map[int]int // close code -> connections closed with it
}

func (s *floodStats) closed(err error) {
	var ce *websocket.CloseError
	code := -1
	if errors.As(err, &ce) {
		code = ce.Code
	}
	s.mu.Lock()
	s.closes[code]++
	s.mu.Unlock()
}

// rawFlood opens sockets from one client and writes frame() on each as fast
// as it can until the server closes it, then opens another, until ctx ends.
// A reader per socket counts the typed errors and the close code.
func rawFlood(ctx context.Context, srv *server, st *floodStats, frame func(n int) []byte) {
	for n := 0; ctx.Err() == nil; {
		ws, resp, err := websocket.DefaultDialer.DialContext(ctx, srv.url()+wire.Path, nil)
		if err != nil {
			if resp != nil && resp.StatusCode == http.StatusTooManyRequests {
				st.refused.Add(1)
			}
			time.Sleep(time.Millisecond) // a flooder ignores Retry-After; this only keeps the test's own loop from spinning
			continue
		}
		n++
		stop := context.AfterFunc(ctx, func() { ws.Close() })
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				_, b, err := ws.ReadMessage()
				if err != nil {
					if ctx.Err() == nil {
						st.closed(err)
					}
					return
				}
				var f wirepb.ServerFrame
				if proto.Unmarshal(b, &f) != nil {
					continue
				}
				switch f.GetResponse().GetError().GetCode() {
				case wirepb.ErrorCode_FRAME_TOO_LARGE:
					st.frameTooLarge.Add(1)
				case wirepb.ErrorCode_BAD_REQUEST:
					st.badRequest.Add(1)
				}
			}
		}()
		b := frame(n)
		for ws.WriteMessage(websocket.BinaryMessage, b) == nil {
		}
		<-done
		stop()
		ws.Close()
	}
}

// latencies sends n messages from s to r, one at a time, paced at every,
// and returns each one's send→deliver time (Send written to envelope
// received). Every message must be accepted and delivered.
func latencies(t *testing.T, ctx context.Context, sc *client.Conn, to *crashDevice, arrived <-chan string, prefix string, n int, every time.Duration) []time.Duration {
	t.Helper()
	var out []time.Duration
	tick := time.NewTicker(every)
	defer tick.Stop()
	for i := range n {
		id := fmt.Sprintf("%s-%d", prefix, i)
		start := time.Now()
		if _, err := sc.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
			ClientMsgId: id, To: to.name, Ciphertexts: []*wirepb.DeviceCiphertext{{Username: to.name, DeviceId: 1,
				RegistrationId: to.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("ciphertext " + id)}}}}}); err != nil {
			t.Fatalf("the measured client's send %s: %v", id, err)
		}
		select {
		case got := <-arrived:
			if got != id {
				t.Fatalf("the measured client got %s, want %s", got, id)
			}
		case <-ctx.Done():
			t.Fatalf("%s not delivered: %v", id, ctx.Err())
		}
		out = append(out, time.Since(start))
		select {
		case <-tick.C:
		case <-ctx.Done():
		}
	}
	return out
}

func latencySummary(ds []time.Duration) string {
	s := slices.Clone(ds)
	slices.Sort(s)
	q := func(p float64) time.Duration { return s[min(len(s)-1, int(p*float64(len(s))))] }
	return fmt.Sprintf("n=%d p50=%v p90=%v p99=%v max=%v", len(s), q(0.5).Round(10*time.Microsecond),
		q(0.9).Round(10*time.Microsecond), q(0.99).Round(10*time.Microsecond), s[len(s)-1].Round(10*time.Microsecond))
}

// ackAll acks every envelope on c and hands message ids to arrived.
func ackAll(ctx context.Context, c *client.Conn, arrived chan<- string) {
	for ev := range c.Events() {
		env := ev.GetEnvelope()
		if env == nil {
			continue
		}
		go c.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
		if arrived != nil && env.Type == wirepb.EnvelopeType_SIGNAL_MESSAGE {
			arrived <- env.ClientMsgId
		}
	}
}

// TestBlackBoxFlood: one client floods ferryd with oversized frames,
// garbage frames and 10x its send rate while a second client sends one
// message at a time and measures send→deliver. The second client's
// messages are all accepted and delivered, during the flood as without
// it; the flooder is answered with typed errors (RATE_LIMITED,
// FRAME_TOO_LARGE, BAD_REQUEST), its sockets are closed with named codes
// (4000 "too many bad frames", 1009 over 4x the frame limit) and its
// reconnects are refused with HTTP 429 (new connections per IP). The
// latencies are logged (docs/performance.md), not asserted.
func TestBlackBoxFlood(t *testing.T) {
	const (
		sendRate = 20 // per second per device
		maxFrame = 64 << 10
	)
	srv := startServer(t, t.TempDir(), "--send-rate", fmt.Sprint(sendRate), "--send-burst", fmt.Sprint(sendRate),
		"--max-frame-bytes", fmt.Sprint(maxFrame), "--conn-rate", "20", "--conn-burst", "40")
	victim, peer := newCrashDevice(t, srv, "victim"), newCrashDevice(t, srv, "peer")
	flooder, sink := newCrashDevice(t, srv, "flooder"), newCrashDevice(t, srv, "sink")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	vc, err := victim.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer vc.Close()
	pc, err := peer.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	arrived := make(chan string, 1)
	go ackAll(ctx, vc, nil) // delivery receipts
	go ackAll(ctx, pc, arrived)

	n, every := 40, 50*time.Millisecond // 20/s: the victim stays within its own limit
	if testing.Short() {
		n = 20
	}
	quiet := latencies(t, ctx, vc, peer, arrived, "quiet", n, every)

	st := &floodStats{closes: map[int]int{}}
	floodCtx, stopFlood := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(4)
	go func() { // 10x the send rate from one device: 4 requests in flight, each stream at 2.5x
		defer wg.Done()
		fc, err := flooder.connect(floodCtx)
		if err != nil {
			return
		}
		defer fc.Close()
		go ackAll(floodCtx, fc, nil)
		var sw sync.WaitGroup
		for w := range 4 {
			sw.Add(1)
			go func() {
				defer sw.Done()
				tick := time.NewTicker(4 * time.Second / (10 * sendRate))
				defer tick.Stop()
				for i := 0; floodCtx.Err() == nil; i++ {
					_, err := fc.Do(floodCtx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
						ClientMsgId: fmt.Sprintf("f%d-%d", w, i), To: sink.name, Ciphertexts: []*wirepb.DeviceCiphertext{{Username: sink.name, DeviceId: 1,
							RegistrationId: sink.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("flood")}}}}})
					switch {
					case err == nil:
					case wire.CodeOf(err) == wirepb.ErrorCode_RATE_LIMITED:
						st.rateLimited.Add(1)
					case floodCtx.Err() == nil:
						st.otherSendErr.Add(1)
					default:
						continue // cut off by the end of the flood: not counted
					}
					st.sends.Add(1)
					select {
					case <-tick.C:
					case <-floodCtx.Done():
					}
				}
			}()
		}
		sw.Wait()
	}()
	go func() { // oversized frames: typed errors, and on every 4th socket one over 4x the limit
		defer wg.Done()
		rawFlood(floodCtx, srv, st, func(n int) []byte {
			if n%4 == 1 { // the first socket, and every 4th after it
				return make([]byte, 4*maxFrame+1)
			}
			return make([]byte, maxFrame+1)
		})
	}()
	for range 2 { // garbage
		go func() {
			defer wg.Done()
			rawFlood(floodCtx, srv, st, func(int) []byte {
				b := make([]byte, 200)
				rand.Read(b)
				b[0] = 0xff // never a valid field tag: always BAD_REQUEST
				return b
			})
		}()
	}
	floodStart := time.Now()
	flooded := latencies(t, ctx, vc, peer, arrived, "flood", n, every)
	stopFlood()
	floodTime := time.Since(floodStart)
	wg.Wait()

	st.mu.Lock()
	closes := copyCounts(st.closes)
	st.mu.Unlock()
	t.Logf("send→deliver without flood: %s", latencySummary(quiet))
	t.Logf("send→deliver during flood:  %s", latencySummary(flooded))
	t.Logf("flooder: %d sends in %v (%.0f/s against a limit of %d/s; %d RATE_LIMITED, %d other errors), %d FRAME_TOO_LARGE, %d BAD_REQUEST, %d upgrades refused (429), closes by code %v",
		st.sends.Load(), floodTime.Round(time.Millisecond), float64(st.sends.Load())/floodTime.Seconds(), sendRate,
		st.rateLimited.Load(), st.otherSendErr.Load(), st.frameTooLarge.Load(), st.badRequest.Load(), st.refused.Load(), closes)
	if st.rateLimited.Load() == 0 || st.otherSendErr.Load() != 0 {
		t.Errorf("flooding sends: %d RATE_LIMITED, %d other errors", st.rateLimited.Load(), st.otherSendErr.Load())
	}
	if st.frameTooLarge.Load() == 0 || st.badRequest.Load() == 0 {
		t.Errorf("flooding frames: %d FRAME_TOO_LARGE, %d BAD_REQUEST", st.frameTooLarge.Load(), st.badRequest.Load())
	}
	if st.refused.Load() == 0 {
		t.Errorf("the flooder's reconnects were never refused (--conn-rate)")
	}
	if closes[wire.CloseProtocolError] == 0 || closes[websocket.CloseMessageTooBig] == 0 {
		t.Errorf("flooding sockets closed with %v, want %d (too many bad frames) and %d (frame too large)",
			closes, wire.CloseProtocolError, websocket.CloseMessageTooBig)
	}
}

func copyCounts(m map[int]int) map[int]int {
	out := make(map[int]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
