// Package shardmove runs the store side of a shard move over every store
// of a node: Export on the source, Import on the target, Drop on the
// source (docs/cluster.md, "Moving a shard: the store side"). It knows the
// stores only through Store; the orchestration (fencing, streaming between
// nodes, the lease) is the caller's.
package shardmove

import (
	"context"
	"errors"
	"fmt"

	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
)

// Store is what a store package offers for shard moves (device, keys,
// inbox, group, push and presence implement it).
type Store interface {
	// ShardStore is the store's name in ShardRecord.store.
	ShardStore() string
	// ExportShard emits every record of the shards f selects, from one
	// snapshot.
	ExportShard(ctx context.Context, f store.ShardFilter, emit func(*storepb.ShardRecord) error) error
	// ImportShard writes records of this store (all of a shard's, in one
	// call) durably, replacing what the target held of their owners.
	ImportShard(ctx context.Context, recs []*storepb.ShardRecord) error
	// DropShard deletes every record of the shards f selects.
	DropShard(ctx context.Context, f store.ShardFilter) error
}

// ErrUnknownStore: a record names a store that is not among the stores.
var ErrUnknownStore = errors.New("shardmove: record of an unknown store")

// Export runs ExportShard on each store in turn. Each store's records come
// from its own snapshot: the caller fences the shard's writes first, so
// that the snapshots together are one point in time.
func Export(ctx context.Context, stores []Store, f store.ShardFilter, emit func(*storepb.ShardRecord) error) error {
	for _, s := range stores {
		if err := s.ExportShard(ctx, f, emit); err != nil {
			return fmt.Errorf("shardmove: export %s: %w", s.ShardStore(), err)
		}
	}
	return nil
}

// Import hands each store its records (grouped by ShardRecord.store, in
// their order) and runs ImportShard on every store that has some. A record
// of a store not among stores fails the import before anything is written.
// Each store's import is atomic and idempotent, so after a failure the
// caller imports the same records again.
func Import(ctx context.Context, stores []Store, recs []*storepb.ShardRecord) error {
	byStore := make(map[string][]*storepb.ShardRecord, len(stores))
	for _, s := range stores {
		byStore[s.ShardStore()] = nil
	}
	for i, r := range recs {
		name := r.GetStore()
		if _, ok := byStore[name]; !ok {
			return fmt.Errorf("%w: record %d: %q", ErrUnknownStore, i, name)
		}
		byStore[name] = append(byStore[name], r)
	}
	for _, s := range stores {
		rs := byStore[s.ShardStore()]
		if len(rs) == 0 {
			continue
		}
		if err := s.ImportShard(ctx, rs); err != nil {
			return fmt.Errorf("shardmove: import %s: %w", s.ShardStore(), err)
		}
	}
	return nil
}

// Drop runs DropShard on each store in turn (on the source, once the
// target holds the shard durably). It is idempotent: after a failure, run
// it again.
func Drop(ctx context.Context, stores []Store, f store.ShardFilter) error {
	for _, s := range stores {
		if err := s.DropShard(ctx, f); err != nil {
			return fmt.Errorf("shardmove: drop %s: %w", s.ShardStore(), err)
		}
	}
	return nil
}
