package push

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// ErrStorage wraps every storage failure of Store.
var ErrStorage = errors.New("push: storage")

// Store keeps one push registration per device under
// store.PrefixPush username 0x00 device(4), value a wirepb.PushRegistration.
// Writes are synced: a device that was told its token is registered gets
// wake-ups after a crash too. It is safe for concurrent use.
type Store struct {
	db    *pebble.DB
	seed  maphash.Seed
	locks [16]sync.Mutex // striped by device: Put and DeleteIf do not interleave
}

// NewStore returns a Store over db, which it reads and writes only under
// store.PrefixPush.
func NewStore(db *pebble.DB) *Store { return &Store{db: db, seed: maphash.MakeSeed()} }

func key(dev wire.DeviceAddr) []byte {
	return store.DeviceKey([]byte{store.PrefixPush}, dev.Account, dev.Device)
}

func (s *Store) lock(dev wire.DeviceAddr) *sync.Mutex {
	return &s.locks[maphash.String(s.seed, dev.String())%uint64(len(s.locks))]
}

// Get returns dev's registration or ErrNotFound.
func (s *Store) Get(_ context.Context, dev wire.DeviceAddr) (*wirepb.PushRegistration, error) {
	v, closer, err := s.db.Get(key(dev))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("%w: get: %w", ErrStorage, err)
	}
	defer closer.Close()
	reg := &wirepb.PushRegistration{}
	if err := proto.Unmarshal(v, reg); err != nil {
		return nil, fmt.Errorf("%w: decode %s: %w", ErrStorage, dev, err)
	}
	return reg, nil
}

// Put registers reg for dev, replacing any earlier registration.
func (s *Store) Put(_ context.Context, dev wire.DeviceAddr, reg *wirepb.PushRegistration) error {
	b, err := proto.Marshal(reg)
	if err != nil {
		return fmt.Errorf("%w: encode: %w", ErrStorage, err)
	}
	mu := s.lock(dev)
	mu.Lock()
	defer mu.Unlock()
	if err := s.db.Set(key(dev), b, pebble.Sync); err != nil {
		return fmt.Errorf("%w: put: %w", ErrStorage, err)
	}
	return nil
}

// Delete removes dev's registration (none is not an error).
func (s *Store) Delete(_ context.Context, dev wire.DeviceAddr) error {
	mu := s.lock(dev)
	mu.Lock()
	defer mu.Unlock()
	if err := s.db.Delete(key(dev), pebble.Sync); err != nil {
		return fmt.Errorf("%w: delete: %w", ErrStorage, err)
	}
	return nil
}

// DeleteIf removes dev's registration only if it is still reg: a token the
// provider rejected must not take a newer one the device just set with it.
func (s *Store) DeleteIf(ctx context.Context, dev wire.DeviceAddr, reg *wirepb.PushRegistration) (bool, error) {
	mu := s.lock(dev)
	mu.Lock()
	defer mu.Unlock()
	cur, err := s.Get(ctx, dev)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if !proto.Equal(cur, reg) {
		return false, nil
	}
	if err := s.db.Delete(key(dev), pebble.Sync); err != nil {
		return false, fmt.Errorf("%w: delete: %w", ErrStorage, err)
	}
	return true, nil
}
