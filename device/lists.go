package device

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// DeviceList returns the newest signed device list username published, as
// stored (the exact signed bytes), and its version; nil and 0 if it has
// published none (also for an account that does not exist: callers check
// that with Account). A stored list is served even if it no longer parses
// (version 0 then): clients verify every list and say why they refuse one,
// which is how tampering with the store shows.
func (s *Store) DeviceList(ctx context.Context, username string) (*wirepb.SignedDeviceList, uint64, error) {
	if err := ctx.Err(); err != nil {
		return nil, 0, fmt.Errorf("device: device list: %w", err)
	}
	if ValidateUsername(username) != nil {
		return nil, 0, nil
	}
	sl, err := s.loadList(username)
	if err != nil || sl == nil {
		return nil, 0, err
	}
	var version uint64
	if l, err := devicelist.Parse(sl); err == nil {
		version = l.Version
	}
	return sl, version, nil
}

// PublishDeviceList stores signed as username's device list and applies it
// to the account: devices the account has but the list does not name are
// removed, and their ids returned (ascending). The caller then deletes their
// prekeys and inboxes and closes their connections. primaryIdentity is the
// Signal identity key of username's device 1 (from the prekey directory).
//
// Under the account's lock, in this order: the list must verify with
// primaryIdentity as signer (devicelist.Verify: device 1 names that key and
// the signature is by it; devicelist errors, DEVICE_LIST_INVALID); be
// username's (ErrDeviceListInvalid); be newer than the stored one
// (ErrDeviceListStale); and name only devices the account has
// (ErrDeviceListInvalid naming the first one that it does not have). The
// account must exist (ErrUnknownAccount). The list and the changed account
// record are written in one synced batch; on any error nothing changes.
//
// Checking each listed identity key against what that device uploaded is
// the caller's job (the keys live in package keys).
func (s *Store) PublishDeviceList(ctx context.Context, username string, signed *wirepb.SignedDeviceList, primaryIdentity []byte) (removed []uint32, err error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("device: publish device list: %w", err)
	}
	if ValidateUsername(username) != nil {
		return nil, fmt.Errorf("device: publish device list: %w", fresh(ErrUnknownAccount))
	}
	if len(primaryIdentity) == 0 {
		return nil, fmt.Errorf("device: publish device list of %q: %w", username,
			errf(ErrInvalidKey, "no primary identity key to check the list against"))
	}
	l, err := devicelist.Verify(signed, primaryIdentity)
	if err != nil {
		return nil, fmt.Errorf("device: publish device list of %q: %w", username, err)
	}
	if l.Username != username {
		return nil, fmt.Errorf("device: publish device list of %q: %w", username,
			errf(ErrDeviceListInvalid, "the list is another account's"))
	}

	mu := s.lock(username)
	mu.Lock()
	defer mu.Unlock()
	acct, err := s.load(username)
	if err != nil {
		return nil, fmt.Errorf("device: publish device list of %q: %w", username, err)
	}
	cur, err := s.loadList(username)
	if err != nil {
		return nil, fmt.Errorf("device: publish device list of %q: %w", username, err)
	}
	if cur != nil {
		if c, err := devicelist.Parse(cur); err == nil && l.Version <= c.Version {
			return nil, fmt.Errorf("device: publish device list of %q: %w", username,
				errf(ErrDeviceListStale, "version %d is not greater than the stored version %d", l.Version, c.Version))
		}
	}
	listed := make(map[uint32]bool, len(l.Devices))
	for _, d := range l.Devices {
		if findDevice(acct, d.DeviceId) < 0 {
			return nil, fmt.Errorf("device: publish device list of %q: %w", username,
				errf(ErrDeviceListInvalid, "the list names device %d, which the account does not have", d.DeviceId))
		}
		listed[d.DeviceId] = true
	}
	kept := acct.Devices[:0:0]
	for _, d := range acct.Devices {
		if listed[d.Id] {
			kept = append(kept, d)
		} else {
			removed = append(removed, d.Id)
		}
	}
	slices.Sort(removed)

	b := s.db.NewBatch()
	defer b.Close()
	v, err := proto.MarshalOptions{Deterministic: true}.Marshal(&wirepb.SignedDeviceList{List: signed.List, Signature: signed.Signature})
	if err == nil {
		err = b.Set(listKey(username), v, nil)
	}
	if err == nil && len(removed) > 0 {
		acct.Devices = kept
		av, merr := (proto.MarshalOptions{Deterministic: true}).Marshal(acct)
		if err = merr; err == nil {
			err = b.Set(accountKey(username), av, nil)
		}
	}
	if err == nil {
		err = b.Commit(pebble.Sync)
	}
	if err != nil {
		s.cache.drop(username)
		return nil, fmt.Errorf("device: publish device list of %q: %w: %w", username, fresh(ErrInternal), err)
	}
	if len(removed) > 0 {
		s.cache.drop(username) // the next read fills it under the lock
	}
	return removed, nil
}

func listKey(username string) []byte {
	k := make([]byte, 0, 1+len(username))
	k = append(k, store.PrefixDeviceList)
	return append(k, username...)
}

// loadList reads the stored signed list of username; nil if none.
func (s *Store) loadList(username string) (*wirepb.SignedDeviceList, error) {
	v, closer, err := s.db.Get(listKey(username))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read device list: %w: %w", fresh(ErrInternal), err)
	}
	defer closer.Close()
	sl := &wirepb.SignedDeviceList{}
	if err := proto.Unmarshal(v, sl); err != nil {
		return nil, fmt.Errorf("decode device list: %w: %w", fresh(ErrInternal), err)
	}
	return sl, nil
}
