package relay

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
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
