// Package group keeps the membership of Ferry's groups: who is in a group,
// who is an admin, and the membership version that group sends are checked
// against. The server keeps it because it fans group messages out; it never
// sees what members say (sender-key ciphertext goes through package inbox).
//
// Keys (package store documents the whole key space):
//
//	'g' 'r' group_id(16)                  storepb.Group
//	'g' 'u' username 0x00 group_id(16)    empty: a member's groups, so listing them is a prefix scan
//
// A group's devices are not stored: callers derive them from the accounts
// whenever they build a wirepb.GroupInfo. Every change is one synced batch
// (the record and the index keys it changes), made under a per-group lock,
// so concurrent changes to one group are serialized and each bumps the
// version by one (within one process; in cluster mode a group needs one
// owner, like an account's shard).
package group

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"slices"
	"sort"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// Limits.
const (
	// IDSize is the length of a group id in bytes; on the wire it is
	// 2*IDSize lowercase hex characters.
	IDSize = 16
	// MaxNameBytes is the longest group name.
	MaxNameBytes = 64
	// DefaultMaxMembers is the default of Options.MaxMembers.
	DefaultMaxMembers = 1024
)

// Key sub-prefixes under store.PrefixGroup.
const (
	subRecord = 'r'
	subMember = 'u'
)

// Accounts is what the store needs of the account store: that members exist.
type Accounts interface {
	// Account returns the account or an error with code UNKNOWN_ACCOUNT.
	Account(ctx context.Context, username string) (*storepb.Account, error)
}

// Options configure a Store. The zero value is ready to use.
type Options struct {
	// MaxMembers is the most members a group may have; 0 means
	// DefaultMaxMembers.
	MaxMembers int
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Rand is the source of group ids; nil means crypto/rand.
	Rand io.Reader
	// AcceptID, if set, says whether a random id may be a new group's
	// (cluster mode: only ids on the creator's shard, so a group is created
	// on the node that serves its creator). Ids are drawn until it agrees.
	AcceptID func(creator string, id [IDSize]byte) bool
}

// Store is the group membership store. It is safe for concurrent use.
type Store struct {
	db       *pebble.DB
	accounts Accounts
	o        Options
	seed     maphash.Seed
	locks    [64]sync.Mutex // striped by group id
}

// New returns a Store over db, which it reads and writes only under
// store.PrefixGroup. accounts checks that members exist.
func New(db *pebble.DB, accounts Accounts, o Options) *Store {
	if o.MaxMembers <= 0 {
		o.MaxMembers = DefaultMaxMembers
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Rand == nil {
		o.Rand = rand.Reader
	}
	return &Store{db: db, accounts: accounts, o: o, seed: maphash.MakeSeed()}
}

// MaxMembers is the group size cap.
func (s *Store) MaxMembers() int { return s.o.MaxMembers }

// ParseID decodes a group id as clients send it: exactly 32 lowercase hex
// characters. Anything else is ErrBadRequest.
func ParseID(id string) ([IDSize]byte, error) {
	var out [IDSize]byte
	if len(id) != 2*IDSize {
		return out, errf(ErrBadRequest, "a group id is %d hex characters, not %d bytes", 2*IDSize, len(id))
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return out, errf(ErrBadRequest, "a group id is lowercase hex (byte %d is not)", i)
		}
	}
	if _, err := hex.Decode(out[:], []byte(id)); err != nil {
		return out, errf(ErrBadRequest, "a group id is lowercase hex")
	}
	return out, nil
}

// FormatID encodes a group id for the wire.
func FormatID(id []byte) string { return hex.EncodeToString(id) }

// ValidateName checks a group name: 1..MaxNameBytes bytes of UTF-8.
func ValidateName(name string) error {
	if len(name) == 0 || len(name) > MaxNameBytes {
		return errf(ErrBadRequest, "a group name is 1 to %d bytes, not %d", MaxNameBytes, len(name))
	}
	if !utf8.ValidString(name) {
		return errf(ErrBadRequest, "a group name is UTF-8")
	}
	return nil
}

// Member returns username's membership of g, or nil.
func Member(g *storepb.Group, username string) *storepb.GroupMember {
	i, ok := slices.BinarySearchFunc(g.GetMembers(), username, func(m *storepb.GroupMember, u string) int {
		switch {
		case m.Username < u:
			return -1
		case m.Username > u:
			return 1
		}
		return 0
	})
	if !ok {
		return nil
	}
	return g.Members[i]
}

// Info converts a record to the wire form, without devices (the caller
// adds them from the accounts).
func Info(g *storepb.Group) *wirepb.GroupInfo {
	info := &wirepb.GroupInfo{GroupId: FormatID(g.Id), Name: g.Name, Version: g.Version,
		AdminsOnly: g.AdminsOnly, ChangedBy: g.ChangedBy, Members: make([]*wirepb.GroupMember, len(g.Members))}
	for i, m := range g.Members {
		info.Members[i] = &wirepb.GroupMember{Username: m.Username, Admin: m.Admin}
	}
	return info
}

// Create makes a group named name with creator as its first admin and the
// other members, in one synced write, and returns it (version 1, admins
// only). Members are deduplicated (the creator may be named too); each must
// have an account (ErrUnknownAccount); with the creator there may be at
// most MaxMembers (ErrGroupFull). A bad name is ErrBadRequest.
func (s *Store) Create(ctx context.Context, creator, name string, members []string) (*storepb.Group, error) {
	return s.CreateWith(ctx, creator, name, members, nil)
}

// CommitFunc commits a change's writes (with whatever else must be atomic
// with it) in one synced batch, given the group after the change and the
// members it removed. Store calls it with the group's lock held; if it
// fails, nothing of the change is stored.
type CommitFunc func(ctx context.Context, g *storepb.Group, removed []string, writes []store.Write) error

// CreateWith is Create with the writes committed by commit (nil: the
// store's own synced batch).
func (s *Store) CreateWith(ctx context.Context, creator, name string, members []string, commit CommitFunc) (*storepb.Group, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("group: create: %w", err)
	}
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	names := dedup(append([]string{creator}, members...))
	if len(names) > s.o.MaxMembers {
		return nil, errf(ErrGroupFull, "a group has at most %d members, not %d", s.o.MaxMembers, len(names))
	}
	if err := s.checkAccounts(ctx, names); err != nil {
		return nil, err
	}
	g := &storepb.Group{Name: name, Version: 1, AdminsOnly: true, ChangedBy: creator, CreatedMs: s.o.Now().UnixMilli()}
	for _, n := range names { // dedup sorted them
		g.Members = append(g.Members, &storepb.GroupMember{Username: n, Admin: n == creator})
	}
	var id [IDSize]byte
	for {
		if _, err := io.ReadFull(s.o.Rand, id[:]); err != nil {
			return nil, fmt.Errorf("group: create: new id: %w: %w", fresh(ErrInternal), err)
		}
		if s.o.AcceptID != nil && !s.o.AcceptID(creator, id) {
			continue
		}
		// 128 random bits do not collide; checking costs one read.
		if _, err := s.load(id); errors.Is(err, ErrUnknownGroup) {
			break
		} else if err != nil {
			return nil, err
		}
	}
	g.Id = id[:]
	mu := s.lock(id)
	mu.Lock()
	defer mu.Unlock()
	if err := s.write(ctx, g, names, nil, false, commit); err != nil {
		return nil, fmt.Errorf("group: create: %w", err)
	}
	return g, nil
}

// Get returns group id, or ErrUnknownGroup (ErrBadRequest for a malformed
// id). Whether the asker may see it (is a member) is the caller's check.
func (s *Store) Get(ctx context.Context, id string) (*storepb.Group, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("group: get: %w", err)
	}
	gid, err := ParseID(id)
	if err != nil {
		return nil, err
	}
	return s.load(gid)
}

// Change is the outcome of Store.Change.
type Change struct {
	// Group is the group after the change. When the last member left it is
	// deleted: then Group has no members (and the next version).
	Group *storepb.Group
	// Removed are the members the change removed (REMOVE, LEAVE), ascending.
	Removed []string
	// Changed is false when there was nothing to do (adding a member, making
	// an admin, removing a non-member again): nothing was written and the
	// version stays.
	Changed bool
	// Deleted: nobody is left and the group is gone.
	Deleted bool
}

// Change applies op by requester to group id, in one synced write under the
// group's lock, and bumps the version by one:
//   - ADD: members join (each needs an account: ErrUnknownAccount; the
//     group may not exceed MaxMembers: ErrGroupFull); members already in
//     are ignored.
//   - REMOVE: members leave; non-members are ignored.
//   - LEAVE: the requester leaves (members is ignored).
//   - ADMIN, UNADMIN: members (who must be members: ErrBadRequest) become
//     or stop being admins. The last admin cannot be demoted (ErrBadRequest).
//   - ADMINS_ONLY, ANY_MEMBER: from now on only admins, or every member, may
//     ADD and REMOVE (members is ignored). New groups are admins-only.
//
// The requester must be a member (ErrUnknownGroup, as for a group that does
// not exist); ADD and REMOVE in an admins-only group, and ADMIN, UNADMIN,
// ADMINS_ONLY and ANY_MEMBER in every group, need an admin (ErrNotAdmin). If the last admin goes and members remain, the member with
// the lowest username becomes admin; if nobody remains, the group is
// deleted.
func (s *Store) Change(ctx context.Context, requester, id string, op wirepb.GroupChange_Op, members []string) (Change, error) {
	return s.ChangeWith(ctx, requester, id, op, members, nil)
}

// ChangeWith is Change with the writes committed by commit (nil: the
// store's own synced batch). commit is not called for a change that changes
// nothing.
func (s *Store) ChangeWith(ctx context.Context, requester, id string, op wirepb.GroupChange_Op, members []string, commit CommitFunc) (Change, error) {
	if err := ctx.Err(); err != nil {
		return Change{}, fmt.Errorf("group: change: %w", err)
	}
	gid, err := ParseID(id)
	if err != nil {
		return Change{}, err
	}
	switch op {
	case wirepb.GroupChange_ADD, wirepb.GroupChange_REMOVE, wirepb.GroupChange_ADMIN, wirepb.GroupChange_UNADMIN:
		if len(members) == 0 {
			return Change{}, errf(ErrBadRequest, "%v names no members", op)
		}
	case wirepb.GroupChange_LEAVE:
		members = []string{requester}
	case wirepb.GroupChange_ADMINS_ONLY, wirepb.GroupChange_ANY_MEMBER:
		members = nil
	default:
		return Change{}, errf(ErrBadRequest, "unknown group change %d", op)
	}
	names := dedup(members)
	if len(names) > s.o.MaxMembers {
		return Change{}, errf(ErrGroupFull, "a group has at most %d members", s.o.MaxMembers)
	}

	mu := s.lock(gid)
	mu.Lock()
	defer mu.Unlock()
	g, err := s.load(gid)
	if err != nil {
		return Change{}, err
	}
	me := Member(g, requester)
	if me == nil {
		return Change{}, fresh(ErrUnknownGroup)
	}
	switch {
	case me.Admin || op == wirepb.GroupChange_LEAVE:
	case op == wirepb.GroupChange_ADD || op == wirepb.GroupChange_REMOVE:
		if g.AdminsOnly {
			return Change{}, errf(ErrNotAdmin, "only admins may change this group's members")
		}
	default:
		return Change{}, errf(ErrNotAdmin, "only admins may change admins and who may change members")
	}
	next := proto.CloneOf(g)
	var added, removed []string
	changed := false
	switch op {
	case wirepb.GroupChange_ADD:
		for _, n := range names {
			if Member(g, n) == nil {
				added = append(added, n)
			}
		}
		if len(g.Members)+len(added) > s.o.MaxMembers {
			return Change{}, errf(ErrGroupFull, "the group has %d members; %d more would be over the cap of %d",
				len(g.Members), len(added), s.o.MaxMembers)
		}
		if err := s.checkAccounts(ctx, added); err != nil {
			return Change{}, err
		}
		for _, n := range added {
			next.Members = append(next.Members, &storepb.GroupMember{Username: n})
		}
		sortMembers(next.Members)
		changed = len(added) > 0
	case wirepb.GroupChange_REMOVE, wirepb.GroupChange_LEAVE:
		gone := make(map[string]bool, len(names))
		for _, n := range names {
			if Member(g, n) != nil {
				gone[n] = true
				removed = append(removed, n)
			}
		}
		next.Members = slices.DeleteFunc(next.Members, func(m *storepb.GroupMember) bool { return gone[m.Username] })
		changed = len(removed) > 0
	case wirepb.GroupChange_ADMIN, wirepb.GroupChange_UNADMIN:
		admin := op == wirepb.GroupChange_ADMIN
		for _, n := range names {
			m := Member(next, n)
			if m == nil {
				return Change{}, errf(ErrBadRequest, "%q is not a member", n)
			}
			if m.Admin != admin {
				m.Admin, changed = admin, true
			}
		}
		if !hasAdmin(next) {
			return Change{}, errf(ErrBadRequest, "a group keeps at least one admin")
		}
	case wirepb.GroupChange_ADMINS_ONLY, wirepb.GroupChange_ANY_MEMBER:
		next.AdminsOnly = op == wirepb.GroupChange_ADMINS_ONLY
		changed = next.AdminsOnly != g.AdminsOnly
	}
	if !changed {
		return Change{Group: g}, nil
	}
	if len(next.Members) > 0 && !hasAdmin(next) {
		next.Members[0].Admin = true // the lowest username
	}
	next.Version++
	next.ChangedBy = requester
	deleted := len(next.Members) == 0
	if err := s.write(ctx, next, added, removed, deleted, commit); err != nil {
		return Change{}, fmt.Errorf("group: change: %w", err)
	}
	return Change{Group: next, Removed: removed, Changed: true, Deleted: deleted}, nil
}

// ListFor returns every group username is a member of, by id.
func (s *Store) ListFor(ctx context.Context, username string) ([]*storepb.Group, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("group: list: %w", err)
	}
	p := memberPrefix(username)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
	if err != nil {
		return nil, internal("list groups", err)
	}
	defer it.Close()
	var out []*storepb.Group
	for ok := it.First(); ok; ok = it.Next() {
		k := it.Key()
		if len(k) != len(p)+IDSize {
			continue
		}
		g, err := s.load([IDSize]byte(k[len(p):]))
		if errors.Is(err, ErrUnknownGroup) {
			continue // an index key whose group went meanwhile
		}
		if err != nil {
			return nil, err
		}
		if Member(g, username) != nil {
			out = append(out, g)
		}
	}
	if err := it.Error(); err != nil {
		return nil, internal("list groups", err)
	}
	return out, nil
}

// checkAccounts checks that every name has an account.
func (s *Store) checkAccounts(ctx context.Context, names []string) error {
	for _, n := range names {
		if _, err := s.accounts.Account(ctx, n); err != nil {
			if wire.CodeOf(err) == wirepb.ErrorCode_UNKNOWN_ACCOUNT {
				return errf(ErrUnknownAccount, "no account %q", n)
			}
			return err
		}
	}
	return nil
}

// write stores g (or deletes it) with its index changes in one synced
// batch: its own, or commit's.
func (s *Store) write(ctx context.Context, g *storepb.Group, added, removed []string, deleted bool, commit CommitFunc) error {
	id := [IDSize]byte(g.Id)
	var ws []store.Write
	if deleted {
		ws = append(ws, store.Write{Key: recordKey(id), Delete: true})
	} else {
		v, err := (proto.MarshalOptions{Deterministic: true}).Marshal(g)
		if err != nil {
			return internal("encode group", err)
		}
		ws = append(ws, store.Write{Key: recordKey(id), Value: v})
	}
	for _, n := range added {
		ws = append(ws, store.Write{Key: memberKey(n, id), Value: []byte{}})
	}
	for _, n := range removed {
		ws = append(ws, store.Write{Key: memberKey(n, id), Delete: true})
	}
	if commit != nil {
		return commit(ctx, g, removed, ws)
	}
	b := s.db.NewBatch()
	defer b.Close()
	var err error
	for _, w := range ws {
		if w.Delete {
			err = errors.Join(err, b.Delete(w.Key, nil))
		} else {
			err = errors.Join(err, b.Set(w.Key, w.Value, nil))
		}
	}
	if err == nil {
		err = b.Commit(pebble.Sync)
	}
	if err != nil {
		return internal("write group", err)
	}
	return nil
}

// load reads a group record: ErrUnknownGroup if absent.
func (s *Store) load(id [IDSize]byte) (*storepb.Group, error) {
	v, closer, err := s.db.Get(recordKey(id))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, fresh(ErrUnknownGroup)
	}
	if err != nil {
		return nil, internal("read group", err)
	}
	defer closer.Close()
	g := &storepb.Group{}
	if err := proto.Unmarshal(v, g); err != nil {
		return nil, internal("decode group", err)
	}
	return g, nil
}

func (s *Store) lock(id [IDSize]byte) *sync.Mutex {
	return &s.locks[maphash.Bytes(s.seed, id[:])%uint64(len(s.locks))]
}

func internal(what string, err error) error {
	return fmt.Errorf("%s: %w: %w", what, errf(ErrInternal, "%s failed", what), err)
}

func recordKey(id [IDSize]byte) []byte {
	return append([]byte{store.PrefixGroup, subRecord}, id[:]...)
}

func memberPrefix(username string) []byte {
	k := make([]byte, 0, 3+len(username)+IDSize)
	k = append(k, store.PrefixGroup, subMember)
	k = append(k, username...)
	return append(k, 0)
}

func memberKey(username string, id [IDSize]byte) []byte {
	return append(memberPrefix(username), id[:]...)
}

// prefixEnd returns the smallest key greater than every key starting with p.
func prefixEnd(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		end[i]++
		if end[i] != 0 {
			return end[:i+1]
		}
	}
	return nil
}

// dedup returns the distinct names, sorted.
func dedup(names []string) []string {
	out := slices.Clone(names)
	slices.Sort(out)
	return slices.Compact(out)
}

func sortMembers(ms []*storepb.GroupMember) {
	sort.Slice(ms, func(i, j int) bool { return ms[i].Username < ms[j].Username })
}

func hasAdmin(g *storepb.Group) bool {
	return slices.ContainsFunc(g.Members, func(m *storepb.GroupMember) bool { return m.Admin })
}
