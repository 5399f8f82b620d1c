package keys

import (
	"context"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
)

// ShardStoreName is the store name of this package's ShardRecords.
const ShardStoreName = "keys"

// shardKeys: 'k' 's' username 0x00 device(4) and 'k' 'o' username 0x00
// device(4) prekey_id(4) belong to the account.
var shardKeys = &store.KeySpace{
	Store:    ShardStoreName,
	Prefixes: [][]byte{{store.PrefixKeys, 's'}, {store.PrefixKeys, 'o'}},
	Owner:    func(key []byte) (store.Owner, bool) { return store.AccountOf(key, 2, true) },
	Clear: func(_ pebble.Reader, o store.Owner) ([][2][]byte, error) {
		return [][2][]byte{
			store.PrefixRange(append([]byte{store.PrefixKeys, 's'}, o.Account+"\x00"...)),
			store.PrefixRange(append([]byte{store.PrefixKeys, 'o'}, o.Account+"\x00"...)),
		}, nil
	},
}

// ShardStore returns the name of this store in ShardRecords.
func (s *Store) ShardStore() string { return ShardStoreName }

// ExportShard emits the device keys and one-time prekeys of the accounts f
// selects, from one snapshot.
func (s *Store) ExportShard(ctx context.Context, f store.ShardFilter, emit func(*storepb.ShardRecord) error) error {
	snap := s.db.NewSnapshot()
	defer snap.Close()
	return store.ExportKeys(ctx, snap, shardKeys, f, emit)
}

// ImportShard replaces the keys of the accounts of recs with recs, in one
// synced batch, holding every device lock (in stripe order, as lockDevices
// does).
func (s *Store) ImportShard(ctx context.Context, recs []*storepb.ShardRecord) error {
	defer store.LockStripes(s.locks[:])()
	_, err := store.ImportKeys(ctx, s.db, shardKeys, recs)
	return err
}

// DropShard deletes the keys of the accounts f selects, in one synced
// batch.
func (s *Store) DropShard(ctx context.Context, f store.ShardFilter) error {
	defer store.LockStripes(s.locks[:])()
	_, err := store.DropKeys(ctx, s.db, shardKeys, f)
	return err
}
