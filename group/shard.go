package group

import (
	"context"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"google.golang.org/protobuf/proto"
)

// ShardStoreName is the store name of this package's ShardRecords.
const ShardStoreName = "group"

// shardKeys: the record 'g' 'r' id(16) and the member index keys
// 'g' 'u' username 0x00 id(16) belong to the GROUP (the index is written
// with the record, and a group lives on one node).
var shardKeys = &store.KeySpace{
	Store:    ShardStoreName,
	Prefixes: [][]byte{{store.PrefixGroup, subRecord}, {store.PrefixGroup, subMember}},
	Owner:    shardOwner,
	Clear:    clearGroup,
}

func shardOwner(key []byte) (store.Owner, bool) {
	if len(key) < 2 {
		return store.Owner{}, false
	}
	switch key[1] {
	case subRecord:
		if len(key) != 2+IDSize {
			return store.Owner{}, false
		}
	case subMember:
		if o, ok := store.AccountOf(key, 2, true); !ok || len(key) != 2+len(o.Account)+1+IDSize {
			return store.Owner{}, false
		}
	default:
		return store.Owner{}, false
	}
	return store.Owner{Group: string(key[len(key)-IDSize:])}, true
}

// clearGroup returns the keys of group o on r: its record and the member
// index keys of the members the record names.
func clearGroup(r pebble.Reader, o store.Owner) ([][2][]byte, error) {
	var id [IDSize]byte
	copy(id[:], o.Group)
	out := [][2][]byte{store.ExactKey(recordKey(id))}
	v, closer, err := r.Get(recordKey(id))
	if errors.Is(err, pebble.ErrNotFound) {
		return out, nil
	}
	if err != nil {
		return nil, internal("read group", err)
	}
	defer closer.Close()
	g := &storepb.Group{}
	if err := proto.Unmarshal(v, g); err != nil {
		return nil, internal("decode group", err)
	}
	for _, m := range g.Members {
		out = append(out, store.ExactKey(memberKey(m.Username, id)))
	}
	return out, nil
}

// ShardStore returns the name of this store in ShardRecords.
func (s *Store) ShardStore() string { return ShardStoreName }

// ExportShard emits the records and member index keys of the groups f
// selects, from one snapshot.
func (s *Store) ExportShard(ctx context.Context, f store.ShardFilter, emit func(*storepb.ShardRecord) error) error {
	snap := s.db.NewSnapshot()
	defer snap.Close()
	return store.ExportKeys(ctx, snap, shardKeys, f, emit)
}

// ImportShard replaces the groups of recs (their records and member index
// keys) with recs, in one synced batch, holding every group lock.
func (s *Store) ImportShard(ctx context.Context, recs []*storepb.ShardRecord) error {
	for i, r := range recs {
		if len(r.GetKey()) == 2+IDSize && r.GetKey()[1] == subRecord {
			if err := proto.Unmarshal(r.GetValue(), &storepb.Group{}); err != nil {
				return fmt.Errorf("%w %d: group record: %w", store.ErrShardRecord, i, err)
			}
		}
	}
	defer store.LockStripes(s.locks[:])()
	_, err := store.ImportKeys(ctx, s.db, shardKeys, recs)
	return err
}

// DropShard deletes the records and member index keys of the groups f
// selects, in one synced batch.
func (s *Store) DropShard(ctx context.Context, f store.ShardFilter) error {
	defer store.LockStripes(s.locks[:])()
	_, err := store.DropKeys(ctx, s.db, shardKeys, f)
	return err
}
