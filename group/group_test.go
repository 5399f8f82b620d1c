package group

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// accounts is a fake account store.
type accounts struct {
	mu    sync.Mutex
	names map[string]bool
	fail  error // returned for every lookup when set
}

func newAccounts(names ...string) *accounts {
	a := &accounts{names: map[string]bool{}}
	for _, n := range names {
		a.names[n] = true
	}
	return a
}

func (a *accounts) Account(_ context.Context, username string) (*storepb.Account, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.fail != nil {
		return nil, a.fail
	}
	if !a.names[username] {
		return nil, &wire.Error{Code: wirepb.ErrorCode_UNKNOWN_ACCOUNT, Message: "device: no such account"}
	}
	return &storepb.Account{Username: username}, nil
}

var t0 = time.UnixMilli(1_700_000_000_000)

func newStore(t *testing.T, o Options, names ...string) (*Store, *pebble.DB) {
	t.Helper()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if o.Now == nil {
		o.Now = func() time.Time { return t0 }
	}
	if len(names) == 0 {
		names = []string{"alice", "bob", "carol", "dave", "erin"}
	}
	return New(db, newAccounts(names...), o), db
}

func ctx() context.Context { return context.Background() }

func code(err error) wirepb.ErrorCode { return wire.CodeOf(err) }

func members(g *storepb.Group) []string {
	out := []string{}
	for _, m := range g.GetMembers() {
		s := m.Username
		if m.Admin {
			s += "*"
		}
		out = append(out, s)
	}
	return out
}

func listIDs(t *testing.T, s *Store, user string) []string {
	t.Helper()
	gs, err := s.ListFor(ctx(), user)
	if err != nil {
		t.Fatal(err)
	}
	out := []string{}
	for _, g := range gs {
		out = append(out, FormatID(g.Id))
	}
	return out
}

var idRE = regexp.MustCompile(`^[0-9a-f]{32}$`)

func TestCreate(t *testing.T) {
	s, _ := newStore(t, Options{})
	g, err := s.Create(ctx(), "carol", "friends", []string{"bob", "alice", "bob", "carol"})
	if err != nil {
		t.Fatal(err)
	}
	id := FormatID(g.Id)
	if !idRE.MatchString(id) || g.Name != "friends" || g.Version != 1 || !g.AdminsOnly || g.ChangedBy != "carol" || g.CreatedMs != t0.UnixMilli() {
		t.Errorf("created %v", g)
	}
	if got := members(g); !slices.Equal(got, []string{"alice", "bob", "carol*"}) {
		t.Errorf("members %q", got)
	}
	got, err := s.Get(ctx(), id)
	if err != nil || !proto.Equal(got, g) {
		t.Errorf("Get = %v, %v; want %v", got, err, g)
	}
	for _, u := range []string{"alice", "bob", "carol"} {
		if ids := listIDs(t, s, u); !slices.Equal(ids, []string{id}) {
			t.Errorf("ListFor(%s) = %v", u, ids)
		}
	}
	if ids := listIDs(t, s, "dave"); len(ids) != 0 {
		t.Errorf("ListFor(dave) = %v", ids)
	}
	// A group of one, and a second group: ids differ, lists grow.
	g2, err := s.Create(ctx(), "alice", "solo", nil)
	if err != nil || bytesEqual(g2.Id, g.Id) || !slices.Equal(members(g2), []string{"alice*"}) {
		t.Fatalf("second group %v, %v", g2, err)
	}
	if ids := listIDs(t, s, "alice"); len(ids) != 2 || !slices.Contains(ids, FormatID(g2.Id)) {
		t.Errorf("ListFor(alice) = %v", ids)
	}
	i := Info(g)
	want := &wirepb.GroupInfo{GroupId: id, Name: "friends", Version: 1, AdminsOnly: true, ChangedBy: "carol",
		Members: []*wirepb.GroupMember{{Username: "alice"}, {Username: "bob"}, {Username: "carol", Admin: true}}}
	if !proto.Equal(i, want) {
		t.Errorf("Info = %v, want %v", i, want)
	}
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

func TestCreateErrors(t *testing.T) {
	s, _ := newStore(t, Options{MaxMembers: 3})
	for _, tc := range []struct {
		name    string
		members []string
		want    wirepb.ErrorCode
	}{
		{"", nil, wirepb.ErrorCode_BAD_REQUEST},
		{strings.Repeat("x", 65), nil, wirepb.ErrorCode_BAD_REQUEST},
		{"bad\xff", nil, wirepb.ErrorCode_BAD_REQUEST},
		{"g", []string{"bob", "zed"}, wirepb.ErrorCode_UNKNOWN_ACCOUNT},
		{"g", []string{"bob", "Bob"}, wirepb.ErrorCode_UNKNOWN_ACCOUNT},
		{"g", []string{"bob", "carol", "dave"}, wirepb.ErrorCode_GROUP_FULL},
	} {
		_, err := s.Create(ctx(), "alice", tc.name, tc.members)
		if code(err) != tc.want {
			t.Errorf("Create(%q, %q) = %v, want %v", tc.name, tc.members, err, tc.want)
		}
		if err != nil && !strings.HasPrefix(err.Error(), "group: ") {
			t.Errorf("error %q lacks the package prefix", err)
		}
	}
	if ids := listIDs(t, s, "alice"); len(ids) != 0 {
		t.Errorf("failed creates stored groups %v", ids)
	}
	// The cap counts distinct members, the creator included.
	if _, err := s.Create(ctx(), "alice", strings.Repeat("x", 64), []string{"bob", "carol", "alice", "bob"}); err != nil {
		t.Errorf("a group at the cap: %v", err)
	}
	// A failing account store is not reported as a missing account.
	a := s.accounts.(*accounts)
	a.fail = &wire.Error{Code: wirepb.ErrorCode_INTERNAL, Message: "device: internal error"}
	if _, err := s.Create(ctx(), "alice", "g", []string{"bob"}); code(err) != wirepb.ErrorCode_INTERNAL {
		t.Errorf("Create with a failing account store = %v", err)
	}
}

func TestGetErrors(t *testing.T) {
	s, _ := newStore(t, Options{})
	for id, want := range map[string]wirepb.ErrorCode{
		"":                                    wirepb.ErrorCode_BAD_REQUEST,
		"0123456789abcdef0123456789abcdeF":    wirepb.ErrorCode_BAD_REQUEST,
		"0123456789abcdef0123456789abcde":     wirepb.ErrorCode_BAD_REQUEST,
		"0123456789abcdef0123456789abcdef0":   wirepb.ErrorCode_BAD_REQUEST,
		"0123456789abcdef0123456789abcdeg":    wirepb.ErrorCode_BAD_REQUEST,
		"0123456789abcdef0123456789abcdef":    wirepb.ErrorCode_UNKNOWN_GROUP,
		"../../../../../../../../etc/passwd1": wirepb.ErrorCode_BAD_REQUEST,
	} {
		if _, err := s.Get(ctx(), id); code(err) != want {
			t.Errorf("Get(%q) = %v, want %v", id, err, want)
		}
	}
}

// change runs Change and fails the test on error.
func change(t *testing.T, s *Store, who string, g *storepb.Group, op wirepb.GroupChange_Op, names ...string) Change {
	t.Helper()
	c, err := s.Change(ctx(), who, FormatID(g.Id), op, names)
	if err != nil {
		t.Fatalf("%s %v %q: %v", who, op, names, err)
	}
	return c
}

func TestChangeRules(t *testing.T) {
	s, _ := newStore(t, Options{MaxMembers: 4})
	g, err := s.Create(ctx(), "alice", "g", []string{"bob"})
	if err != nil {
		t.Fatal(err)
	}
	id := FormatID(g.Id)
	errCases := []struct {
		who   string
		op    wirepb.GroupChange_Op
		names []string
		want  wirepb.ErrorCode
	}{
		{"carol", wirepb.GroupChange_LEAVE, nil, wirepb.ErrorCode_UNKNOWN_GROUP},             // not a member
		{"carol", wirepb.GroupChange_ADD, []string{"carol"}, wirepb.ErrorCode_UNKNOWN_GROUP}, // not revealed
		{"bob", wirepb.GroupChange_ADD, []string{"carol"}, wirepb.ErrorCode_NOT_ADMIN},
		{"bob", wirepb.GroupChange_REMOVE, []string{"alice"}, wirepb.ErrorCode_NOT_ADMIN},
		{"bob", wirepb.GroupChange_ADMIN, []string{"bob"}, wirepb.ErrorCode_NOT_ADMIN},
		{"alice", wirepb.GroupChange_ADD, nil, wirepb.ErrorCode_BAD_REQUEST},
		{"alice", wirepb.GroupChange_OP_UNSPECIFIED, []string{"carol"}, wirepb.ErrorCode_BAD_REQUEST},
		{"alice", wirepb.GroupChange_Op(99), []string{"carol"}, wirepb.ErrorCode_BAD_REQUEST},
		{"alice", wirepb.GroupChange_ADD, []string{"carol", "zed"}, wirepb.ErrorCode_UNKNOWN_ACCOUNT},
		{"alice", wirepb.GroupChange_ADD, []string{"carol", "dave", "erin"}, wirepb.ErrorCode_GROUP_FULL},
		{"alice", wirepb.GroupChange_ADMIN, []string{"carol"}, wirepb.ErrorCode_BAD_REQUEST},   // not a member
		{"alice", wirepb.GroupChange_UNADMIN, []string{"alice"}, wirepb.ErrorCode_BAD_REQUEST}, // last admin
	}
	for _, tc := range errCases {
		if _, err := s.Change(ctx(), tc.who, id, tc.op, tc.names); code(err) != tc.want {
			t.Errorf("%s %v %q = %v, want %v", tc.who, tc.op, tc.names, err, tc.want)
		}
	}
	if _, err := s.Change(ctx(), "alice", "0123456789abcdef0123456789abcdef", wirepb.GroupChange_LEAVE, nil); code(err) != wirepb.ErrorCode_UNKNOWN_GROUP {
		t.Errorf("change of an unknown group = %v", err)
	}
	if _, err := s.Change(ctx(), "alice", "nope", wirepb.GroupChange_LEAVE, nil); code(err) != wirepb.ErrorCode_BAD_REQUEST {
		t.Errorf("change with a bad id = %v", err)
	}
	if got, _ := s.Get(ctx(), id); got.Version != 1 {
		t.Fatalf("failed changes bumped the version to %d", got.Version)
	}

	c := change(t, s, "alice", g, wirepb.GroupChange_ADD, "carol", "dave", "carol", "bob")
	if !c.Changed || c.Group.Version != 2 || c.Group.ChangedBy != "alice" || len(c.Removed) != 0 ||
		!slices.Equal(members(c.Group), []string{"alice*", "bob", "carol", "dave"}) {
		t.Errorf("add: %+v %q", c, members(c.Group))
	}
	if ids := listIDs(t, s, "dave"); !slices.Equal(ids, []string{id}) {
		t.Errorf("ListFor(dave) = %v", ids)
	}
	// Adding members again changes nothing (a retried request).
	if c := change(t, s, "alice", g, wirepb.GroupChange_ADD, "carol"); c.Changed || c.Group.Version != 2 {
		t.Errorf("repeated add: %+v", c)
	}
	c = change(t, s, "alice", g, wirepb.GroupChange_ADMIN, "bob", "alice")
	if !c.Changed || c.Group.Version != 3 || !slices.Equal(members(c.Group), []string{"alice*", "bob*", "carol", "dave"}) {
		t.Errorf("admin: %+v %q", c, members(c.Group))
	}
	c = change(t, s, "bob", g, wirepb.GroupChange_REMOVE, "carol", "erin")
	if !c.Changed || c.Group.Version != 4 || c.Group.ChangedBy != "bob" || !slices.Equal(c.Removed, []string{"carol"}) ||
		!slices.Equal(members(c.Group), []string{"alice*", "bob*", "dave"}) {
		t.Errorf("remove: %+v %q", c, members(c.Group))
	}
	if ids := listIDs(t, s, "carol"); len(ids) != 0 {
		t.Errorf("ListFor(carol) after removal = %v", ids)
	}
	if _, err := s.Change(ctx(), "carol", id, wirepb.GroupChange_LEAVE, nil); code(err) != wirepb.ErrorCode_UNKNOWN_GROUP {
		t.Errorf("a removed member's change = %v", err)
	}
	c = change(t, s, "alice", g, wirepb.GroupChange_UNADMIN, "alice")
	if !slices.Equal(members(c.Group), []string{"alice", "bob*", "dave"}) {
		t.Errorf("unadmin: %q", members(c.Group))
	}
	// A plain member leaves (no admin needed).
	c = change(t, s, "dave", g, wirepb.GroupChange_LEAVE, "ignored")
	if !c.Changed || c.Group.Version != 6 || !slices.Equal(c.Removed, []string{"dave"}) || c.Deleted {
		t.Errorf("leave: %+v", c)
	}
	// The last admin leaves: the lowest remaining username becomes admin.
	c = change(t, s, "bob", g, wirepb.GroupChange_LEAVE)
	if !slices.Equal(members(c.Group), []string{"alice*"}) || c.Group.ChangedBy != "bob" {
		t.Errorf("last admin left: %q", members(c.Group))
	}
	got, err := s.Get(ctx(), id)
	if err != nil || !proto.Equal(got, c.Group) {
		t.Errorf("stored %v, %v; want %v", got, err, c.Group)
	}
	// The last member leaves: the group is gone.
	c = change(t, s, "alice", g, wirepb.GroupChange_LEAVE)
	if !c.Deleted || len(c.Group.Members) != 0 || c.Group.Version != 8 || !slices.Equal(c.Removed, []string{"alice"}) {
		t.Errorf("last member left: %+v", c)
	}
	if _, err := s.Get(ctx(), id); code(err) != wirepb.ErrorCode_UNKNOWN_GROUP {
		t.Errorf("Get of a deleted group = %v", err)
	}
	for _, u := range []string{"alice", "bob", "carol", "dave"} {
		if ids := listIDs(t, s, u); len(ids) != 0 {
			t.Errorf("ListFor(%s) after deletion = %v", u, ids)
		}
	}
}

func TestRemoveLastAdminPromotes(t *testing.T) {
	s, _ := newStore(t, Options{})
	g, err := s.Create(ctx(), "carol", "g", []string{"erin", "dave"})
	if err != nil {
		t.Fatal(err)
	}
	// An admin removing itself (with others) is a leave.
	c := change(t, s, "carol", g, wirepb.GroupChange_REMOVE, "carol", "erin")
	if !slices.Equal(members(c.Group), []string{"dave*"}) || !slices.Equal(c.Removed, []string{"carol", "erin"}) {
		t.Errorf("after removal: %q, removed %q", members(c.Group), c.Removed)
	}
}

func TestNotAdminsOnly(t *testing.T) {
	s, _ := newStore(t, Options{})
	g, err := s.Create(ctx(), "alice", "g", []string{"bob"})
	if err != nil {
		t.Fatal(err)
	}
	if !g.AdminsOnly {
		t.Fatal("a new group is not admins-only")
	}
	if _, err := s.Change(ctx(), "bob", FormatID(g.Id), wirepb.GroupChange_ANY_MEMBER, nil); code(err) != wirepb.ErrorCode_NOT_ADMIN {
		t.Fatalf("a member opened the group: %v", err)
	}
	c := change(t, s, "alice", g, wirepb.GroupChange_ANY_MEMBER)
	if !c.Changed || c.Group.AdminsOnly || c.Group.Version != 2 {
		t.Fatalf("ANY_MEMBER: %+v", c)
	}
	if c := change(t, s, "alice", g, wirepb.GroupChange_ANY_MEMBER); c.Changed {
		t.Fatalf("repeated ANY_MEMBER changed the group: %+v", c)
	}
	c = change(t, s, "bob", g, wirepb.GroupChange_ADD, "carol")
	if !slices.Equal(members(c.Group), []string{"alice*", "bob", "carol"}) {
		t.Errorf("a member's add: %q", members(c.Group))
	}
	// Admins are still made by admins only.
	if _, err := s.Change(ctx(), "bob", FormatID(g.Id), wirepb.GroupChange_ADMIN, []string{"bob"}); code(err) != wirepb.ErrorCode_NOT_ADMIN {
		t.Fatalf("a member made itself admin: %v", err)
	}
	c = change(t, s, "carol", g, wirepb.GroupChange_REMOVE, "alice")
	if !slices.Equal(members(c.Group), []string{"bob*", "carol"}) {
		t.Errorf("a member removed the admin: %q", members(c.Group))
	}
	c = change(t, s, "bob", g, wirepb.GroupChange_ADMINS_ONLY)
	if !c.Changed || !c.Group.AdminsOnly {
		t.Fatalf("ADMINS_ONLY: %+v", c)
	}
	if _, err := s.Change(ctx(), "carol", FormatID(g.Id), wirepb.GroupChange_REMOVE, []string{"bob"}); code(err) != wirepb.ErrorCode_NOT_ADMIN {
		t.Fatalf("a member removed someone from an admins-only group: %v", err)
	}
}

func TestConcurrentChanges(t *testing.T) {
	var names []string
	for i := range 40 {
		names = append(names, fmt.Sprintf("user%02d", i))
	}
	s, _ := newStore(t, Options{}, append(names, "alice")...)
	g, err := s.Create(ctx(), "alice", "g", nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for _, n := range names {
		wg.Go(func() {
			if _, err := s.Change(ctx(), "alice", FormatID(g.Id), wirepb.GroupChange_ADD, []string{n}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	got, err := s.Get(ctx(), FormatID(g.Id))
	if err != nil {
		t.Fatal(err)
	}
	if got.Version != 41 || len(got.Members) != 41 {
		t.Errorf("version %d, %d members; want 41, 41", got.Version, len(got.Members))
	}
	if !slices.IsSortedFunc(got.Members, func(a, b *storepb.GroupMember) int { return strings.Compare(a.Username, b.Username) }) {
		t.Error("members are not sorted")
	}
}

func TestPersisted(t *testing.T) {
	s, db := newStore(t, Options{})
	g, err := s.Create(ctx(), "alice", "g", []string{"bob"})
	if err != nil {
		t.Fatal(err)
	}
	change(t, s, "alice", g, wirepb.GroupChange_ADD, "carol")
	s2 := New(db, newAccounts(), Options{})
	got, err := s2.Get(ctx(), FormatID(g.Id))
	if err != nil || got.Version != 2 || len(got.Members) != 3 {
		t.Errorf("another store on the db reads %v, %v", got, err)
	}
}

func TestContextCanceled(t *testing.T) {
	s, _ := newStore(t, Options{})
	c, cancel := context.WithCancel(ctx())
	cancel()
	if _, err := s.Create(c, "alice", "g", nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Create = %v", err)
	}
	if _, err := s.ListFor(c, "alice"); !errors.Is(err, context.Canceled) {
		t.Errorf("ListFor = %v", err)
	}
}

// With a CommitFunc the store writes nothing itself: a failing commit
// leaves the group as it was, and a good one gets every write of the change.
func TestChangeWithCommit(t *testing.T) {
	s, db := newStore(t, Options{})
	g, err := s.Create(ctx(), "alice", "g", []string{"bob"})
	if err != nil {
		t.Fatal(err)
	}
	id := FormatID(g.Id)
	boom := errors.New("inbox down")
	_, err = s.ChangeWith(ctx(), "alice", id, wirepb.GroupChange_REMOVE, []string{"bob"},
		func(context.Context, *storepb.Group, []string, []store.Write) error { return boom })
	if !errors.Is(err, boom) {
		t.Fatalf("ChangeWith = %v, want the commit's error", err)
	}
	if got, _ := s.Get(ctx(), id); got.Version != 1 || len(got.Members) != 2 {
		t.Fatalf("a failed commit changed the group: %v", got)
	}
	var seen []store.Write
	c, err := s.ChangeWith(ctx(), "alice", id, wirepb.GroupChange_REMOVE, []string{"bob"},
		func(_ context.Context, g *storepb.Group, removed []string, ws []store.Write) error {
			if g.Version != 2 || !slices.Equal(removed, []string{"bob"}) {
				t.Errorf("commit got version %d, removed %v", g.Version, removed)
			}
			seen = ws
			b := db.NewBatch()
			defer b.Close()
			for _, w := range ws {
				if w.Delete {
					b.Delete(w.Key, nil)
				} else {
					b.Set(w.Key, w.Value, nil)
				}
			}
			return b.Commit(pebble.Sync)
		})
	if err != nil || !c.Changed || len(seen) != 2 { // the record and bob's index key
		t.Fatalf("ChangeWith = %+v, %v; writes %d", c, err, len(seen))
	}
	if got, _ := s.Get(ctx(), id); got.Version != 2 || len(got.Members) != 1 {
		t.Fatalf("after the commit: %v", got)
	}
	if ids := listIDs(t, s, "bob"); len(ids) != 0 {
		t.Fatalf("bob still lists the group: %v", ids)
	}
}
