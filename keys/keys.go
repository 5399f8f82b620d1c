// Package keys is Ferry's Signal prekey directory: per device, an identity
// key, a signed prekey and a pool of one-time prekeys, handed out as prekey
// bundles so others can start Signal sessions with the device.
//
// Storage (see package store):
//
//	'k' 's' username 0x00 device(4)               storepb.DeviceKeys (identity key, signed prekey)
//	'k' 'o' username 0x00 device(4) prekey_id(4)  one-time prekey: the raw 33-byte public key
//
// Keys are stored as the raw bytes the device uploaded (after validation),
// never as libsignal records, whose round trip corrupts public keys. Only
// public keys are stored.
//
// The number of one-time prekeys a device holds is not stored: it is counted
// by iterating the device's 'k' 'o' range, which holds at most
// Options.MaxStored keys (small fixed-size entries). A counter record would
// need a key the store layout does not have, and would be one more thing to
// keep consistent.
//
// Writes to one device's keys (Upload, Claim, DeleteDevice) are serialized
// by a striped per-device lock and each is one synced Pebble batch. A Claim
// deletes the one-time prekey it hands out, and commits that deletion with
// Sync, before it returns the bundle and before any other claim of the same
// device can read, so each one-time prekey is handed out at most once. The
// locks are per process: in cluster mode a shard has one owner at a time.
//
// Claims are rate-limited per requesting device with a token bucket; the
// buckets are held in a bounded LRU map whose idle entries are dropped once
// they would be full again (see package ratelimit).
//
// libsignal (go.mau.fi/libsignal) only ever sees bytes whose lengths and
// type byte were checked, and every call runs under recover. Importing this
// package installs a libsignal logger that drops Debug output, unless one
// was set up already (see init in verify.go).
package keys

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/ferryhq/ferry/internal/ratelimit"
	"hash/maphash"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"golang.org/x/time/rate"
	"google.golang.org/protobuf/proto"
)

// Defaults of Options.
const (
	DefaultMaxPerUpload = 100
	DefaultMaxStored    = 1000
	DefaultLowThreshold = 10
	DefaultClaimRate    = rate.Limit(5)
	DefaultClaimBurst   = 20
)

// MaxClaimDevices is the most devices one Claim may name.
const MaxClaimDevices = 256

// maxAccountLen bounds account names handed to this package (usernames are
// at most 32 bytes; see device.ValidateUsername).
const maxAccountLen = 32

// Options configure a Store. The zero value gives the defaults.
type Options struct {
	// MaxPerUpload is the most one-time prekeys one upload may carry; 0 = 100.
	MaxPerUpload int
	// MaxStored is the most one-time prekeys held per device; 0 = 1000.
	MaxStored int
	// LowThreshold: a device holding fewer one-time prekeys than this should
	// upload more (the relay sends PrekeysLow); 0 = 10.
	LowThreshold int
	// ClaimRate is how many Claim calls per second one requesting device may
	// make, each naming any number of devices of one account; 0 = 5.
	ClaimRate rate.Limit
	// ClaimBurst is the claim bucket size; 0 = 20.
	ClaimBurst int
	// Now is the clock (for rate limits); nil means time.Now.
	Now func() time.Time
}

// Store is the prekey directory. It is safe for concurrent use.
type Store struct {
	db    *pebble.DB
	o     Options
	lim   *ratelimit.Keyed[wire.DeviceAddr]
	seed  maphash.Seed
	locks [64]sync.Mutex // striped by device
}

// New returns a Store over db, which it reads and writes only under the
// store.PrefixKeys prefix.
func New(db *pebble.DB, o Options) *Store {
	if o.MaxPerUpload <= 0 {
		o.MaxPerUpload = DefaultMaxPerUpload
	}
	if o.MaxStored <= 0 {
		o.MaxStored = DefaultMaxStored
	}
	if o.LowThreshold <= 0 {
		o.LowThreshold = DefaultLowThreshold
	}
	if o.ClaimRate <= 0 {
		o.ClaimRate = DefaultClaimRate
	}
	if o.ClaimBurst <= 0 {
		o.ClaimBurst = DefaultClaimBurst
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Store{
		db:   db,
		o:    o,
		lim:  ratelimit.New[wire.DeviceAddr](o.ClaimRate, o.ClaimBurst, ratelimit.DefaultMax),
		seed: maphash.MakeSeed(),
	}
}

// LowThreshold is the one-time prekey count under which a device should
// upload more.
func (s *Store) LowThreshold() int { return s.o.LowThreshold }

// MaxPerUpload is the most one-time prekeys one upload may carry (for
// wirepb.Limits).
func (s *Store) MaxPerUpload() int { return s.o.MaxPerUpload }

// Upload stores the keys device dev uploads and returns how many one-time
// prekeys it now holds.
//
// The first upload must carry the identity key and a signed prekey
// (ErrFirstUpload). The identity key can never change afterwards
// (ErrIdentityKeyChanged; sending the same key again is fine). A signed
// prekey replaces the stored one; its signature is checked against the
// identity key (ErrBadSignature). One-time prekeys need ids 1..MaxPrekeyID,
// unique within the upload (ErrBadRequest), and valid keys (ErrInvalidKey);
// an id already held is replaced (and not counted twice). More than
// MaxPerUpload in one upload, or adding prekeys so that more than MaxStored
// would be held, is ErrTooManyPrekeys. Any error stores nothing; otherwise
// everything is stored in one synced batch.
func (s *Store) Upload(ctx context.Context, dev wire.DeviceAddr, up *wirepb.UploadKeys) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("keys: upload for %s: %w", dev, err)
	}
	if err := checkAddr(dev); err != nil {
		return 0, fmt.Errorf("keys: upload: %w", err)
	}
	if err := s.checkUpload(up); err != nil {
		return 0, fmt.Errorf("keys: upload for %s: %w", dev, err)
	}

	mu := s.lock(dev)
	mu.Lock()
	defer mu.Unlock()

	cur, err := s.loadKeys(dev)
	if err != nil {
		return 0, fmt.Errorf("keys: upload for %s: %w", dev, err)
	}
	identity := up.GetIdentityKey()
	switch {
	case cur == nil:
		if len(identity) == 0 || up.GetSignedPrekey() == nil {
			return 0, fmt.Errorf("keys: upload for %s: %w", dev, fresh(ErrFirstUpload))
		}
	case len(identity) == 0:
		identity = cur.IdentityKey
	case !bytes.Equal(identity, cur.IdentityKey):
		return 0, fmt.Errorf("keys: upload for %s: %w", dev, fresh(ErrIdentityKeyChanged))
	}

	var rec *storepb.DeviceKeys
	if spk := up.GetSignedPrekey(); spk != nil {
		if err := VerifySignedPreKey(identity, spk); err != nil {
			return 0, fmt.Errorf("keys: upload for %s: %w", dev, err)
		}
		rec = &storepb.DeviceKeys{
			IdentityKey:     slices.Clone(identity),
			SignedPrekeyId:  spk.Id,
			SignedPrekey:    slices.Clone(spk.PublicKey),
			SignedPrekeySig: slices.Clone(spk.Signature),
		}
	}

	held, err := s.prekeyIDs(dev, len(up.GetOneTimePrekeys()) > 0)
	if err != nil {
		return 0, fmt.Errorf("keys: upload for %s: %w", dev, err)
	}
	total := held.n
	for _, pk := range up.GetOneTimePrekeys() {
		if _, ok := held.ids[pk.Id]; !ok {
			total++
		}
	}
	if total > held.n && total > s.o.MaxStored {
		return 0, fmt.Errorf("keys: upload for %s: %w", dev,
			errf(ErrTooManyPrekeys, "upload would make %d one-time prekeys held, over the limit of %d (%d held now)",
				total, s.o.MaxStored, held.n))
	}

	b := s.db.NewBatch()
	defer b.Close()
	if rec != nil {
		v, err := proto.MarshalOptions{Deterministic: true}.Marshal(rec)
		if err != nil {
			return 0, fmt.Errorf("keys: upload for %s: encode: %w: %w", dev, fresh(ErrInternal), err)
		}
		if err := b.Set(signedKey(dev), v, nil); err != nil {
			return 0, fmt.Errorf("keys: upload for %s: %w: %w", dev, fresh(ErrInternal), err)
		}
	}
	for _, pk := range up.GetOneTimePrekeys() {
		if err := b.Set(prekeyKey(dev, pk.Id), pk.PublicKey, nil); err != nil {
			return 0, fmt.Errorf("keys: upload for %s: %w: %w", dev, fresh(ErrInternal), err)
		}
	}
	if !b.Empty() {
		if err := b.Commit(pebble.Sync); err != nil {
			return 0, fmt.Errorf("keys: upload for %s: commit: %w: %w", dev, fresh(ErrInternal), err)
		}
	}
	return total, nil
}

// checkUpload checks everything in up that needs no stored state.
func (s *Store) checkUpload(up *wirepb.UploadKeys) error {
	if up == nil {
		return errf(ErrBadRequest, "no keys")
	}
	if len(up.IdentityKey) > 0 {
		if _, err := parseKey("identity key", up.IdentityKey); err != nil {
			return err
		}
	}
	if up.SignedPrekey != nil {
		if err := checkSignedPreKey(up.SignedPrekey); err != nil {
			return err
		}
	}
	if n := len(up.OneTimePrekeys); n > s.o.MaxPerUpload {
		return errf(ErrTooManyPrekeys, "%d one-time prekeys in one upload, over the limit of %d", n, s.o.MaxPerUpload)
	}
	seen := make(map[uint32]struct{}, len(up.OneTimePrekeys))
	for i, pk := range up.OneTimePrekeys {
		if pk == nil {
			return errf(ErrBadRequest, "one-time prekey #%d is empty", i)
		}
		if pk.Id == 0 || pk.Id > MaxPrekeyID {
			return errf(ErrBadRequest, "one-time prekey #%d: id %d is outside 1..%d", i, pk.Id, MaxPrekeyID)
		}
		if _, dup := seen[pk.Id]; dup {
			return errf(ErrBadRequest, "one-time prekey id %d appears twice", pk.Id)
		}
		seen[pk.Id] = struct{}{}
		if _, err := parseKey(fmt.Sprintf("one-time prekey %d", pk.Id), pk.PublicKey); err != nil {
			return err
		}
	}
	return nil
}

// Claim returns one prekey bundle for each of deviceIDs of account, in that
// order, for requester. The caller takes deviceIDs from the device store
// (each must be a current device of the account); RegistrationId is left 0
// for the caller to fill in from the device record.
//
// Each bundle carries a one-time prekey if the device has one left (the
// lowest id), and that prekey is deleted, with Sync, before Claim returns:
// each one-time prekey is handed out at most once, also under concurrent
// claims. A device without uploaded keys fails the whole claim with
// ErrNoKeys naming the device, and then nothing is consumed.
//
// Claims are rate-limited per requester (Options.ClaimRate/ClaimBurst, one
// token per call): over the limit the error is ErrRateLimited-coded and its
// *wire.Error has RetryAfterMs set.
func (s *Store) Claim(ctx context.Context, requester wire.DeviceAddr, account string, deviceIDs []uint32) ([]*wirepb.PreKeyBundle, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("keys: claim by %s: %w", requester, err)
	}
	if d := s.lim.Take(requester, s.o.Now()); d > 0 {
		ms := uint32(math.MaxUint32)
		if d < time.Duration(math.MaxUint32)*time.Millisecond {
			ms = uint32((d + time.Millisecond - 1) / time.Millisecond)
		}
		e := errf(ErrRateLimited, "bundle claims over the limit of %g per second; retry in %d ms", float64(s.o.ClaimRate), ms)
		e.RetryAfterMs = max(ms, 1)
		return nil, fmt.Errorf("keys: claim by %s: %w", requester, e)
	}
	if err := checkAccount(account); err != nil {
		return nil, fmt.Errorf("keys: claim by %s: %w", requester, err)
	}
	if len(deviceIDs) == 0 {
		return nil, fmt.Errorf("keys: claim by %s: %w", requester, errf(ErrBadRequest, "no devices named"))
	}
	if len(deviceIDs) > MaxClaimDevices {
		return nil, fmt.Errorf("keys: claim by %s: %w", requester,
			errf(ErrBadRequest, "%d devices named, over the limit of %d", len(deviceIDs), MaxClaimDevices))
	}
	for i, id := range deviceIDs {
		if slices.Contains(deviceIDs[:i], id) {
			return nil, fmt.Errorf("keys: claim by %s: %w", requester, errf(ErrBadRequest, "device %d named twice", id))
		}
	}

	unlock := s.lockAll(account, deviceIDs)
	defer unlock()

	bundles := make([]*wirepb.PreKeyBundle, 0, len(deviceIDs))
	for _, id := range deviceIDs {
		addr := wire.DeviceAddr{Account: account, Device: id}
		rec, err := s.loadKeys(addr)
		if err != nil {
			return nil, fmt.Errorf("keys: claim by %s: %w", requester, err)
		}
		if rec == nil {
			return nil, fmt.Errorf("keys: claim by %s: %w", requester, errf(ErrNoKeys, "device %s has not uploaded its keys", addr))
		}
		bundles = append(bundles, &wirepb.PreKeyBundle{
			DeviceId:    id,
			IdentityKey: rec.IdentityKey,
			SignedPrekey: &wirepb.SignedPreKey{
				Id:        rec.SignedPrekeyId,
				PublicKey: rec.SignedPrekey,
				Signature: rec.SignedPrekeySig,
			},
		})
	}

	b := s.db.NewBatch()
	defer b.Close()
	for _, bundle := range bundles {
		addr := wire.DeviceAddr{Account: account, Device: bundle.DeviceId}
		pk, key, err := s.firstPrekey(addr)
		if err != nil {
			return nil, fmt.Errorf("keys: claim by %s: %w", requester, err)
		}
		if pk == nil {
			continue
		}
		if err := b.Delete(key, nil); err != nil {
			return nil, fmt.Errorf("keys: claim by %s: %w: %w", requester, fresh(ErrInternal), err)
		}
		bundle.OneTimePrekey = pk
	}
	if !b.Empty() {
		if err := b.Commit(pebble.Sync); err != nil {
			return nil, fmt.Errorf("keys: claim by %s: commit: %w: %w", requester, fresh(ErrInternal), err)
		}
	}
	return bundles, nil
}

// Count returns how many one-time prekeys device dev holds and whether it
// has uploaded its identity key and signed prekey. A device that never
// uploaded has (0, false, nil).
func (s *Store) Count(ctx context.Context, dev wire.DeviceAddr) (oneTime int, hasSigned bool, err error) {
	if err := ctx.Err(); err != nil {
		return 0, false, fmt.Errorf("keys: count for %s: %w", dev, err)
	}
	if err := checkAddr(dev); err != nil {
		return 0, false, fmt.Errorf("keys: count: %w", err)
	}
	rec, err := s.loadKeys(dev)
	if err != nil {
		return 0, false, fmt.Errorf("keys: count for %s: %w", dev, err)
	}
	held, err := s.prekeyIDs(dev, false)
	if err != nil {
		return 0, false, fmt.Errorf("keys: count for %s: %w", dev, err)
	}
	return held.n, rec != nil, nil
}

// IdentityKey returns the identity key device dev uploaded (a fresh copy),
// or nil if it has uploaded none.
func (s *Store) IdentityKey(ctx context.Context, dev wire.DeviceAddr) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("keys: identity key of %s: %w", dev, err)
	}
	if err := checkAddr(dev); err != nil {
		return nil, fmt.Errorf("keys: identity key: %w", err)
	}
	rec, err := s.loadKeys(dev)
	if err != nil {
		return nil, fmt.Errorf("keys: identity key of %s: %w", dev, err)
	}
	if rec == nil {
		return nil, nil
	}
	return slices.Clone(rec.IdentityKey), nil
}

// DeleteDevice deletes all keys of device dev in one synced batch (when the
// device is removed). Deleting a device without keys is not an error.
func (s *Store) DeleteDevice(ctx context.Context, dev wire.DeviceAddr) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("keys: delete %s: %w", dev, err)
	}
	if err := checkAddr(dev); err != nil {
		return fmt.Errorf("keys: delete: %w", err)
	}
	mu := s.lock(dev)
	mu.Lock()
	defer mu.Unlock()

	b := s.db.NewBatch()
	defer b.Close()
	lo := prekeyPrefix(dev)
	err := b.Delete(signedKey(dev), nil)
	if err == nil {
		err = b.DeleteRange(lo, prefixEnd(lo), nil)
	}
	if err == nil {
		err = b.Commit(pebble.Sync)
	}
	if err != nil {
		return fmt.Errorf("keys: delete %s: %w: %w", dev, fresh(ErrInternal), err)
	}
	return nil
}

// checkAddr checks a device address before it becomes part of a key.
func checkAddr(dev wire.DeviceAddr) error {
	if err := checkAccount(dev.Account); err != nil {
		return err
	}
	if dev.Device == 0 {
		return errf(ErrBadRequest, "device id 0 is invalid")
	}
	return nil
}

// checkAccount checks that an account name is one that could be registered
// as far as key encoding goes: 1..32 bytes of [a-z0-9_], so it holds no 0x00
// separator and no two accounts' key ranges overlap. (The full rules are
// device.ValidateUsername; callers pass names they looked up there.)
func checkAccount(account string) error {
	if len(account) == 0 || len(account) > maxAccountLen {
		return errf(ErrBadRequest, "invalid account name")
	}
	for i := 0; i < len(account); i++ {
		c := account[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '_' {
			return errf(ErrBadRequest, "invalid account name")
		}
	}
	return nil
}

// lock returns the mutex that serializes writes to dev's keys.
func (s *Store) lock(dev wire.DeviceAddr) *sync.Mutex {
	return &s.locks[s.stripe(dev)]
}

func (s *Store) stripe(dev wire.DeviceAddr) int {
	var h maphash.Hash
	h.SetSeed(s.seed)
	h.WriteString(dev.Account)
	var d [4]byte
	binary.BigEndian.PutUint32(d[:], dev.Device)
	h.Write(d[:])
	return int(h.Sum64() % uint64(len(s.locks)))
}

// lockAll locks the stripes of every device in ids, in stripe order so
// concurrent callers cannot deadlock, and returns the unlock function.
func (s *Store) lockAll(account string, ids []uint32) func() {
	stripes := make([]int, 0, len(ids))
	for _, id := range ids {
		stripes = append(stripes, s.stripe(wire.DeviceAddr{Account: account, Device: id}))
	}
	slices.Sort(stripes)
	stripes = slices.Compact(stripes)
	for _, i := range stripes {
		s.locks[i].Lock()
	}
	return func() {
		for _, i := range slices.Backward(stripes) {
			s.locks[i].Unlock()
		}
	}
}

// signedKey is 'k' 's' username 0x00 device(4).
func signedKey(dev wire.DeviceAddr) []byte {
	k := make([]byte, 0, 2+len(dev.Account)+5)
	k = append(k, store.PrefixKeys, 's')
	return store.DeviceKey(k, dev.Account, dev.Device)
}

// prekeyPrefix is 'k' 'o' username 0x00 device(4).
func prekeyPrefix(dev wire.DeviceAddr) []byte {
	k := make([]byte, 0, 2+len(dev.Account)+5+4)
	k = append(k, store.PrefixKeys, 'o')
	return store.DeviceKey(k, dev.Account, dev.Device)
}

// prekeyKey is 'k' 'o' username 0x00 device(4) prekey_id(4).
func prekeyKey(dev wire.DeviceAddr, id uint32) []byte {
	return binary.BigEndian.AppendUint32(prekeyPrefix(dev), id)
}

// prefixEnd returns the smallest key greater than every key with prefix p.
func prefixEnd(p []byte) []byte {
	end := slices.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] != 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil // p is all 0xff: no upper bound
}

// loadKeys reads dev's DeviceKeys record; nil if it has none.
func (s *Store) loadKeys(dev wire.DeviceAddr) (*storepb.DeviceKeys, error) {
	v, closer, err := s.db.Get(signedKey(dev))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read keys of %s: %w: %w", dev, fresh(ErrInternal), err)
	}
	defer closer.Close()
	rec := &storepb.DeviceKeys{}
	if err := proto.Unmarshal(v, rec); err != nil {
		return nil, fmt.Errorf("decode keys of %s: %w: %w", dev, fresh(ErrInternal), err)
	}
	return rec, nil
}

// heldPrekeys is the count, and if asked for the ids, of one-time prekeys held.
type heldPrekeys struct {
	n   int
	ids map[uint32]struct{}
}

// prekeyIDs counts dev's one-time prekeys, collecting their ids if withIDs.
func (s *Store) prekeyIDs(dev wire.DeviceAddr, withIDs bool) (heldPrekeys, error) {
	var h heldPrekeys
	if withIDs {
		h.ids = make(map[uint32]struct{})
	}
	lo := prekeyPrefix(dev)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: prefixEnd(lo)})
	if err != nil {
		return h, fmt.Errorf("count prekeys of %s: %w: %w", dev, fresh(ErrInternal), err)
	}
	for ok := it.First(); ok; ok = it.Next() {
		h.n++
		if withIDs {
			if k := it.Key(); len(k) == len(lo)+4 {
				h.ids[binary.BigEndian.Uint32(k[len(lo):])] = struct{}{}
			}
		}
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return h, fmt.Errorf("count prekeys of %s: %w: %w", dev, fresh(ErrInternal), err)
	}
	return h, nil
}

// firstPrekey returns dev's one-time prekey with the lowest id and its
// database key, or nil if it has none.
func (s *Store) firstPrekey(dev wire.DeviceAddr) (*wirepb.PreKey, []byte, error) {
	lo := prekeyPrefix(dev)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: prefixEnd(lo)})
	if err != nil {
		return nil, nil, fmt.Errorf("read prekeys of %s: %w: %w", dev, fresh(ErrInternal), err)
	}
	var (
		pk  *wirepb.PreKey
		key []byte
	)
	if it.First() {
		k := it.Key()
		v, verr := it.ValueAndErr()
		switch {
		case verr != nil:
			err = verr
		case len(k) != len(lo)+4 || len(v) != PublicKeySize:
			err = fmt.Errorf("malformed one-time prekey entry")
		default:
			key = slices.Clone(k)
			pk = &wirepb.PreKey{Id: binary.BigEndian.Uint32(k[len(lo):]), PublicKey: slices.Clone(v)}
		}
	}
	if err = errors.Join(err, it.Error(), it.Close()); err != nil {
		return nil, nil, fmt.Errorf("read prekeys of %s: %w: %w", dev, fresh(ErrInternal), err)
	}
	return pk, key, nil
}
