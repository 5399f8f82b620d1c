package localstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func open(t *testing.T) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "device.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

func TestOpen(t *testing.T) {
	ctx := context.Background()
	s, path := open(t)
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file mode: %v %v", fi.Mode(), err)
	}
	for pragma, want := range map[string]string{
		"journal_mode": "wal", "synchronous": "2", "foreign_keys": "1",
		"busy_timeout": fmt.Sprint(BusyTimeout.Milliseconds()), "user_version": fmt.Sprint(SchemaVersion),
	} {
		var got string
		if err := s.db.QueryRowContext(ctx, "PRAGMA "+pragma).Scan(&got); err != nil || got != want {
			t.Errorf("PRAGMA %s = %q (%v), want %q", pragma, got, err, want)
		}
	}
	if s.Path() != path {
		t.Fatal(s.Path())
	}
	// Reopening migrates nothing and keeps the data.
	if err := s.SetSetting(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s2, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if v, ok, err := s2.GetSetting(ctx, "k"); err != nil || !ok || string(v) != "v" {
		t.Fatalf("after reopen: %q %v %v", v, ok, err)
	}
	// A newer schema is refused.
	if _, err := s2.db.ExecContext(ctx, "PRAGMA user_version = 99"); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path); !errors.Is(err, ErrTooNew) {
		t.Fatalf("Open of a newer schema: %v", err)
	}
	if _, err := Open(filepath.Join(t.TempDir(), "a?b")); err == nil {
		t.Fatal("path with '?' accepted")
	}
	if _, err := Open(filepath.Join(t.TempDir(), "missing", "dir", "x.db")); err == nil {
		t.Fatal("path in a missing directory accepted")
	}
}

func TestConcurrentOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "device.db")
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := Open(path)
			if err != nil {
				errs <- err
				return
			}
			errs <- s.Close()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestSettings(t *testing.T) {
	ctx := context.Background()
	s, _ := open(t)
	if v, ok, err := s.GetSetting(ctx, SettingServerURL); err != nil || ok || v != nil {
		t.Fatalf("missing setting: %v %v %v", v, ok, err)
	}
	for _, v := range [][]byte{[]byte("https://x"), {}, nil, {0, 1, 2}} {
		if err := s.SetSetting(ctx, SettingServerURL, v); err != nil {
			t.Fatal(err)
		}
		got, ok, err := s.GetSetting(ctx, SettingServerURL)
		if err != nil || !ok || !bytes.Equal(got, v) || got == nil {
			t.Fatalf("setting %q: got %q %v %v", v, got, ok, err)
		}
	}
	// Returned bytes are the caller's.
	if err := s.SetSetting(ctx, SettingDeviceKey, []byte("secret")); err != nil {
		t.Fatal(err)
	}
	v, _, _ := s.GetSetting(ctx, SettingDeviceKey)
	v[0] = 'X'
	if v2, _, _ := s.GetSetting(ctx, SettingDeviceKey); string(v2) != "secret" {
		t.Fatal("stored value changed through a returned slice")
	}
	if err := s.DeleteSetting(ctx, SettingDeviceKey); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.GetSetting(ctx, SettingDeviceKey); ok {
		t.Fatal("deleted setting still there")
	}
	// Inside a transaction, rolled back.
	errBoom := errors.New("boom")
	err := s.Update(ctx, func(tx *Tx) error {
		if err := tx.SetSetting(ctx, "t", []byte("1")); err != nil {
			return err
		}
		if v, ok, err := tx.GetSetting(ctx, "t"); err != nil || !ok || string(v) != "1" {
			t.Fatalf("in tx: %q %v %v", v, ok, err)
		}
		return errBoom
	})
	if !errors.Is(err, errBoom) {
		t.Fatal(err)
	}
	if _, ok, _ := s.GetSetting(ctx, "t"); ok {
		t.Fatal("rolled back setting is there")
	}
}

func TestHistory(t *testing.T) {
	ctx := context.Background()
	s, _ := open(t)
	at := time.UnixMilli(1700000000123)
	out := Message{Peer: "bob", Sender: "alice", SenderDevice: 1, Seq: 5, ServerTime: at, Text: "hi", ClientMsgID: "c1"}
	id, err := s.AddOutgoing(ctx, out)
	if err != nil || id == 0 {
		t.Fatal(id, err)
	}
	// A retried send is stored once.
	out.Text = "hi (retry)"
	if id2, err := s.AddOutgoing(ctx, out); err != nil || id2 != id {
		t.Fatalf("retry: %d %v (first %d)", id2, err, id)
	}
	// The same client id in another conversation is another message.
	other := out
	other.Peer = "carol"
	if id3, err := s.AddOutgoing(ctx, other); err != nil || id3 == id {
		t.Fatalf("other conversation: %d %v", id3, err)
	}
	for _, bad := range []Message{{Peer: "bob"}, {Peer: "bob", ClientMsgID: "has space"}, {ClientMsgID: "c9"}} {
		if _, err := s.AddOutgoing(ctx, bad); !errors.Is(err, ErrInvalidMessage) {
			t.Fatalf("AddOutgoing(%+v): %v", bad, err)
		}
	}
	// Received messages, one out of seq order, and a failed one.
	in := []Message{
		{Peer: "bob", Sender: "bob", SenderDevice: 2, Seq: 7, Text: "later", ClientMsgID: "b2", EnvelopeID: 11},
		{Peer: "bob", Sender: "bob", SenderDevice: 2, Seq: 3, Text: "earlier", ClientMsgID: "b1", EnvelopeID: 10},
		{Peer: "bob", Sender: "bob", SenderDevice: 2, Seq: 7, ClientMsgID: "b3", EnvelopeID: 1 << 63, Failed: true},
		{Peer: "bob", Sender: "alice", SenderDevice: 3, Seq: 9, Outgoing: true, Text: "sync", ClientMsgID: "c1", EnvelopeID: 12},
	}
	err = s.Update(ctx, func(tx *Tx) error {
		for _, m := range in {
			if seen, err := tx.Seen(ctx, m.EnvelopeID); err != nil || seen {
				return fmt.Errorf("seen before: %v %v", seen, err)
			}
			if _, err := tx.AddReceived(ctx, m); err != nil {
				return err
			}
			if err := tx.MarkSeen(ctx, m.EnvelopeID); err != nil {
				return err
			}
			if err := tx.MarkSeen(ctx, m.EnvelopeID); err != nil { // idempotent
				return err
			}
		}
		_, err := tx.AddReceived(ctx, Message{Peer: "bob"})
		if !errors.Is(err, ErrInvalidMessage) {
			return fmt.Errorf("AddReceived without envelope id: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	h, err := s.History(ctx, "bob", "")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range h {
		got = append(got, fmt.Sprintf("%d:%s", m.Seq, m.ClientMsgID))
	}
	if fmt.Sprint(got) != "[3:b1 5:c1 7:b2 7:b3 9:c1]" {
		t.Fatalf("history order %v", got)
	}
	if m := h[1]; !m.Outgoing || m.Text != "hi" || m.EnvelopeID != 0 || !m.ServerTime.Equal(at) || m.LocalID != id ||
		m.SenderDevice != 1 || m.Sender != "alice" || m.Delivered || m.Failed {
		t.Fatalf("outgoing row %+v", m)
	}
	if m := h[3]; !m.Failed || m.EnvelopeID != 1<<63 || !m.ServerTime.IsZero() {
		t.Fatalf("failed row %+v", m)
	}
	if m, ok, err := s.Message(ctx, h[0].LocalID); err != nil || !ok || m != h[0] {
		t.Fatalf("Message(%d) = %+v %v %v", h[0].LocalID, m, ok, err)
	}
	if _, ok, err := s.Message(ctx, 9999); err != nil || ok {
		t.Fatalf("Message(9999): %v %v", ok, err)
	}
	for _, id := range []uint64{10, 11, 12, 1 << 63} {
		if seen, err := s.Seen(ctx, id); err != nil || !seen {
			t.Fatalf("Seen(%d) = %v %v", id, seen, err)
		}
	}
	if seen, _ := s.Seen(ctx, 13); seen {
		t.Fatal("Seen(13)")
	}
	if h, _ := s.History(ctx, "carol", ""); len(h) != 1 {
		t.Fatalf("carol: %+v", h)
	}
	if h, _ := s.History(ctx, "bob", "g"); len(h) != 0 {
		t.Fatalf("group: %+v", h)
	}

	// ✓✓ marks both outgoing rows with that id (own send and sync copy).
	if ok, err := s.MarkDelivered(ctx, "bob", "c1"); err != nil || !ok {
		t.Fatal(ok, err)
	}
	if ok, err := s.MarkDelivered(ctx, "bob", "c1"); err != nil || ok {
		t.Fatal("second MarkDelivered changed something", err)
	}
	if ok, _ := s.MarkDelivered(ctx, "bob", "b1"); ok {
		t.Fatal("incoming message marked delivered")
	}
	if ok, _ := s.MarkDelivered(ctx, "dave", "c1"); ok {
		t.Fatal("unknown conversation marked delivered")
	}
	h, _ = s.History(ctx, "bob", "")
	for _, m := range h {
		if m.Delivered != (m.ClientMsgID == "c1") {
			t.Fatalf("delivered flag on %+v", m)
		}
	}
	if h, _ := s.History(ctx, "carol", ""); h[0].Delivered {
		t.Fatal("carol's message marked delivered")
	}
}

func TestSignalState(t *testing.T) {
	ctx := context.Background()
	s, path := open(t)
	pub := append([]byte{5}, bytes.Repeat([]byte{1}, 32)...)
	priv := bytes.Repeat([]byte{2}, 32)
	err := s.Update(ctx, func(tx *Tx) error {
		if _, ok, err := tx.LocalIdentity(ctx); err != nil || ok {
			return fmt.Errorf("identity before create: %v %v", ok, err)
		}
		if err := tx.CreateLocalIdentity(ctx, LocalIdentity{pub, priv, 77}); err != nil {
			return err
		}
		if err := tx.CreateLocalIdentity(ctx, LocalIdentity{pub, priv, 78}); !errors.Is(err, ErrExists) {
			return fmt.Errorf("second identity: %v", err)
		}
		// Remote identities: first use, same key, changed key.
		if r, err := tx.SaveRemoteIdentity(ctx, "bob:1", []byte("k1")); err != nil || r != nil {
			return fmt.Errorf("first use: %q %v", r, err)
		}
		if r, err := tx.SaveRemoteIdentity(ctx, "bob:1", []byte("k1")); err != nil || r != nil {
			return fmt.Errorf("same key: %q %v", r, err)
		}
		if r, err := tx.SaveRemoteIdentity(ctx, "bob:1", []byte("k2")); err != nil || string(r) != "k1" {
			return fmt.Errorf("changed key: %q %v", r, err)
		}
		// Sessions.
		for _, d := range []uint32{3, 1, 2} {
			if err := tx.SaveSession(ctx, fmt.Sprintf("bob:%d", d), "bob", d, []byte{byte(d)}); err != nil {
				return err
			}
		}
		if err := tx.SaveSession(ctx, "bobby:1", "bobby", 1, []byte("x")); err != nil {
			return err
		}
		if err := tx.SaveSession(ctx, "bob:2", "bob", 2, []byte("updated")); err != nil {
			return err
		}
		if err := tx.DeleteSession(ctx, "bob:3"); err != nil {
			return err
		}
		// Prekeys.
		for id := uint32(1); id <= 3; id++ {
			if err := tx.SavePreKey(ctx, KeyPair{id, pub, priv}); err != nil {
				return err
			}
		}
		if err := tx.SavePreKey(ctx, KeyPair{0, pub, priv}); err == nil {
			return errors.New("prekey id 0 saved")
		}
		if err := tx.RemovePreKey(ctx, 2); err != nil {
			return err
		}
		if err := tx.SaveSignedPreKey(ctx, SignedKeyPair{KeyPair{1, pub, priv}, bytes.Repeat([]byte{9}, 64), 123}); err != nil {
			return err
		}
		if err := tx.SaveSignedPreKey(ctx, SignedKeyPair{KeyPair{0, pub, priv}, nil, 0}); err == nil {
			return errors.New("signed prekey id 0 saved")
		}
		return tx.SetCounter(ctx, "c", 1<<40)
	})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	err = s.View(ctx, func(tx *Tx) error {
		id, ok, err := tx.LocalIdentity(ctx)
		if err != nil || !ok || !bytes.Equal(id.PublicKey, pub) || !bytes.Equal(id.PrivateKey, priv) || id.RegistrationID != 77 {
			return fmt.Errorf("identity %+v %v %v", id, ok, err)
		}
		id.PublicKey[0] = 0 // must not reach the store
		if k, ok, err := tx.RemoteIdentity(ctx, "bob:1"); err != nil || !ok || string(k) != "k2" {
			return fmt.Errorf("remote identity %q %v %v", k, ok, err)
		}
		if _, ok, _ := tx.RemoteIdentity(ctx, "bob:2"); ok {
			return errors.New("unknown remote identity found")
		}
		if ids, err := tx.SessionDevices(ctx, "bob"); err != nil || fmt.Sprint(ids) != "[1 2]" {
			return fmt.Errorf("session devices %v %v", ids, err)
		}
		if r, ok, err := tx.Session(ctx, "bob:2"); err != nil || !ok || string(r) != "updated" {
			return fmt.Errorf("session %q %v %v", r, ok, err)
		}
		if ok, err := tx.HasSession(ctx, "bob:3"); err != nil || ok {
			return fmt.Errorf("deleted session: %v %v", ok, err)
		}
		if ok, err := tx.HasSession(ctx, "bob:1"); err != nil || !ok {
			return fmt.Errorf("session bob:1: %v %v", ok, err)
		}
		pks, err := tx.PreKeys(ctx)
		if err != nil || len(pks) != 2 || pks[0].ID != 1 || pks[1].ID != 3 {
			return fmt.Errorf("prekeys %+v %v", pks, err)
		}
		if n, err := tx.PreKeyCount(ctx); err != nil || n != 2 {
			return fmt.Errorf("prekey count %d %v", n, err)
		}
		if _, ok, _ := tx.PreKey(ctx, 2); ok {
			return errors.New("removed prekey found")
		}
		if k, ok, err := tx.PreKey(ctx, 3); err != nil || !ok || !bytes.Equal(k.PrivateKey, priv) {
			return fmt.Errorf("prekey 3: %+v %v %v", k, ok, err)
		}
		spk, ok, err := tx.SignedPreKey(ctx, 1)
		if err != nil || !ok || spk.TimestampMs != 123 || len(spk.Signature) != 64 {
			return fmt.Errorf("signed prekey %+v %v %v", spk, ok, err)
		}
		if spks, err := tx.SignedPreKeys(ctx); err != nil || len(spks) != 1 {
			return fmt.Errorf("signed prekeys %+v %v", spks, err)
		}
		if c, err := tx.Counter(ctx, "c"); err != nil || c != 1<<40 {
			return fmt.Errorf("counter %d %v", c, err)
		}
		if c, err := tx.Counter(ctx, "unset"); err != nil || c != 0 {
			return fmt.Errorf("unset counter %d %v", c, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	err = s.Update(ctx, func(tx *Tx) error {
		if id, _, _ := tx.LocalIdentity(ctx); id.PublicKey[0] != 5 {
			return errors.New("identity changed through a returned slice")
		}
		if err := tx.RemoveSignedPreKey(ctx, 1); err != nil {
			return err
		}
		return tx.DeleteAllSessions(ctx)
	})
	if err != nil {
		t.Fatal(err)
	}
	err = s.View(ctx, func(tx *Tx) error {
		if ids, _ := tx.SessionDevices(ctx, "bob"); len(ids) != 0 {
			return fmt.Errorf("sessions left: %v", ids)
		}
		if _, ok, _ := tx.SignedPreKey(ctx, 1); ok {
			return errors.New("signed prekey left")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Two handles on one file (two processes) write at the same time: each
// write transaction waits for the other instead of failing.
func TestConcurrentWriters(t *testing.T) {
	ctx := context.Background()
	a, path := open(t)
	b, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	const n = 100
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for w, s := range []*Store{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range n {
				err := s.Update(ctx, func(tx *Tx) error {
					c, err := tx.Counter(ctx, "n")
					if err != nil {
						return err
					}
					if _, err := tx.AddReceived(ctx, Message{Peer: "p", Seq: c, EnvelopeID: uint64(w*n + i + 1)}); err != nil {
						return err
					}
					return tx.SetCounter(ctx, "n", c+1)
				})
				if err != nil {
					errs <- err
				}
				if _, err := s.AddOutgoing(ctx, Message{Peer: "p", ClientMsgID: fmt.Sprintf("w%d-%d", w, i)}); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	var c uint64
	if err := a.View(ctx, func(tx *Tx) (err error) { c, err = tx.Counter(ctx, "n"); return }); err != nil || c != 2*n {
		t.Fatalf("counter %d (%v): lost updates", c, err)
	}
	if h, _ := b.History(ctx, "p", ""); len(h) != 4*n {
		t.Fatalf("%d rows", len(h))
	}
}

// A message can reach a new device both directly and in its primary's
// history: it is stored once, whichever comes first.
func TestImportHistorySkipsKnownMessages(t *testing.T) {
	ctx := context.Background()
	s, _ := open(t)
	direct := Message{Peer: "alice", Sender: "alice", SenderDevice: 1, Seq: 2, Text: "two", ClientMsgID: "m2", EnvelopeID: 40}
	if err := s.Update(ctx, func(tx *Tx) error { _, err := tx.AddReceived(ctx, direct); return err }); err != nil {
		t.Fatal(err)
	}
	hist := []Message{
		{Peer: "alice", Sender: "alice", SenderDevice: 1, Seq: 1, Text: "one", ClientMsgID: "m1"},
		{Peer: "alice", Sender: "alice", SenderDevice: 1, Seq: 2, Text: "two", ClientMsgID: "m2"},
		{Peer: "alice", Sender: "bob", SenderDevice: 1, Seq: 3, Outgoing: true, Text: "three", ClientMsgID: "m3"},
	}
	var n int
	if err := s.Update(ctx, func(tx *Tx) (err error) { n, err = tx.ImportHistory(ctx, hist); return err }); err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Fatalf("imported %d, want 2 (m2 was there)", n)
	}
	// Importing again adds nothing; a later direct copy adds nothing either.
	if err := s.Update(ctx, func(tx *Tx) (err error) { n, err = tx.ImportHistory(ctx, hist); return err }); err != nil || n != 0 {
		t.Fatalf("second import: %d %v", n, err)
	}
	late := Message{Peer: "alice", Sender: "alice", SenderDevice: 1, Seq: 1, Text: "one", ClientMsgID: "m1", EnvelopeID: 41}
	if err := s.Update(ctx, func(tx *Tx) error { _, err := tx.AddReceived(ctx, late); return err }); err != nil {
		t.Fatal(err)
	}
	h, err := s.History(ctx, "alice", "")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range h {
		got = append(got, fmt.Sprintf("%d:%s", m.Seq, m.Text))
	}
	if fmt.Sprint(got) != "[1:one 2:two 3:three]" {
		t.Fatalf("history %v", got)
	}
}

// Receipt markers mark every own message up to a seq, per conversation.
func TestMarkUpTo(t *testing.T) {
	ctx := context.Background()
	s, _ := open(t)
	for i, peer := range []string{"bob", "bob", "bob", "carol"} {
		if _, err := s.AddOutgoing(ctx, Message{Peer: peer, Sender: "alice", SenderDevice: 1, Seq: uint64(i + 1),
			Text: "x", ClientMsgID: fmt.Sprint("m", i)}); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := s.MarkUpTo(ctx, "bob", "", 2, false); err != nil || n != 2 {
		t.Fatalf("delivered up to 2: %d %v", n, err)
	}
	if n, _ := s.MarkUpTo(ctx, "bob", "", 2, false); n != 0 {
		t.Fatalf("marking again changed %d rows", n)
	}
	if n, _ := s.MarkUpTo(ctx, "bob", "", 3, true); n != 3 {
		t.Fatalf("read up to 3 changed %d rows, want 3", n)
	}
	h, _ := s.History(ctx, "bob", "")
	for _, m := range h {
		if !m.Delivered || !m.Read {
			t.Fatalf("%+v not delivered and read", m)
		}
	}
	if h, _ := s.History(ctx, "carol", ""); h[0].Delivered {
		t.Fatal("a marker for bob marked carol's conversation")
	}
}
