package localstore

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/ferryhq/ferry/wire/wirepb"
)

func groupInfo(id, name string, version uint64, members ...string) *wirepb.GroupInfo {
	g := &wirepb.GroupInfo{GroupId: id, Name: name, Version: version, AdminsOnly: true}
	for _, m := range members {
		g.Members = append(g.Members, &wirepb.GroupMember{Username: m,
			Devices: []*wirepb.GroupDevice{{DeviceId: 1, RegistrationId: 7}}})
	}
	return g
}

func TestGroups(t *testing.T) {
	ctx := context.Background()
	s, path := open(t)
	if _, ok, err := s.Group(ctx, "g1"); err != nil || ok {
		t.Fatalf("unknown group: %v %v", ok, err)
	}
	if err := s.SaveGroup(ctx, nil); !errors.Is(err, ErrInvalidGroup) {
		t.Fatal(err)
	}
	if err := s.SaveGroup(ctx, &wirepb.GroupInfo{Name: "x"}); !errors.Is(err, ErrInvalidGroup) {
		t.Fatal(err)
	}
	g1 := groupInfo("g1", "family", 2, "alice", "bob")
	if err := s.SaveGroup(ctx, g1); err != nil {
		t.Fatal(err)
	}
	got, ok, err := s.Group(ctx, "g1")
	if err != nil || !ok || !proto.Equal(got, g1) {
		t.Fatalf("Group: %v %v %v", got, ok, err)
	}
	got.Name = "changed" // a fresh copy
	if again, _, _ := s.Group(ctx, "g1"); again.Name != "family" {
		t.Fatal("stored group changed through a returned value")
	}
	// An older version is ignored; the same or a newer one replaces it.
	if err := s.SaveGroup(ctx, groupInfo("g1", "family", 1, "alice")); err != nil {
		t.Fatal(err)
	}
	if got, _, _ := s.Group(ctx, "g1"); got.Version != 2 || len(got.Members) != 2 {
		t.Fatalf("older version replaced the group: %v", got)
	}
	if err := s.SaveGroup(ctx, groupInfo("g1", "family", 3, "alice", "bob", "carol")); err != nil {
		t.Fatal(err)
	}
	if got, _, _ := s.Group(ctx, "g1"); got.Version != 3 || len(got.Members) != 3 {
		t.Fatalf("newer version not saved: %v", got)
	}

	// By name.
	if g, ok, err := s.GroupByName(ctx, "family"); err != nil || !ok || g.GroupId != "g1" {
		t.Fatalf("GroupByName: %v %v %v", g, ok, err)
	}
	if g, ok, err := s.GroupByName(ctx, "nope"); err != nil || ok || g != nil {
		t.Fatal(g, ok, err)
	}
	time.Sleep(2 * time.Millisecond) // updated_ms orders the ids in the error
	if err := s.SaveGroup(ctx, groupInfo("g2", "family", 1, "alice")); err != nil {
		t.Fatal(err)
	}
	if err := s.SaveGroup(ctx, groupInfo("g0", "work", 1, "alice")); err != nil {
		t.Fatal(err)
	}
	_, ok, err = s.GroupByName(ctx, "family")
	if ok || !errors.Is(err, ErrAmbiguousGroupName) || !strings.Contains(err.Error(), "g2, g1") {
		t.Fatalf("ambiguous name: %v", err)
	}
	all, err := s.Groups(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, g := range all {
		ids = append(ids, g.GroupId)
	}
	if fmt.Sprint(ids) != "[g1 g2 g0]" {
		t.Fatalf("Groups order %v", ids)
	}

	// Distribution set.
	if d, err := s.Distributed(ctx, "g1"); err != nil || d != nil {
		t.Fatalf("fresh distribution %v %v", d, err)
	}
	if err := s.MarkDistributed(ctx, "g1", []string{"bob.2", "bob.1", ""}); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkDistributed(ctx, "g1", []string{"carol.1", "bob.1"}); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Distributed(ctx, "g1"); fmt.Sprint(d) != "[bob.1 bob.2 carol.1]" {
		t.Fatalf("distributed %v", d)
	}
	if err := s.UnmarkDistributed(ctx, "g1", []string{"bob.2", "dave.1"}); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Distributed(ctx, "g1"); fmt.Sprint(d) != "[bob.1 carol.1]" {
		t.Fatalf("after unmark %v", d)
	}
	// A membership update keeps the set.
	if err := s.SaveGroup(ctx, groupInfo("g1", "family", 4, "alice", "bob", "carol")); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Distributed(ctx, "g1"); fmt.Sprint(d) != "[bob.1 carol.1]" {
		t.Fatalf("after SaveGroup %v", d)
	}
	if err := s.MarkDistributed(ctx, "nope", []string{"bob.1"}); !errors.Is(err, ErrNoGroup) {
		t.Fatal(err)
	}
	if err := s.UnmarkDistributed(ctx, "nope", []string{"bob.1"}); !errors.Is(err, ErrNoGroup) {
		t.Fatal(err)
	}
	if err := s.ResetDistributed(ctx, "nope"); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Distributed(ctx, "g2"); d != nil {
		t.Fatalf("other group's distribution %v", d)
	}

	// Persistence.
	s.Close()
	s, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if d, _ := s.Distributed(ctx, "g1"); fmt.Sprint(d) != "[bob.1 carol.1]" {
		t.Fatalf("after reopen %v", d)
	}
	if err := s.ResetDistributed(ctx, "g1"); err != nil {
		t.Fatal(err)
	}
	if d, err := s.Distributed(ctx, "g1"); err != nil || d != nil {
		t.Fatalf("after reset %v %v", d, err)
	}
	// In a transaction, rolled back.
	errBoom := errors.New("boom")
	err = s.Update(ctx, func(tx *Tx) error {
		if err := tx.MarkDistributed(ctx, "g1", []string{"x.1"}); err != nil {
			return err
		}
		if d, _ := tx.Distributed(ctx, "g1"); fmt.Sprint(d) != "[x.1]" {
			return fmt.Errorf("in tx: %v", d)
		}
		if err := tx.DeleteGroup(ctx, "g1"); err != nil {
			return err
		}
		if _, ok, _ := tx.Group(ctx, "g1"); ok {
			return errors.New("deleted group in tx")
		}
		return errBoom
	})
	if !errors.Is(err, errBoom) {
		t.Fatal(err)
	}
	if _, ok, _ := s.Group(ctx, "g1"); !ok {
		t.Fatal("rolled-back delete took effect")
	}
	if d, _ := s.Distributed(ctx, "g1"); d != nil {
		t.Fatalf("rolled-back mark took effect: %v", d)
	}
	if err := s.DeleteGroup(ctx, "g1"); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.Group(ctx, "g1"); ok {
		t.Fatal("deleted group still there")
	}
	if g, ok, err := s.GroupByName(ctx, "family"); err != nil || !ok || g.GroupId != "g2" {
		t.Fatalf("GroupByName after delete: %v %v %v", g, ok, err)
	}
}

func TestSenderKeys(t *testing.T) {
	ctx := context.Background()
	s, path := open(t)
	err := s.Update(ctx, func(tx *Tx) error {
		if _, ok, err := tx.SenderKey(ctx, "g", "bob:1"); err != nil || ok {
			return fmt.Errorf("missing key: %v %v", ok, err)
		}
		if err := tx.SaveSenderKey(ctx, "", "bob:1", []byte("r")); err == nil {
			return errors.New("sender key without a group saved")
		}
		for _, k := range []struct{ g, s, r string }{
			{"g", "bob:1", "b1"}, {"g", "bob:2", "b2"}, {"g", OwnSenderKey, "own"}, {"h", "bob:1", "h1"},
		} {
			if err := tx.SaveSenderKey(ctx, k.g, k.s, []byte(k.r)); err != nil {
				return err
			}
		}
		return tx.SaveSenderKey(ctx, "g", "bob:2", []byte("b2'"))
	})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if s, err = Open(path); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	err = s.Update(ctx, func(tx *Tx) error {
		r, ok, err := tx.SenderKey(ctx, "g", "bob:2")
		if err != nil || !ok || string(r) != "b2'" {
			return fmt.Errorf("bob:2 %q %v %v", r, ok, err)
		}
		r[0] = 'X'
		if r, _, _ := tx.SenderKey(ctx, "g", "bob:2"); string(r) != "b2'" {
			return errors.New("record changed through a returned slice")
		}
		if r, ok, _ := tx.SenderKey(ctx, "g", OwnSenderKey); !ok || string(r) != "own" {
			return fmt.Errorf("own key %q", r)
		}
		if ss, err := tx.SenderKeySenders(ctx, "g"); err != nil || fmt.Sprintf("%q", ss) != `["" "bob:1" "bob:2"]` {
			return fmt.Errorf("senders %q %v", ss, err)
		}
		if err := tx.DeleteSenderKey(ctx, "g", "bob:1"); err != nil {
			return err
		}
		if ss, _ := tx.SenderKeySenders(ctx, "g"); len(ss) != 2 {
			return fmt.Errorf("after delete: %q", ss)
		}
		if err := tx.DeleteSenderKeys(ctx, "g"); err != nil {
			return err
		}
		if ss, _ := tx.SenderKeySenders(ctx, "g"); len(ss) != 0 {
			return fmt.Errorf("after delete all: %q", ss)
		}
		if r, ok, _ := tx.SenderKey(ctx, "h", "bob:1"); !ok || string(r) != "h1" {
			return errors.New("other group's key deleted")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestGroupHistory(t *testing.T) {
	ctx := context.Background()
	s, _ := open(t)
	err := s.Update(ctx, func(tx *Tx) error {
		for i, seq := range []uint64{3, 1, 2} {
			m := Message{Group: "g", Sender: "bob", SenderDevice: 1, Seq: seq, Text: fmt.Sprint(seq),
				ClientMsgID: fmt.Sprintf("m%d", seq), EnvelopeID: uint64(i + 1)}
			if _, err := tx.AddReceived(ctx, m); err != nil {
				return err
			}
		}
		// A 1:1 message with bob is not in the group.
		_, err := tx.AddReceived(ctx, Message{Peer: "bob", Sender: "bob", SenderDevice: 1, Seq: 1, Text: "dm", EnvelopeID: 9})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.AddOutgoing(ctx, Message{Group: "g", Sender: "alice", SenderDevice: 1, Seq: 4, Text: "4", ClientMsgID: "o4"}); err != nil {
		t.Fatal(err)
	}
	for _, peer := range []string{"", "bob", "g"} { // peer is ignored for a group
		h, err := s.History(ctx, peer, "g")
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, m := range h {
			got = append(got, m.Text)
		}
		if fmt.Sprint(got) != "[1 2 3 4]" || h[0].Peer != "" || h[0].Group != "g" || !h[3].Outgoing {
			t.Fatalf("group history with peer %q: %v", peer, got)
		}
	}
	if h, _ := s.History(ctx, "bob", ""); len(h) != 1 || h[0].Text != "dm" {
		t.Fatalf("1:1 history %+v", h)
	}
	if c, _ := s.Conversations(ctx); fmt.Sprint(c) != "[bob]" {
		t.Fatalf("conversations %v", c)
	}
}

// A file written by schema version 1 (before groups) migrates to version 2
// and keeps its data.
func TestMigrateFromV1(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "device.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		migrations[0],
		`PRAGMA user_version = 1`,
		`INSERT INTO settings(key, value) VALUES('username', 'alice')`,
		`INSERT INTO sessions(address, account, device_id, record, updated_ms) VALUES('bob:1', 'bob', 1, x'0102', 5)`,
		`INSERT INTO messages(peer, grp, outgoing, sender, sender_device, seq, server_time_ms, text, client_msg_id, envelope_id)
		 VALUES('bob', '', 0, 'bob', 1, 1, 0, 'old', 'c1', 1)`,
		`INSERT INTO seen(envelope_id, seen_ms) VALUES(1, 5)`,
	} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()

	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var v int
	if err := s.db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil || v != SchemaVersion {
		t.Fatalf("user_version %d %v", v, err)
	}
	if u, _, _ := s.GetSetting(ctx, SettingUsername); string(u) != "alice" {
		t.Fatalf("setting %q", u)
	}
	if h, _ := s.History(ctx, "bob", ""); len(h) != 1 || h[0].Text != "old" {
		t.Fatalf("history %+v", h)
	}
	if seen, _ := s.Seen(ctx, 1); !seen {
		t.Fatal("seen mark lost")
	}
	err = s.Update(ctx, func(tx *Tx) error {
		if r, ok, err := tx.Session(ctx, "bob:1"); err != nil || !ok || !bytes.Equal(r, []byte{1, 2}) {
			return fmt.Errorf("session %x %v %v", r, ok, err)
		}
		if err := tx.SaveSenderKey(ctx, "g", "bob:1", []byte("r")); err != nil {
			return err
		}
		return tx.SaveGroup(ctx, groupInfo("g", "n", 1, "alice", "bob"))
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.MarkDistributed(ctx, "g", []string{"bob.1"}); err != nil {
		t.Fatal(err)
	}
	// Opening again migrates nothing.
	s2, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if d, _ := s2.Distributed(ctx, "g"); fmt.Sprint(d) != "[bob.1]" {
		t.Fatalf("distributed %v", d)
	}
}
