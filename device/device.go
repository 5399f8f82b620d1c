// Package device keeps Ferry's accounts and their devices, and checks device
// authentication.
//
// An account is one record under key 'a' username (storepb.Account) holding
// its devices, ordered by id. Its newest signed device list, as published by
// the primary (see PublishDeviceList and package devicelist), is kept under
// key 'l' username. Device 1 is the primary device, created by
// Register; AddDevice gives later devices the account's next id, and ids are
// never reused. Every change is one synced Pebble write of the whole record,
// made under a per-username lock, so concurrent changes to one account are
// serialized and exactly one of concurrent registrations of a name wins.
// (Within one process: in cluster mode a shard, and so an account, has one
// owner node at a time.)
//
// The server stores only public keys: each device's Ed25519 signing key,
// which checks the signatures of its Register and Auth frames. A copy of the
// database lets no one act as a device.
//
// Reads return fresh copies. Encoded account records are cached (a bounded
// map, Options.CacheSize): every write of a record goes through this store
// under the account's lock and refreshes the cache after it committed, and a
// miss is filled under the same lock, so the cache never holds a record
// older than Pebble's. Shard moves write 'a' keys through ImportShard and
// DropShard (shard.go), which hold every lock and drop what they change.
package device

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"hash/maphash"
	"slices"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"google.golang.org/protobuf/proto"
)

// PrimaryDeviceID is the id of the device Register creates.
const PrimaryDeviceID = 1

// DefaultMaxDevices is the default of Options.MaxDevices.
const DefaultMaxDevices = 6 // the primary and 5 linked devices

// Options configure a Store. The zero value is ready to use.
type Options struct {
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// MaxDevices is how many devices an account may have at once, the
	// primary included; 0 means DefaultMaxDevices. A signed device list can
	// name at most devicelist.MaxDevices devices, so larger values are
	// lowered to that.
	MaxDevices int
	// CacheSize is how many encoded account records are kept in memory;
	// 0 means 100,000 (about 200 bytes each), a negative value none.
	CacheSize int
}

// Store is the account and device store. It is safe for concurrent use.
type Store struct {
	db         *pebble.DB
	now        func() time.Time
	maxDevices int
	seed       maphash.Seed
	locks      [64]sync.Mutex // striped by username
	cache      *recordCache
}

// New returns a Store over db, which it reads and writes only under the
// store.PrefixAccount and store.PrefixDeviceList prefixes.
func New(db *pebble.DB, o Options) *Store {
	if o.CacheSize == 0 {
		o.CacheSize = 100_000
	}
	s := &Store{db: db, now: o.Now, maxDevices: o.MaxDevices, seed: maphash.MakeSeed(), cache: newRecordCache(o.CacheSize)}
	if s.now == nil {
		s.now = time.Now
	}
	if s.maxDevices <= 0 {
		s.maxDevices = DefaultMaxDevices
	}
	s.maxDevices = min(s.maxDevices, devicelist.MaxDevices)
	return s
}

// Register creates the account username with its primary device (id 1),
// holding the device's Ed25519 signing key and Signal registration id, in
// one synced write, and returns the device. Of concurrent registrations of
// one name exactly one succeeds; the others, and any later one, get
// ErrUsernameTaken. An invalid name is ErrInvalidUsername, a signing key
// that is not 32 bytes ErrInvalidKey, a registration id outside
// 1..MaxRegistrationID ErrInvalidRegistrationID. The caller checks the
// Register signature first (VerifyRegister).
func (s *Store) Register(ctx context.Context, username string, signingKey []byte, registrationID uint32) (*storepb.Device, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("device: register: %w", err)
	}
	if err := ValidateUsername(username); err != nil {
		return nil, fmt.Errorf("device: register: %w", err)
	}
	if err := checkDeviceFields(signingKey, registrationID); err != nil {
		return nil, fmt.Errorf("device: register %q: %w", username, err)
	}

	mu := s.lock(username)
	mu.Lock()
	defer mu.Unlock()
	acct, err := s.load(username)
	if err != nil && !errors.Is(err, ErrUnknownAccount) {
		return nil, fmt.Errorf("device: register %q: %w", username, err)
	}
	if acct != nil {
		return nil, fmt.Errorf("device: register %q: %w", username, fresh(ErrUsernameTaken))
	}
	now := s.now().UnixMilli()
	dev := &storepb.Device{
		Id:             PrimaryDeviceID,
		SigningKey:     slices.Clone(signingKey),
		RegistrationId: registrationID,
		CreatedMs:      now,
	}
	acct = &storepb.Account{
		Username:     username,
		CreatedMs:    now,
		NextDeviceId: PrimaryDeviceID + 1,
		Devices:      []*storepb.Device{dev},
	}
	if err := s.save(acct); err != nil {
		return nil, fmt.Errorf("device: register %q: %w", username, err)
	}
	return proto.CloneOf(dev), nil
}

// Account returns a fresh copy of the account record of username, or
// ErrUnknownAccount (also for a name that could never be registered).
func (s *Store) Account(ctx context.Context, username string) (*storepb.Account, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("device: account: %w", err)
	}
	if ValidateUsername(username) != nil {
		return nil, fmt.Errorf("device: account: %w", fresh(ErrUnknownAccount))
	}
	acct, err := s.loadCached(username)
	if err != nil {
		return nil, fmt.Errorf("device: account %q: %w", username, err)
	}
	return acct, nil
}

// loadCached is load through the cache, filling it on a miss under the
// account's lock.
func (s *Store) loadCached(username string) (*storepb.Account, error) {
	if v, ok := s.cache.get(username); ok {
		return decodeAccount(v)
	}
	mu := s.lock(username)
	mu.Lock()
	defer mu.Unlock()
	v, err := s.loadRaw(username)
	if err != nil {
		return nil, err
	}
	s.cache.put(username, v)
	return decodeAccount(v)
}

// Device returns a fresh copy of the record of device addr: ErrUnknownAccount
// if the account does not exist, ErrUnknownDevice if it has no such device.
func (s *Store) Device(ctx context.Context, addr wire.DeviceAddr) (*storepb.Device, error) {
	acct, err := s.Account(ctx, addr.Account)
	if err != nil {
		return nil, err
	}
	if i := findDevice(acct, addr.Device); i >= 0 {
		return acct.Devices[i], nil
	}
	return nil, fmt.Errorf("device: %s: %w", addr, errf(ErrUnknownDevice, "account has no device %d", addr.Device))
}

// AddDevice adds a device to the existing account username with the next
// device id (ids are never reused, also after RemoveDevice) in one synced
// write, and returns it. Errors: ErrUnknownAccount, ErrInvalidKey,
// ErrInvalidRegistrationID, ErrTooManyDevices. Checking that the account's
// owner approved the new device (linking) is the caller's job.
func (s *Store) AddDevice(ctx context.Context, username string, signingKey []byte, registrationID uint32) (*storepb.Device, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("device: add device: %w", err)
	}
	if ValidateUsername(username) != nil {
		return nil, fmt.Errorf("device: add device: %w", fresh(ErrUnknownAccount))
	}
	if err := checkDeviceFields(signingKey, registrationID); err != nil {
		return nil, fmt.Errorf("device: add device to %q: %w", username, err)
	}

	mu := s.lock(username)
	mu.Lock()
	defer mu.Unlock()
	acct, err := s.load(username)
	if err != nil {
		return nil, fmt.Errorf("device: add device to %q: %w", username, err)
	}
	if len(acct.Devices) >= s.maxDevices {
		return nil, fmt.Errorf("device: add device to %q: %w", username,
			errf(ErrTooManyDevices, "account has the maximum of %d devices", s.maxDevices))
	}
	id := acct.NextDeviceId
	if id <= PrimaryDeviceID || id == ^uint32(0) {
		// Never seen in practice (4 billion devices); refuse rather than wrap around.
		return nil, fmt.Errorf("device: add device to %q: %w", username, errf(ErrInternal, "device ids exhausted"))
	}
	dev := &storepb.Device{
		Id:             id,
		SigningKey:     slices.Clone(signingKey),
		RegistrationId: registrationID,
		CreatedMs:      s.now().UnixMilli(),
	}
	acct.Devices = append(acct.Devices, dev)
	acct.NextDeviceId = id + 1
	if err := s.save(acct); err != nil {
		return nil, fmt.Errorf("device: add device to %q: %w", username, err)
	}
	return proto.CloneOf(dev), nil
}

// RemoveDevice removes device addr from its account in one synced write.
// Its id is not reused. The primary device cannot be removed
// (ErrPrimaryDevice); an unknown account or device is ErrUnknownAccount or
// ErrUnknownDevice. The device's prekeys live in package keys: the caller
// deletes them too (keys.Store.DeleteDevice).
func (s *Store) RemoveDevice(ctx context.Context, addr wire.DeviceAddr) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("device: remove %s: %w", addr, err)
	}
	if ValidateUsername(addr.Account) != nil {
		return fmt.Errorf("device: remove device: %w", fresh(ErrUnknownAccount))
	}
	if addr.Device == PrimaryDeviceID {
		return fmt.Errorf("device: remove %s: %w", addr, fresh(ErrPrimaryDevice))
	}

	mu := s.lock(addr.Account)
	mu.Lock()
	defer mu.Unlock()
	acct, err := s.load(addr.Account)
	if err != nil {
		return fmt.Errorf("device: remove %s: %w", addr, err)
	}
	i := findDevice(acct, addr.Device)
	if i < 0 {
		return fmt.Errorf("device: remove %s: %w", addr, errf(ErrUnknownDevice, "account has no device %d", addr.Device))
	}
	acct.Devices = slices.Delete(acct.Devices, i, i+1)
	if err := s.save(acct); err != nil {
		return fmt.Errorf("device: remove %s: %w", addr, err)
	}
	return nil
}

// checkDeviceFields checks a new device's signing key and registration id.
func checkDeviceFields(signingKey []byte, registrationID uint32) error {
	if len(signingKey) != ed25519.PublicKeySize {
		return errf(ErrInvalidKey, "signing key must be %d bytes, not %d", ed25519.PublicKeySize, len(signingKey))
	}
	if registrationID < 1 || registrationID > MaxRegistrationID {
		return errf(ErrInvalidRegistrationID, "registration id %d is outside 1..%d", registrationID, MaxRegistrationID)
	}
	return nil
}

// findDevice returns the index of device id in acct.Devices, or -1.
func findDevice(acct *storepb.Account, id uint32) int {
	for i, d := range acct.Devices {
		if d.GetId() == id {
			return i
		}
	}
	return -1
}

// lock returns the mutex that serializes changes to username's account.
func (s *Store) lock(username string) *sync.Mutex {
	return &s.locks[maphash.String(s.seed, username)%uint64(len(s.locks))]
}

func accountKey(username string) []byte {
	k := make([]byte, 0, 1+len(username))
	k = append(k, store.PrefixAccount)
	return append(k, username...)
}

// load reads and decodes the account record: ErrUnknownAccount if absent.
// Callers hold the account's lock (a cache hit is then current).
func (s *Store) load(username string) (*storepb.Account, error) {
	if v, ok := s.cache.get(username); ok {
		return decodeAccount(v)
	}
	v, err := s.loadRaw(username)
	if err != nil {
		return nil, err
	}
	return decodeAccount(v)
}

// loadRaw reads the encoded account record from Pebble.
func (s *Store) loadRaw(username string) ([]byte, error) {
	v, closer, err := s.db.Get(accountKey(username))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, fresh(ErrUnknownAccount)
	}
	if err != nil {
		return nil, fmt.Errorf("read account record: %w: %w", fresh(ErrInternal), err)
	}
	defer closer.Close()
	return slices.Clone(v), nil
}

func decodeAccount(v []byte) (*storepb.Account, error) {
	acct := &storepb.Account{}
	if err := proto.Unmarshal(v, acct); err != nil {
		return nil, fmt.Errorf("decode account record: %w: %w", fresh(ErrInternal), err)
	}
	return acct, nil
}

// save writes the account record with Sync.
func (s *Store) save(acct *storepb.Account) error {
	v, err := proto.MarshalOptions{Deterministic: true}.Marshal(acct)
	if err != nil {
		return fmt.Errorf("encode account record: %w: %w", fresh(ErrInternal), err)
	}
	if err := s.db.Set(accountKey(acct.Username), v, pebble.Sync); err != nil {
		s.cache.drop(acct.Username)
		return fmt.Errorf("write account record: %w: %w", fresh(ErrInternal), err)
	}
	s.cache.put(acct.Username, v)
	return nil
}

// recordCache is a bounded map of encoded records; an arbitrary entry goes
// when it is full. Values are never modified.
type recordCache struct {
	mu  sync.RWMutex
	m   map[string][]byte // guarded by mu
	max int
}

func newRecordCache(max int) *recordCache {
	return &recordCache{m: make(map[string][]byte), max: max}
}

func (c *recordCache) get(k string) ([]byte, bool) {
	if c.max <= 0 {
		return nil, false
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	v, ok := c.m[k]
	return v, ok
}

func (c *recordCache) put(k string, v []byte) {
	if c.max <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[k]; !ok && len(c.m) >= c.max {
		for old := range c.m {
			delete(c.m, old)
			break
		}
	}
	c.m[k] = v
}

func (c *recordCache) drop(k string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, k)
}
