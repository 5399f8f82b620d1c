package device

import (
	"context"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
)

// ShardStoreName is the store name of this package's ShardRecords.
const ShardStoreName = "device"

// shardKeys: 'a' username (the account) and 'l' username (its device
// list) belong to the account.
var shardKeys = &store.KeySpace{
	Store:    ShardStoreName,
	Prefixes: [][]byte{{store.PrefixAccount}, {store.PrefixDeviceList}},
	Owner:    func(key []byte) (store.Owner, bool) { return store.AccountOf(key, 1, false) },
	Clear: func(_ pebble.Reader, o store.Owner) ([][2][]byte, error) {
		return [][2][]byte{store.ExactKey(accountKey(o.Account)), store.ExactKey(listKey(o.Account))}, nil
	},
}

// ShardStore returns the name of this store in ShardRecords.
func (s *Store) ShardStore() string { return ShardStoreName }

// ExportShard emits the account and device-list records of the accounts f
// selects, from one snapshot.
func (s *Store) ExportShard(ctx context.Context, f store.ShardFilter, emit func(*storepb.ShardRecord) error) error {
	snap := s.db.NewSnapshot()
	defer snap.Close()
	return store.ExportKeys(ctx, snap, shardKeys, f, emit)
}

// ImportShard replaces the records of the accounts of recs with recs, in
// one synced batch, and drops those accounts from the cache. It holds every
// account lock meanwhile, so no change of this store interleaves.
func (s *Store) ImportShard(ctx context.Context, recs []*storepb.ShardRecord) error {
	defer store.LockStripes(s.locks[:])()
	owners, err := store.ImportKeys(ctx, s.db, shardKeys, recs)
	s.dropCached(owners, err)
	return err
}

// DropShard deletes the records of the accounts f selects, in one synced
// batch, and drops them from the cache.
func (s *Store) DropShard(ctx context.Context, f store.ShardFilter) error {
	defer store.LockStripes(s.locks[:])()
	owners, err := store.DropKeys(ctx, s.db, shardKeys, f)
	s.dropCached(owners, err)
	return err
}

// dropCached drops the owners' records from the cache; after a failed
// write, the whole cache (what reached Pebble is unknown).
func (s *Store) dropCached(owners []store.Owner, err error) {
	if err != nil {
		s.cache.clear()
		return
	}
	for _, o := range owners {
		s.cache.drop(o.Account)
	}
}

func (c *recordCache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.m)
}
