package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/proto"
)

type line struct {
	Type        string `json:"type"`
	ID          uint64 `json:"id"`
	From        string `json:"from"`
	FromDevice  uint32 `json:"from_device"`
	Group       string `json:"group"`
	Seq         uint64 `json:"seq"`
	Text        string `json:"text"`
	ServerTime  string `json:"server_time"`
	ClientMsgID string `json:"client_msg_id"`
	Outgoing    bool   `json:"outgoing"`
}

func parseLines(t *testing.T, out string) []line {
	t.Helper()
	var ls []line
	for _, s := range strings.Split(strings.TrimSpace(out), "\n") {
		if s == "" {
			continue
		}
		var l line
		if err := json.Unmarshal([]byte(s), &l); err != nil {
			t.Fatalf("bad JSON line %q: %v", s, err)
		}
		ls = append(ls, l)
	}
	return ls
}

// inboxEntries opens a stopped server's database and counts inbox entries.
func inboxEntries(t *testing.T, data string) int {
	t.Helper()
	db, err := store.Open(data, store.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	it, err := db.NewIter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	n := 0
	for it.SeekGE([]byte{store.PrefixInbox}); it.Valid() && it.Key()[0] == store.PrefixInbox; it.Next() {
		n++
	}
	return n
}

// grepTree fails if any file under dir contains any of the needles.
func grepTree(t *testing.T, dir string, needles []string) {
	t.Helper()
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for _, n := range needles {
			if bytes.Contains(b, []byte(n)) {
				t.Errorf("plaintext %q found in server file %s", n, p)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func register(t *testing.T, srv *server, name string) string {
	t.Helper()
	home := t.TempDir()
	mustFerry(t, home, "--server", srv.url(), "register", name)
	return home
}

// (2) + (3): ✓ means committed: a SIGKILL right after it loses nothing; once
// bob acked, his inbox is empty and a second recv prints nothing. No
// plaintext reaches the server's disk or logs.
func TestBlackBoxKillAfterAckThenDeliver(t *testing.T) {
	data := t.TempDir()
	srv := startServer(t, data)
	alice := register(t, srv, "alice")
	bob := register(t, srv, "bob")

	secret := fmt.Sprintf("attack at dawn %d", rand.Int64())
	out := mustFerry(t, alice, "send", "bob", secret)
	if !strings.Contains(out, "seq 1") {
		t.Fatalf("send printed %q, want the sequence", out)
	}
	srv.kill9() // right after ✓, bob offline
	srv.restart()

	got := parseLines(t, mustFerry(t, bob, "recv", "--json"))
	if len(got) != 1 || got[0].Text != secret || got[0].From != "alice" || got[0].Seq != 1 || got[0].FromDevice != 1 {
		t.Fatalf("bob got %+v, want the one message", got)
	}
	if out := mustFerry(t, bob, "recv", "--json"); strings.TrimSpace(out) != "" {
		t.Fatalf("second recv printed %q, want nothing", out)
	}
	// alice gets ✓✓ for it.
	rc := parseLines(t, mustFerry(t, alice, "recv", "--json"))
	if len(rc) != 1 || rc[0].Type != "delivered" || rc[0].From != "bob" {
		t.Fatalf("alice got %+v, want one delivered receipt", rc)
	}
	hist := mustFerry(t, alice, "history", "bob")
	if !strings.Contains(hist, "✓✓") {
		t.Fatalf("alice's history %q does not show ✓✓", hist)
	}

	// Acks are not synced on their own (a lost ack is only a redelivery, which
	// devices drop by id), so look at the store after a clean stop.
	srv.term()
	if n := inboxEntries(t, data); n != 0 {
		t.Fatalf("%d inbox entries left after every ack", n)
	}
	grepTree(t, data, []string{secret})
	if strings.Contains(srv.log.String(), secret) {
		t.Fatal("plaintext found in ferryd's log")
	}
}

// (1) 1,000 messages while bob's connection is cut at random moments and
// his process killed now and then: he ends with all of them, in sequence
// order, none twice.
func TestBlackBoxThousandWithCuts(t *testing.T) {
	n := 1000
	if testing.Short() {
		n = 200
	}
	data := t.TempDir()
	srv := startServer(t, data)
	aliceHome := register(t, srv, "alice")
	bobHome := register(t, srv, "bob")
	px := newProxy(t, srv.addr)
	// bob talks through the proxy from now on.
	mustFerry(t, bobHome, "--server", px.url(), "history", "alice")

	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	alice, err := client.Open(ctx, client.Options{Home: aliceHome,
		Backoff: client.Backoff{Min: 20 * time.Millisecond, Max: 500 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer alice.Close()

	sendErr := make(chan error, 1)
	texts := make([]string, n)
	go func() {
		for i := range n {
			texts[i] = fmt.Sprintf("msg-%04d-%x", i, rand.Uint32())
			if _, err := alice.Send(ctx, "bob", texts[i]); err != nil {
				sendErr <- fmt.Errorf("send %d: %w", i, err)
				return
			}
		}
		sendErr <- nil
	}()
	// The chaos: cut bob's connections every 20-200ms.
	stopCuts := make(chan struct{})
	cutsDone := make(chan struct{})
	go func() {
		defer close(cutsDone)
		for {
			select {
			case <-stopCuts:
				return
			case <-time.After(time.Duration(20+rand.IntN(180)) * time.Millisecond):
				px.cut()
			}
		}
	}()

	printed := map[string]int{}
	sent := false
	for round := 0; ; round++ {
		if !sent {
			select {
			case err := <-sendErr:
				if err != nil {
					t.Fatal(err)
				}
				sent = true
			default:
			}
		}
		cmd := exec.CommandContext(ctx, filepath.Join(binDir, "ferry"), "--home", bobHome, "recv", "--json", "--wait", "2s")
		var out bytes.Buffer
		cmd.Stdout = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if round%3 == 2 { // now and then, SIGKILL bob mid-run
			time.AfterFunc(time.Duration(100+rand.IntN(900))*time.Millisecond, func() { _ = cmd.Process.Kill() })
		}
		_ = cmd.Wait()
		for _, l := range parseLines(t, out.String()) {
			printed[l.Text]++
		}
		if sent {
			h := parseLines(t, mustFerry(t, bobHome, "history", "alice", "--json"))
			if len(h) >= n {
				break
			}
		}
		if ctx.Err() != nil {
			t.Fatal("timed out")
		}
	}
	close(stopCuts)
	<-cutsDone
	t.Logf("connection cuts: %d", px.cuts)

	h := parseLines(t, mustFerry(t, bobHome, "history", "alice", "--json"))
	if len(h) != n {
		t.Fatalf("bob's history has %d messages, want %d", len(h), n)
	}
	for i, m := range h {
		if m.Seq != uint64(i+1) || m.Text != texts[i] {
			t.Fatalf("history[%d] = seq %d %q, want seq %d %q", i, m.Seq, m.Text, i+1, texts[i])
		}
	}
	for text, c := range printed {
		if c > 1 {
			t.Errorf("%q printed %d times", text, c)
		}
	}
	if px.cuts == 0 {
		t.Fatal("no connection was cut; the test tested nothing")
	}
	// No plaintext of any message on the server's disk or in its log.
	srv.kill9()
	grepTree(t, data, texts)
	for _, text := range texts {
		if strings.Contains(srv.log.String(), text) {
			t.Fatalf("plaintext %q in ferryd's log", text)
		}
	}
}

// rawConn speaks frames directly, to send what no SDK would.
type rawConn struct {
	t  *testing.T
	ws *websocket.Conn
	id uint64
}

func dialRaw(t *testing.T, srv *server) *rawConn {
	t.Helper()
	ws, _, err := websocket.DefaultDialer.Dial(srv.url()+wire.Path, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	return &rawConn{t: t, ws: ws}
}

func (r *rawConn) writeBytes(typ int, b []byte) {
	r.t.Helper()
	if err := r.ws.WriteMessage(typ, b); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rawConn) request(f *wirepb.ClientFrame) {
	r.t.Helper()
	r.id++
	f.Id = r.id
	b, _ := proto.Marshal(f)
	r.writeBytes(websocket.BinaryMessage, b)
}

// next reads the next response (skipping events).
func (r *rawConn) next() *wirepb.Response {
	r.t.Helper()
	for {
		_ = r.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, b, err := r.ws.ReadMessage()
		if err != nil {
			r.t.Fatalf("read: %v", err)
		}
		f := &wirepb.ServerFrame{}
		if err := proto.Unmarshal(b, f); err != nil {
			r.t.Fatal(err)
		}
		if resp := f.GetResponse(); resp != nil {
			return resp
		}
	}
}

func wantCode(t *testing.T, r *wirepb.Response, code wirepb.ErrorCode) {
	t.Helper()
	if r.GetError().GetCode() != code {
		t.Fatalf("got %v, want error %v", r, code)
	}
}

// (4) malformed, oversized and out-of-order frames get typed errors and the
// server keeps serving: the same connection and everyone else.
func TestBlackBoxBadFrames(t *testing.T) {
	srv := startServer(t, t.TempDir(), "--max-frame-bytes", "4096")
	alice := register(t, srv, "alice")
	bob := register(t, srv, "bob")

	r := dialRaw(t, srv)
	r.request(&wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{ClientMsgId: "x", To: "bob"}}})
	wantCode(t, r.next(), wirepb.ErrorCode_UNEXPECTED_FRAME) // before Hello
	r.writeBytes(websocket.BinaryMessage, []byte{0xff, 0xff, 0xff})
	wantCode(t, r.next(), wirepb.ErrorCode_BAD_REQUEST) // garbage
	r.writeBytes(websocket.TextMessage, []byte("hello?"))
	wantCode(t, r.next(), wirepb.ErrorCode_BAD_REQUEST) // text frame
	r.writeBytes(websocket.BinaryMessage, make([]byte, 5000))
	wantCode(t, r.next(), wirepb.ErrorCode_FRAME_TOO_LARGE)
	r.request(&wirepb.ClientFrame{Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{MinVersion: 1, MaxVersion: 1}}})
	if r.next().GetWelcome() == nil {
		t.Fatal("no Welcome after bad frames")
	}
	r.request(&wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{1}}}})
	wantCode(t, r.next(), wirepb.ErrorCode_UNEXPECTED_FRAME) // before Auth
	r.request(&wirepb.ClientFrame{Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{MinVersion: 1, MaxVersion: 1}}})
	wantCode(t, r.next(), wirepb.ErrorCode_UNEXPECTED_FRAME) // Hello twice
	r.request(&wirepb.ClientFrame{Body: &wirepb.ClientFrame_Register{Register: &wirepb.Register{Username: "Bad Name!"}}})
	wantCode(t, r.next(), wirepb.ErrorCode_INVALID_USERNAME)

	// A wrong version is refused with its code and close code 4001.
	v := dialRaw(t, srv)
	v.request(&wirepb.ClientFrame{Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{MinVersion: 7, MaxVersion: 9}}})
	wantCode(t, v.next(), wirepb.ErrorCode_UNSUPPORTED_VERSION)
	_, _, err := v.ws.ReadMessage()
	if ce, ok := err.(*websocket.CloseError); !ok || ce.Code != wire.CloseUnsupportedVersion {
		t.Fatalf("got %v, want close %d", err, wire.CloseUnsupportedVersion)
	}

	// Meanwhile the server serves others.
	mustFerry(t, alice, "send", "bob", "still here")
	got := parseLines(t, mustFerry(t, bob, "recv", "--json"))
	if len(got) != 1 || got[0].Text != "still here" {
		t.Fatalf("bob got %+v", got)
	}
}

// (5) a send whose device set is wrong stores nothing and says which devices.
func TestBlackBoxDeviceMismatch(t *testing.T) {
	data := t.TempDir()
	srv := startServer(t, data)
	register(t, srv, "bob")
	aliceHome := register(t, srv, "alice")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	alice, err := client.Open(ctx, client.Options{Home: aliceHome})
	if err != nil {
		t.Fatal(err)
	}
	defer alice.Close()
	key, _, _ := alice.Store().GetSetting(ctx, "device_key")
	conn, err := client.Dial(ctx, srv.url(), client.DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Auth(ctx, "alice", 1, key, true); err != nil {
		t.Fatal(err)
	}
	ct := func(user string, dev, reg uint32) *wirepb.DeviceCiphertext {
		return &wirepb.DeviceCiphertext{Username: user, DeviceId: dev, RegistrationId: reg,
			Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("opaque")}
	}
	_, err = conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
		ClientMsgId: "m1", To: "bob", Ciphertexts: []*wirepb.DeviceCiphertext{ct("bob", 7, 1), ct("alice", 1, 1)}}}})
	we, ok := err.(*wire.Error)
	if !ok || we.Code != wirepb.ErrorCode_DEVICE_MISMATCH || we.Mismatch == nil {
		t.Fatalf("got %v, want DEVICE_MISMATCH", err)
	}
	refs := func(rs []*wirepb.DeviceRef) string {
		var s []string
		for _, r := range rs {
			s = append(s, fmt.Sprintf("%s.%d", r.Username, r.DeviceId))
		}
		return strings.Join(s, ",")
	}
	if got := refs(we.Mismatch.Missing); got != "bob.1" {
		t.Errorf("missing = %q, want bob.1", got)
	}
	if got := refs(we.Mismatch.Extra); got != "alice.1,bob.7" {
		t.Errorf("extra = %q, want alice.1,bob.7 (the sending device itself is extra)", got)
	}
	// A stale registration id is reported as stale.
	_, err = conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
		ClientMsgId: "m2", To: "bob", Ciphertexts: []*wirepb.DeviceCiphertext{ct("bob", 1, 99999)}}}})
	if we, ok := err.(*wire.Error); !ok || we.Mismatch == nil || refs(we.Mismatch.Stale) != "bob.1" {
		t.Fatalf("got %v, want bob.1 stale", err)
	}
	srv.kill9()
	if n := inboxEntries(t, data); n != 0 {
		t.Fatalf("%d inbox entries stored by rejected sends", n)
	}
}

// ferryd is SIGKILLed and restarted while alice keeps sending: every send
// ends in ✓ (the SDK retries under the same client message id), and bob
// gets each message exactly once, in sequence order with no gaps.
func TestBlackBoxSendRetriesAcrossServerCrash(t *testing.T) {
	const n = 60
	data := t.TempDir()
	srv := startServer(t, data)
	aliceHome := register(t, srv, "alice")
	bobHome := register(t, srv, "bob")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	alice, err := client.Open(ctx, client.Options{Home: aliceHome,
		Backoff: client.Backoff{Min: 20 * time.Millisecond, Max: 300 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer alice.Close()
	accepted := make(chan int, n)
	errc := make(chan error, 1)
	go func() {
		for i := range n {
			if _, err := alice.Send(ctx, "bob", fmt.Sprintf("crash-%02d", i)); err != nil {
				errc <- err
				return
			}
			accepted <- i
		}
		errc <- nil
	}()
	// Crash the server twice mid-stream, each time right after some ✓.
	for _, at := range []int{15, 40} {
		for i := range accepted {
			if i >= at {
				break
			}
		}
		srv.kill9()
		srv.restart()
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	got := parseLines(t, mustFerry(t, bobHome, "recv", "--json"))
	if len(got) != n {
		t.Fatalf("bob got %d messages, want %d", len(got), n)
	}
	for i, m := range got {
		if want := fmt.Sprintf("crash-%02d", i); m.Text != want || m.Seq != uint64(i+1) {
			t.Fatalf("message %d = seq %d %q, want seq %d %q", i, m.Seq, m.Text, i+1, want)
		}
	}
}
