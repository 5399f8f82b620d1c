// Package presence keeps who is online, when each account was last seen,
// and who may see it (design invariant 8: ephemeral, off the message path,
// never blocking a send).
//
// Two parts:
//
//   - Store: the only durable part, in the node's Pebble database. Keys
//     (package store documents the whole key space):
//
//     'o' 's' username    last seen, Unix milliseconds (8 bytes), written NoSync (best-effort)
//     'o' 'v' username    privacy setting (wirepb.PresencePrivacy), written Sync
//
//   - Tracker: in memory only. Counts each account's live receiving
//     connections, keeps per-connection subscriptions, pushes changes to
//     subscribers without ever blocking, and coalesces flapping.
package presence

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// MaxAllow is the longest allowlist an account may set.
const MaxAllow = 1024

// Key sub-prefixes under store.PrefixPresence.
const (
	subLastSeen = 's'
	subPrivacy  = 'v'
)

// Errors. Each is a *wire.Error; functions hand out fresh copies.
var (
	// ErrBadRequest: an unknown visibility, an allowlist with a bad name or
	// over MaxAllow.
	ErrBadRequest = &wire.Error{Code: wirepb.ErrorCode_BAD_REQUEST, Message: "presence: bad request"}
	// ErrTooManySubscriptions: a subscription over Options.MaxSubscriptions.
	ErrTooManySubscriptions = &wire.Error{Code: wirepb.ErrorCode_TOO_MANY_SUBSCRIPTIONS, Message: "presence: too many subscriptions"}
	// ErrInternal: storage failed or a record does not decode.
	ErrInternal = &wire.Error{Code: wirepb.ErrorCode_INTERNAL, Message: "presence: internal error", Retryable: true}
)

// Backend is the durable part the Tracker needs.
type Backend interface {
	// LastSeen returns the stored last-seen time, ok false if none.
	LastSeen(ctx context.Context, username string) (t time.Time, ok bool, err error)
	// SetLastSeen stores it best-effort (no fsync).
	SetLastSeen(ctx context.Context, username string, t time.Time) error
	// Privacy returns the account's setting (EVERYONE when none is stored).
	Privacy(ctx context.Context, username string) (*wirepb.PresencePrivacy, error)
	// SetPrivacy stores it durably.
	SetPrivacy(ctx context.Context, username string, p *wirepb.PresencePrivacy) error
}

// Store is the Pebble-backed Backend.
type Store struct {
	db *pebble.DB
}

var _ Backend = (*Store)(nil)

// NewStore returns the presence store over db.
func NewStore(db *pebble.DB) *Store { return &Store{db: db} }

func key(sub byte, username string) []byte {
	return append([]byte{store.PrefixPresence, sub}, username...)
}

// LastSeen implements Backend.
func (s *Store) LastSeen(_ context.Context, username string) (time.Time, bool, error) {
	v, closer, err := s.db.Get(key(subLastSeen, username))
	if errors.Is(err, pebble.ErrNotFound) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, ErrInternal.Newf("presence: read last seen: %v", err)
	}
	defer closer.Close()
	if len(v) != 8 {
		return time.Time{}, false, ErrInternal.Newf("presence: last seen record of %d bytes", len(v))
	}
	return time.UnixMilli(int64(binary.BigEndian.Uint64(v))), true, nil
}

// SetLastSeen implements Backend. The write is not synced: a crash may
// lose the newest value, which is what "best-effort" promises.
func (s *Store) SetLastSeen(_ context.Context, username string, t time.Time) error {
	var v [8]byte
	binary.BigEndian.PutUint64(v[:], uint64(t.UnixMilli()))
	if err := s.db.Set(key(subLastSeen, username), v[:], pebble.NoSync); err != nil {
		return ErrInternal.Newf("presence: write last seen: %v", err)
	}
	return nil
}

// Privacy implements Backend.
func (s *Store) Privacy(_ context.Context, username string) (*wirepb.PresencePrivacy, error) {
	v, closer, err := s.db.Get(key(subPrivacy, username))
	if errors.Is(err, pebble.ErrNotFound) {
		return &wirepb.PresencePrivacy{Visibility: wirepb.PresenceVisibility_EVERYONE}, nil
	}
	if err != nil {
		return nil, ErrInternal.Newf("presence: read privacy: %v", err)
	}
	defer closer.Close()
	p := &wirepb.PresencePrivacy{}
	if err := proto.Unmarshal(v, p); err != nil {
		return nil, ErrInternal.Newf("presence: privacy record: %v", err)
	}
	return p, nil
}

// SetPrivacy implements Backend (synced: a setting the user made must
// survive a crash).
func (s *Store) SetPrivacy(_ context.Context, username string, p *wirepb.PresencePrivacy) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(p)
	if err != nil {
		return ErrInternal.Newf("presence: encode privacy: %v", err)
	}
	if err := s.db.Set(key(subPrivacy, username), b, pebble.Sync); err != nil {
		return ErrInternal.Newf("presence: write privacy: %v", err)
	}
	return nil
}

// NormalizePrivacy checks a requested setting and returns it in stored
// form: the allowlist sorted, deduplicated, and empty unless ALLOWLIST.
func NormalizePrivacy(vis wirepb.PresenceVisibility, allow []string) (*wirepb.PresencePrivacy, error) {
	p := &wirepb.PresencePrivacy{Visibility: vis}
	switch vis {
	case wirepb.PresenceVisibility_EVERYONE, wirepb.PresenceVisibility_NOBODY:
		if len(allow) > 0 {
			return nil, ErrBadRequest.Newf("presence: an allowlist goes only with ALLOWLIST")
		}
		return p, nil
	case wirepb.PresenceVisibility_ALLOWLIST:
	default:
		return nil, ErrBadRequest.Newf("presence: unknown visibility %d", vis)
	}
	if len(allow) > MaxAllow {
		return nil, ErrBadRequest.Newf("presence: allowlist of %d names is over %d", len(allow), MaxAllow)
	}
	for _, a := range allow {
		if err := device.ValidateUsername(a); err != nil {
			return nil, fmt.Errorf("presence: allowlist: %w", err)
		}
	}
	p.Allow = slices.Compact(slices.Sorted(slices.Values(allow)))
	return p, nil
}

// Visible reports whether viewer may see target's presence under p.
func Visible(p *wirepb.PresencePrivacy, target, viewer string) bool {
	if target == viewer {
		return true
	}
	switch p.GetVisibility() {
	case wirepb.PresenceVisibility_NOBODY:
		return false
	case wirepb.PresenceVisibility_ALLOWLIST:
		_, ok := slices.BinarySearch(p.Allow, viewer)
		return ok
	default:
		return true
	}
}

// memBackend keeps everything in memory (tests, or a relay without a store).
type memBackend struct {
	mu   sync.Mutex
	seen map[string]time.Time
	priv map[string]*wirepb.PresencePrivacy
}

// NewMemBackend is a Backend in memory only.
func NewMemBackend() Backend {
	return &memBackend{seen: map[string]time.Time{}, priv: map[string]*wirepb.PresencePrivacy{}}
}

func (m *memBackend) LastSeen(_ context.Context, u string) (time.Time, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	t, ok := m.seen[u]
	return t, ok, nil
}

func (m *memBackend) SetLastSeen(_ context.Context, u string, t time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.seen[u] = t
	return nil
}

func (m *memBackend) Privacy(_ context.Context, u string) (*wirepb.PresencePrivacy, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p, ok := m.priv[u]; ok {
		return proto.Clone(p).(*wirepb.PresencePrivacy), nil
	}
	return &wirepb.PresencePrivacy{Visibility: wirepb.PresenceVisibility_EVERYONE}, nil
}

func (m *memBackend) SetPrivacy(_ context.Context, u string, p *wirepb.PresencePrivacy) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.priv[u] = proto.Clone(p).(*wirepb.PresencePrivacy)
	return nil
}
