package relay

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
)

// TestWriteFramesBatch checks that frames written together in one socket
// write (writeFrames, which bypasses gorilla's writer) are read back by a
// standard WebSocket client as the same messages, in order, for every
// length encoding of the frame header and across the per-Write size cap.
func TestWriteFramesBatch(t *testing.T) {
	sizes := []struct {
		name string
		n    []int
	}{
		{"empty", []int{0}},
		{"7-bit lengths", []int{1, 125}},
		{"16-bit lengths", []int{126, 127, 65535}},
		{"64-bit lengths", []int{65536, 70000}},
		{"mixed, over the per-write cap", []int{3, 40000, 125, 65536, 126, 1, 30000, 0, 200000}},
	}
	for _, tc := range sizes {
		t.Run(tc.name, func(t *testing.T) {
			var frames []outFrame
			for i, n := range tc.n {
				frames = append(frames, outFrame{b: bytes.Repeat([]byte{byte(i + 1)}, n)})
			}
			errc := make(chan error, 1)
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				ws, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
				if err != nil {
					errc <- err
					return
				}
				c := &conn{s: &Server{cfg: Config{WriteTimeout: time.Minute}}, ws: ws}
				errc <- c.writeFrames(frames)
			}))
			defer srv.Close()
			cl, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			cl.SetReadLimit(1 << 20)
			for i, f := range frames {
				typ, got, err := cl.ReadMessage()
				if err != nil {
					t.Fatalf("message %d: %v", i, err)
				}
				if typ != websocket.BinaryMessage || !bytes.Equal(got, f.b) {
					t.Fatalf("message %d: type %d, %d bytes; want binary, %d bytes", i, typ, len(got), len(f.b))
				}
			}
			if err := <-errc; err != nil {
				t.Fatalf("writeFrames: %v", err)
			}
		})
	}
}

// pipeWriter is an http.ResponseWriter whose Hijack hands out one end of a
// net.Pipe, so a test controls whether the client side reads at all.
type pipeWriter struct {
	hdr  http.Header
	conn net.Conn
}

func (p *pipeWriter) Header() http.Header         { return p.hdr }
func (p *pipeWriter) Write(b []byte) (int, error) { return len(b), nil }
func (p *pipeWriter) WriteHeader(int)             {}
func (p *pipeWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return p.conn, bufio.NewReadWriter(bufio.NewReader(p.conn), bufio.NewWriter(p.conn)), nil
}

// TestEnqueueBoundedWhenClientStopsReading checks that a connection whose
// client reads nothing holds at most wcap queued frames, that enqueue then
// gives up instead of blocking for good, and that the write side ends.
func TestEnqueueBoundedWhenClientStopsReading(t *testing.T) {
	srvEnd, cliEnd := net.Pipe()
	defer cliEnd.Close()
	// The client reads the upgrade response and nothing after it.
	upgraded := make(chan error, 1)
	go func() {
		_, err := http.ReadResponse(bufio.NewReader(cliEnd), nil)
		upgraded <- err
	}()
	req := httptest.NewRequest(http.MethodGet, "/", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	ws, err := (&websocket.Upgrader{}).Upgrade(&pipeWriter{hdr: http.Header{}, conn: srvEnd}, req, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-upgraded; err != nil {
		t.Fatal(err)
	}
	cfg := Config{WriteTimeout: 20 * time.Millisecond}
	cfg.setDefaults()
	s := &Server{cfg: cfg, metrics: newMetrics(prometheus.NewRegistry())}
	c := newConn(s, ws, "pipe")
	frame := []byte("frame")
	accepted := 0
	for c.enqueue(frame) {
		accepted++
		c.wmu.Lock()
		n := len(c.wq)
		c.wmu.Unlock()
		if n > c.wcap {
			t.Fatalf("%d frames queued, over the bound of %d", n, c.wcap)
		}
		if accepted > 10*c.wcap {
			t.Fatalf("%d frames accepted although the client reads nothing", accepted)
		}
	}
	<-c.writerDone // the writer's Write failed or the slow consumer was closed; writes are over
	if c.ctx.Err() == nil {
		t.Fatal("the connection is not closing")
	}
	if c.enqueue(frame) || c.tryEnqueue(frame) {
		t.Fatal("a frame was queued after the write side ended")
	}
}
