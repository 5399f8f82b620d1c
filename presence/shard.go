package presence

import (
	"context"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
)

// ShardStoreName is the store name of this package's ShardRecords.
const ShardStoreName = "presence"

// shardKeys: 'o' 's' username (last seen) and 'o' 'v' username (privacy)
// belong to the account. Online state and subscriptions live in the
// Tracker's memory and do not move.
var shardKeys = &store.KeySpace{
	Store:    ShardStoreName,
	Prefixes: [][]byte{{store.PrefixPresence, subLastSeen}, {store.PrefixPresence, subPrivacy}},
	Owner:    func(k []byte) (store.Owner, bool) { return store.AccountOf(k, 2, false) },
	Clear: func(_ pebble.Reader, o store.Owner) ([][2][]byte, error) {
		return [][2][]byte{store.ExactKey(key(subLastSeen, o.Account)), store.ExactKey(key(subPrivacy, o.Account))}, nil
	},
}

// ShardStore returns the name of this store in ShardRecords.
func (s *Store) ShardStore() string { return ShardStoreName }

// ExportShard emits the last-seen times and privacy settings of the
// accounts f selects, from one snapshot.
func (s *Store) ExportShard(ctx context.Context, f store.ShardFilter, emit func(*storepb.ShardRecord) error) error {
	snap := s.db.NewSnapshot()
	defer snap.Close()
	return store.ExportKeys(ctx, snap, shardKeys, f, emit)
}

// ImportShard replaces the presence records of the accounts of recs with
// recs, in one synced batch.
func (s *Store) ImportShard(ctx context.Context, recs []*storepb.ShardRecord) error {
	_, err := store.ImportKeys(ctx, s.db, shardKeys, recs)
	return err
}

// DropShard deletes the presence records of the accounts f selects, in one
// synced batch.
func (s *Store) DropShard(ctx context.Context, f store.ShardFilter) error {
	_, err := store.DropKeys(ctx, s.db, shardKeys, f)
	return err
}
