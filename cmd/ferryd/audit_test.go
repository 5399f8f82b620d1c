package main

// Privacy audit (docs/privacy.md): after a scripted conversation in which
// every message was delivered and acked, and after ferryd compacted its
// store on exit, no file of the data directory holds any message's
// plaintext or ciphertext, and ferryd's debug log holds no ciphertext, key
// or auth token; an undelivered envelope past its TTL is gone the same way.
// The ciphertexts, keys and challenges are the exact bytes that crossed the
// wire: the clients talk through a recording proxy that decodes every
// WebSocket frame in both directions.

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// recorder is a TCP proxy in front of ferryd that decodes the WebSocket
// frames going through it (ferryd does not negotiate compression, so
// payloads are the protobuf frames; client frames are only masked).
type recorder struct {
	ln     net.Listener
	target string

	mu      sync.Mutex
	content [][]byte // message ciphertexts (Send, SyncToDevice, GroupSend, Envelope contents)
	secrets [][]byte // key material and auth tokens (never to be logged)
}

func newRecorder(t *testing.T, target string) *recorder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{ln: ln, target: target}
	go r.accept()
	t.Cleanup(func() { ln.Close() })
	return r
}

func (r *recorder) url() string { return "ws://" + r.ln.Addr().String() }

func (r *recorder) accept() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", r.target)
		if err != nil {
			c.Close()
			continue
		}
		go func() { r.pipe(u, c, true); u.Close() }()
		go func() { r.pipe(c, u, false); c.Close() }()
	}
}

// pipe copies src to dst while decoding it: HTTP headers, then frames.
func (r *recorder) pipe(dst io.Writer, src io.Reader, fromClient bool) {
	br := bufio.NewReader(io.TeeReader(src, dst))
	defer func() { _, _ = io.Copy(io.Discard, br) }()
	for {
		l, err := br.ReadString('\n')
		if err != nil {
			return
		}
		if l == "\r\n" {
			break
		}
	}
	var msg []byte
	for {
		fin, op, payload, err := readWSFrame(br)
		if err != nil {
			return
		}
		if op >= 8 { // control frames
			continue
		}
		msg = append(msg, payload...)
		if fin {
			r.record(msg, fromClient)
			msg = nil
		}
	}
}

func readWSFrame(br *bufio.Reader) (fin bool, op byte, payload []byte, err error) {
	var h [2]byte
	if _, err = io.ReadFull(br, h[:]); err != nil {
		return
	}
	fin, op = h[0]&0x80 != 0, h[0]&0x0f
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var b [2]byte
		_, err = io.ReadFull(br, b[:])
		n = uint64(binary.BigEndian.Uint16(b[:]))
	case 127:
		var b [8]byte
		_, err = io.ReadFull(br, b[:])
		n = binary.BigEndian.Uint64(b[:])
	}
	if err != nil || n > 64<<20 {
		return false, 0, nil, fmt.Errorf("bad frame length")
	}
	var key [4]byte
	masked := h[1]&0x80 != 0
	if masked {
		if _, err = io.ReadFull(br, key[:]); err != nil {
			return
		}
	}
	payload = make([]byte, n)
	if _, err = io.ReadFull(br, payload); err != nil {
		return
	}
	if masked {
		for i := range payload {
			payload[i] ^= key[i%4]
		}
	}
	return
}

func (r *recorder) record(b []byte, fromClient bool) {
	var content, secrets [][]byte
	add := func(dst *[][]byte, bs ...[]byte) {
		for _, x := range bs {
			if len(x) > 0 {
				*dst = append(*dst, x)
			}
		}
	}
	if fromClient {
		f := &wirepb.ClientFrame{}
		if proto.Unmarshal(b, f) != nil {
			return
		}
		switch x := f.Body.(type) {
		case *wirepb.ClientFrame_Send:
			for _, c := range x.Send.Ciphertexts {
				add(&content, c.Content)
			}
		case *wirepb.ClientFrame_SyncToDevice:
			add(&content, x.SyncToDevice.Content)
		case *wirepb.ClientFrame_GroupSend:
			add(&content, x.GroupSend.Content)
		case *wirepb.ClientFrame_Register:
			add(&secrets, x.Register.DeviceKey, x.Register.Signature)
		case *wirepb.ClientFrame_Auth:
			add(&secrets, x.Auth.Signature)
		case *wirepb.ClientFrame_UploadKeys:
			add(&secrets, x.UploadKeys.IdentityKey)
			if s := x.UploadKeys.SignedPrekey; s != nil {
				add(&secrets, s.PublicKey, s.Signature)
			}
			for _, k := range x.UploadKeys.OneTimePrekeys {
				add(&secrets, k.PublicKey)
			}
		case *wirepb.ClientFrame_PublishDeviceList:
			add(&secrets, x.PublishDeviceList.GetList().GetSignature())
		case *wirepb.ClientFrame_LinkStart:
			add(&secrets, x.LinkStart.DeviceKey, x.LinkStart.IdentityKey, x.LinkStart.EphemeralKey)
		case *wirepb.ClientFrame_GetLink:
			add(&secrets, x.GetLink.CodeId)
		case *wirepb.ClientFrame_ApproveLink:
			add(&secrets, x.ApproveLink.CodeId, x.ApproveLink.EphemeralKey, x.ApproveLink.Sealed)
		}
	} else {
		f := &wirepb.ServerFrame{}
		if proto.Unmarshal(b, f) != nil {
			return
		}
		if w := f.GetResponse().GetWelcome(); w != nil {
			add(&secrets, w.Challenge)
		}
		if l := f.GetResponse().GetLinkStart(); l != nil {
			add(&secrets, l.CodeId)
		}
		if l := f.GetEvent().GetLinkApproved(); l != nil {
			add(&secrets, l.EphemeralKey, l.Sealed)
		}
		if e := f.GetEvent().GetEnvelope(); e != nil {
			add(&content, e.Content)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.content = append(r.content, content...)
	r.secrets = append(r.secrets, secrets...)
}

func (r *recorder) seen() (content, secrets [][]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.content...), append([][]byte(nil), r.secrets...)
}

// window is the length of the pieces of a needle looked for: a piece of 16
// random bytes does not occur by chance, and a copy of a needle cut up or
// wrapped (a compressed block, a record split across pages) still leaves
// whole pieces.
const window = 16

// found reports how needle occurs in hay: raw, as lowercase or uppercase
// hex, or as standard or URL base64 (any piece at a 3-byte boundary), or
// "" if not at all. Bytes of needle that are key material the server keeps
// on purpose (skip: e.g. the sender's identity key inside a
// PreKeySignalMessage), with the two bytes of protobuf framing before
// them, are not looked for.
func found(hay, needle []byte, skip [][]byte) string {
	excluded := make([]bool, len(needle))
	for _, k := range skip {
		for off := 0; len(k) > 0; {
			i := bytes.Index(needle[off:], k)
			if i < 0 {
				break
			}
			for j := max(0, off+i-2); j < off+i+len(k); j++ {
				excluded[j] = true
			}
			off += i + 1
		}
	}
	var pieces [][]byte
	if len(needle) <= window {
		pieces = [][]byte{needle}
	}
	const n = window + 2 // a multiple of 3, so base64 of a piece is aligned
	for i := 0; i+n <= len(needle); i += 3 {
		if !slices.Contains(excluded[i:i+n], true) {
			pieces = append(pieces, needle[i:i+n])
		}
	}
	if len(pieces) == 0 {
		panic("audit: nothing of a needle left to look for")
	}
	lower := bytes.ToLower(hay)
	for _, p := range pieces {
		switch {
		case bytes.Contains(hay, p):
			return "raw"
		case bytes.Contains(lower, []byte(hex.EncodeToString(p))):
			return "hex"
		case bytes.Contains(hay, []byte(base64.StdEncoding.EncodeToString(p))),
			bytes.Contains(hay, []byte(base64.RawURLEncoding.EncodeToString(p))):
			return "base64"
		}
	}
	return ""
}

// audit lists every file under dir that holds any needle.
func audit(t *testing.T, dir string, needles map[string][]byte, skip [][]byte) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for name, n := range needles {
			if how := found(b, n, skip); how != "" {
				out = append(out, fmt.Sprintf("%s found (%s) in %s", name, how, p))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func needlesOf(prefix string, bs [][]byte) map[string][]byte {
	m := map[string][]byte{}
	for i, b := range bs {
		m[fmt.Sprintf("%s %d (%d bytes)", prefix, i, len(b))] = b
	}
	return m
}

// conversation runs alice and bob through 1:1 messages both ways, the
// linking of a second device of bob's (which gets his history), and a group
// message, every one received (and so acked) and every receipt drained. It
// returns the plaintexts and the link code.
func conversation(t *testing.T, url string) (texts []string, linkCode string) {
	t.Helper()
	n := rand.Int64()
	text := func(s string) string {
		s = fmt.Sprintf("%s %d", s, n)
		texts = append(texts, s)
		return s
	}
	alice, bob := t.TempDir(), t.TempDir()
	mustFerry(t, alice, "--server", url, "register", "alice")
	mustFerry(t, bob, "--server", url, "register", "bob")
	mustFerry(t, alice, "send", "bob", text("meet at the north gate"))
	mustFerry(t, alice, "send", "bob", text("bring the second key"))
	got := parseLines(t, mustFerry(t, bob, "recv", "--json"))
	mustFerry(t, bob, "send", "alice", text("understood, see you at nine"))
	bob2, code := linkVia(t, url, bob)
	mustFerry(t, alice, "send", "bob", text("to both of your devices"))
	mustFerry(t, alice, "group", "create", "team", "bob")
	mustFerry(t, alice, "group", "send", "team", text("the plan changed"))
	for range 3 { // drain: messages, sender keys, updates, receipts
		got = append(got, parseLines(t, mustFerry(t, bob, "recv", "--json"))...)
		got = append(got, parseLines(t, mustFerry(t, bob2, "recv", "--json"))...)
		got = append(got, parseLines(t, mustFerry(t, alice, "recv", "--json"))...)
	}
	var recvd []string
	for _, l := range got {
		if l.Type == "message" {
			recvd = append(recvd, l.Text)
		}
	}
	for _, s := range texts {
		if !strings.Contains(strings.Join(recvd, "\n"), s) {
			t.Fatalf("%q was not delivered (got %q)", s, recvd)
		}
	}
	return texts, code
}

func textNeedles(texts []string) map[string][]byte {
	m := map[string][]byte{}
	for i, s := range texts {
		m[fmt.Sprintf("plaintext %d", i)] = []byte(s)
	}
	return m
}

func merge(ms ...map[string][]byte) map[string][]byte {
	out := map[string][]byte{}
	for _, m := range ms {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

// The audit: delivered, acked, compacted: no content on disk, no content,
// keys or tokens in the debug log.
func TestBlackBoxAuditDeliveredLeavesNothing(t *testing.T) {
	data := t.TempDir()
	srv := startServer(t, data, "--compact-on-exit")
	rec := newRecorder(t, srv.addr)
	texts, code := conversation(t, rec.url())
	srv.term()
	if n := inboxEntries(t, data); n != 0 {
		t.Fatalf("%d inbox entries left after every ack", n)
	}
	content, secrets := rec.seen()
	if len(content) < 8 || len(secrets) < 8 {
		t.Fatalf("recorded %d ciphertexts and %d secrets: the recorder missed traffic", len(content), len(secrets))
	}
	if !strings.Contains(srv.log.String(), "store compacted") {
		t.Fatal("ferryd did not compact its store on exit")
	}
	onDisk := merge(textNeedles(texts), needlesOf("ciphertext", content))
	for _, f := range audit(t, data, onDisk, secrets) {
		t.Error(f)
	}
	logFile := filepath.Join(t.TempDir(), "ferryd.log")
	if err := os.WriteFile(logFile, []byte(srv.log.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	// ferryd ran with --log-level debug (the harness's default); it has no
	// debug-only lines today, so this covers every line it can write here.
	if !strings.Contains(srv.log.String(), "relay: registered") {
		t.Fatal("ferryd's log lacks the relay's lines: the log audit would prove nothing")
	}
	tokens := merge(onDisk, needlesOf("key or token", secrets), map[string][]byte{"link code": []byte(code)})
	for _, f := range audit(t, logFile, tokens, nil) {
		t.Error(f)
	}
}

var expiredRE = regexp.MustCompile(`(?m)^ferry_inbox_expired_entries_total (\S+)$`)

// An envelope never delivered is gone the same way once its TTL has passed.
func TestBlackBoxAuditExpiredLeavesNothing(t *testing.T) {
	data := t.TempDir()
	srv := startServer(t, data, "--compact-on-exit", "--inbox-ttl", "1s", "--inbox-sweep-interval", "100ms")
	rec := newRecorder(t, srv.addr)
	alice, carol := t.TempDir(), t.TempDir()
	mustFerry(t, alice, "--server", rec.url(), "register", "alice")
	mustFerry(t, carol, "--server", rec.url(), "register", "carol")
	secret := fmt.Sprintf("never read %d", rand.Int64())
	mustFerry(t, alice, "send", "carol", secret)
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + srv.addr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if m := expiredRE.FindSubmatch(b); m != nil {
			if v, _ := strconv.ParseFloat(string(m[1]), 64); v >= 1 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the envelope did not expire")
		}
		time.Sleep(50 * time.Millisecond) // polling a metric with a deadline
	}
	srv.term()
	if n := inboxEntries(t, data); n != 0 {
		t.Fatalf("%d inbox entries left after expiry", n)
	}
	content, secrets := rec.seen()
	if len(content) != 1 {
		t.Fatalf("recorded %d ciphertexts, want the one to carol", len(content))
	}
	for _, f := range audit(t, data, merge(textNeedles([]string{secret}), needlesOf("ciphertext", content)), secrets) {
		t.Error(f)
	}
}

// The audit can fail: a ferryd built with -tags auditleak keeps a copy of
// every envelope's content in its data directory, and the same audit finds
// every ciphertext there.
func TestBlackBoxAuditDetectsKeptBytes(t *testing.T) {
	data := t.TempDir()
	srv := startServerBin(t, filepath.Join(binDir, "leaky-ferryd"), data, "--compact-on-exit")
	rec := newRecorder(t, srv.addr)
	alice, bob := t.TempDir(), t.TempDir()
	mustFerry(t, alice, "--server", rec.url(), "register", "alice")
	mustFerry(t, bob, "--server", rec.url(), "register", "bob")
	mustFerry(t, alice, "send", "bob", "kept by a broken server")
	mustFerry(t, bob, "recv", "--json")
	mustFerry(t, alice, "recv", "--json")
	srv.term()
	if n := inboxEntries(t, data); n != 0 {
		t.Fatalf("%d inbox entries left after every ack", n)
	}
	content, secrets := rec.seen()
	sent := needlesOf("ciphertext", content[:1]) // alice's Send: the first content recorded
	fs := audit(t, data, sent, secrets)
	if len(fs) != 1 || !strings.Contains(fs[0], "kept-content.bin") {
		t.Fatalf("the audit did not find the kept ciphertext exactly in the side file: %v", fs)
	}
}

// Without the compaction, Pebble's files still hold acked envelopes (in the
// write-ahead log, and in sstables until a compaction rewrites them): the
// audit finds them, which is why --compact-on-exit exists (docs/privacy.md).
func TestBlackBoxAuditWithoutCompactionFindsBytes(t *testing.T) {
	data := t.TempDir()
	srv := startServer(t, data)
	rec := newRecorder(t, srv.addr)
	alice, bob := t.TempDir(), t.TempDir()
	mustFerry(t, alice, "--server", rec.url(), "register", "alice")
	mustFerry(t, bob, "--server", rec.url(), "register", "bob")
	mustFerry(t, alice, "send", "bob", "acked but not compacted")
	mustFerry(t, bob, "recv", "--json")
	mustFerry(t, alice, "recv", "--json")
	srv.term()
	if n := inboxEntries(t, data); n != 0 {
		t.Fatalf("%d inbox entries left after every ack", n)
	}
	content, secrets := rec.seen()
	if fs := audit(t, data, needlesOf("ciphertext", content), secrets); len(fs) == 0 {
		t.Fatal("the acked ciphertext is in no file of an uncompacted store: the compaction step would prove nothing")
	}
}
