package main

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
	"google.golang.org/protobuf/proto"
)

// link makes newHome a second device of the account in primaryHome, through
// `ferry link` (new device) and `ferry devices approve` (primary).
func link(t *testing.T, srv *server, primaryHome string) (string, string) {
	t.Helper()
	return linkVia(t, srv.url(), primaryHome)
}

// linkVia is link through the server URL url (e.g. a proxy's).
func linkVia(t *testing.T, url, primaryHome string, account ...string) (string, string) {
	t.Helper()
	newHome := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "ferry"), append([]string{"--home", newHome, "--server", url, "link"}, account...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() {
		_ = cmd.Wait()
		t.Fatalf("ferry link printed no code: %s", stderr.String())
	}
	code := strings.TrimSpace(sc.Text())
	out := mustFerry(t, primaryHome, "devices", "approve", code)
	if !strings.Contains(out, "linked device") {
		t.Fatalf("approve printed %q", out)
	}
	for sc.Scan() {
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("ferry link: %v\n%s", err, stderr.String())
	}
	return newHome, code
}

func TestBlackBoxMultiDevice(t *testing.T) {
	data := t.TempDir()
	srv := startServer(t, data)
	alice := register(t, srv, "alice")
	bob := register(t, srv, "bob")

	mustFerry(t, alice, "send", "bob", "before linking")
	mustFerry(t, bob, "recv")

	bob2, code := link(t, srv, bob)
	alice2, _ := link(t, srv, alice)
	if _, errs, exit := ferry(t, bob, "devices", "approve", code); exit != 1 || !strings.Contains(errs, "LINK_CODE_INVALID") {
		t.Fatalf("reused link code: exit %d %q", exit, errs)
	}
	if out := mustFerry(t, bob, "devices", "list"); !strings.Contains(out, "1 ") || !strings.Contains(out, "\n2 ") {
		t.Fatalf("bob's devices: %q", out)
	}

	mustFerry(t, alice, "send", "bob", "after linking")
	for name, home := range map[string]string{"bob": bob, "bob2": bob2, "alice2": alice2} {
		got := parseLines(t, mustFerry(t, home, "recv", "--json"))
		var found *line
		for i := range got {
			if got[i].Text == "after linking" {
				found = &got[i]
			}
		}
		if found == nil || found.Seq != 2 {
			t.Fatalf("%s got %+v, want 'after linking' with seq 2", name, got)
		}
	}
	// The new device has the history from before it was linked.
	h := parseLines(t, mustFerry(t, bob2, "history", "alice", "--json"))
	if len(h) != 2 || h[0].Text != "before linking" || h[0].Seq != 1 || h[1].Text != "after linking" {
		t.Fatalf("bob2's history: %+v", h)
	}
	// alice's second device sees her own message as sent by her.
	h = parseLines(t, mustFerry(t, alice2, "history", "bob", "--json"))
	if len(h) == 0 || h[len(h)-1].Text != "after linking" || !h[len(h)-1].Outgoing {
		t.Fatalf("alice2's history: %+v", h)
	}

	// Unlink bob2: it gets nothing more, and its data is gone from the server.
	mustFerry(t, bob, "devices", "remove", "2")
	mustFerry(t, alice, "send", "bob", "after removal")
	if out, errs, code := ferry(t, bob2, "recv", "--json"); code == 0 || strings.Contains(out, "after removal") {
		t.Fatalf("removed device still receives: exit %d %q %q", code, out, errs)
	}
	got := parseLines(t, mustFerry(t, bob, "recv", "--json"))
	if len(got) != 1 || got[0].Text != "after removal" {
		t.Fatalf("bob got %+v", got)
	}
	srv.term()
	if n := countKeys(t, data, store.DeviceKey([]byte{store.PrefixInbox}, "bob", 2)) +
		countKeys(t, data, store.DeviceKey([]byte{store.PrefixInboxMeta}, "bob", 2)) +
		countKeys(t, data, store.DeviceKey([]byte{store.PrefixKeys, 'o'}, "bob", 2)) +
		countKeys(t, data, store.DeviceKey([]byte{store.PrefixKeys, 's'}, "bob", 2)); n != 0 {
		t.Fatalf("%d keys of the removed device are still stored", n)
	}
}

// countKeys counts keys with a prefix in a stopped server's database.
func countKeys(t *testing.T, data string, prefix []byte) int {
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
	for it.SeekGE(prefix); it.Valid() && strings.HasPrefix(string(it.Key()), string(prefix)); it.Next() {
		n++
	}
	return n
}

// A server that slips a device of its own into an account (here: the test
// edits the store while ferryd is down) cannot get senders to encrypt to
// it: it is not on the account's signed device list.
func TestBlackBoxServerCannotAddDevice(t *testing.T) {
	data := t.TempDir()
	srv := startServer(t, data)
	alice := register(t, srv, "alice")
	register(t, srv, "bob")
	srv.term()

	db, err := store.Open(data, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	d, err := device.New(db, device.Options{}).AddDevice(ctx, "bob", pub, 4242)
	if err != nil {
		t.Fatal(err)
	}
	ident, _ := ecc.GenerateKeyPair()
	spk, _ := ecc.GenerateKeyPair()
	sig := ecc.CalculateSignature(ident.PrivateKey(), spk.PublicKey().Serialize())
	if _, err := keys.New(db, keys.Options{}).Upload(ctx, wire.DeviceAddr{Account: "bob", Device: d.Id}, &wirepb.UploadKeys{
		IdentityKey:  ident.PublicKey().Serialize(),
		SignedPrekey: &wirepb.SignedPreKey{Id: 1, PublicKey: spk.PublicKey().Serialize(), Signature: sig[:]}}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	srv.restart()

	out, errs, code := ferry(t, alice, "send", "bob", "for bob only")
	if code == 0 || !strings.Contains(errs, "not on the account's signed device list") || !strings.Contains(errs, "bob.2") {
		t.Fatalf("send to an account with a server-made device: exit %d, %q %q", code, out, errs)
	}
}

// Link codes: guessed and reused codes are refused with typed errors.
func TestBlackBoxLinkCodes(t *testing.T) {
	srv := startServer(t, t.TempDir())
	bob := register(t, srv, "bob")
	_, errs, code := ferry(t, bob, "devices", "approve", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
	if code != 1 || !strings.Contains(errs, "LINK_CODE_INVALID") {
		t.Fatalf("guessed code: exit %d %q", code, errs)
	}
	if _, errs, code := ferry(t, bob, "devices", "approve", "not-a-code"); code != 1 || !strings.Contains(errs, "not a link code") {
		t.Fatalf("garbage code: exit %d %q", code, errs)
	}
}

// The server (here: the test, editing the store while ferryd is down) adds
// a device to bob's stored signed list without the primary's key: the
// signature no longer verifies and alice refuses the list, and with it the
// send, saying why.
func TestBlackBoxTamperedDeviceListIsRefused(t *testing.T) {
	data := t.TempDir()
	srv := startServer(t, data)
	alice := register(t, srv, "alice")
	register(t, srv, "bob")
	srv.term()

	db, err := store.Open(data, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	key := append([]byte{store.PrefixDeviceList}, "bob"...)
	raw, closer, err := db.Get(key)
	if err != nil {
		t.Fatal(err)
	}
	signed := &wirepb.SignedDeviceList{}
	if err := proto.Unmarshal(raw, signed); err != nil {
		t.Fatal(err)
	}
	closer.Close()
	l := &wirepb.DeviceList{}
	if err := proto.Unmarshal(signed.List, l); err != nil {
		t.Fatal(err)
	}
	fake, _ := ecc.GenerateKeyPair()
	l.Devices = append(l.Devices, &wirepb.DeviceListEntry{DeviceId: 2, IdentityKey: fake.PublicKey().Serialize()})
	if signed.List, err = proto.Marshal(l); err != nil {
		t.Fatal(err)
	}
	b, _ := proto.Marshal(signed)
	if err := db.Set(key, b, nil); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	srv.restart()

	_, errs, code := ferry(t, alice, "send", "bob", "hello?")
	if code == 0 || !strings.Contains(errs, "DEVICE_LIST_INVALID") || !strings.Contains(errs, "signature") {
		t.Fatalf("send with a tampered device list: exit %d, %q", code, errs)
	}
}
