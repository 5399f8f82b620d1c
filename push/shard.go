package push

import (
	"context"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
)

// ShardStoreName is the store name of this package's ShardRecords.
const ShardStoreName = "push"

// shardKeys: 'p' username 0x00 device(4) belongs to the account.
var shardKeys = &store.KeySpace{
	Store:    ShardStoreName,
	Prefixes: [][]byte{{store.PrefixPush}},
	Owner:    func(key []byte) (store.Owner, bool) { return store.AccountOf(key, 1, true) },
	Clear: func(_ pebble.Reader, o store.Owner) ([][2][]byte, error) {
		return [][2][]byte{store.PrefixRange(append([]byte{store.PrefixPush}, o.Account+"\x00"...))}, nil
	},
}

// ShardStore returns the name of this store in ShardRecords.
func (s *Store) ShardStore() string { return ShardStoreName }

// ExportShard emits the push registrations of the accounts f selects, from
// one snapshot.
func (s *Store) ExportShard(ctx context.Context, f store.ShardFilter, emit func(*storepb.ShardRecord) error) error {
	snap := s.db.NewSnapshot()
	defer snap.Close()
	return store.ExportKeys(ctx, snap, shardKeys, f, emit)
}

// ImportShard replaces the registrations of the accounts of recs with
// recs, in one synced batch, holding every device lock.
func (s *Store) ImportShard(ctx context.Context, recs []*storepb.ShardRecord) error {
	defer store.LockStripes(s.locks[:])()
	_, err := store.ImportKeys(ctx, s.db, shardKeys, recs)
	return err
}

// DropShard deletes the registrations of the accounts f selects, in one
// synced batch.
func (s *Store) DropShard(ctx context.Context, f store.ShardFilter) error {
	defer store.LockStripes(s.locks[:])()
	_, err := store.DropKeys(ctx, s.db, shardKeys, f)
	return err
}
