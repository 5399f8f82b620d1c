// Package cluster is the coordination layer of cluster mode: a fixed number
// of virtual shards, leases on them with fencing epochs kept in Redis, the
// local Fence every write for a shard is checked against, the device and
// node registry, and the cluster status. See docs/cluster.md.
//
// The data of a shard (inboxes, keys, device lists) stays in its owner's
// Pebble; this package decides who the owner is and makes sure a node that
// is not (any more) the owner cannot write. Routing sockets and sends to the
// owner is the relay's job and builds on this package.
package cluster

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/cespare/xxhash/v2"
)

// DefaultShards is the shard count of a cluster created without one. It is
// fixed for the life of the cluster: it is stored in Redis (and in every
// member's Pebble) at creation and a node configured with another count
// refuses to join.
const DefaultShards = 256

// MaxShards bounds the shard count (status and scans are O(shards)).
const MaxShards = 1 << 16

// ErrShardCount is returned when a shard count is out of range or differs
// from the cluster's.
var ErrShardCount = errors.New("cluster: shard count")

// ShardID names a virtual shard, 0 ≤ id < count.
type ShardID uint32

func (s ShardID) String() string { return strconv.FormatUint(uint64(s), 10) }

// ShardMap maps accounts and groups to shards. The hash is stable across
// versions and platforms: XXH64 with seed 0 (github.com/cespare/xxhash/v2)
// of the key bytes, modulo the shard count:
//
//	account: xxh64(username as UTF-8)      mod count
//	group:   xxh64(group id, its 16 bytes) mod count
//
// The mapping never changes for a cluster; moving load means moving whole
// shards between nodes, never rehashing. TestShardMapStable pins values.
type ShardMap struct{ n uint64 }

// NewShardMap returns the map of a cluster with count shards.
func NewShardMap(count int) (ShardMap, error) {
	if count < 1 || count > MaxShards {
		return ShardMap{}, fmt.Errorf("%w: %d not in 1..%d", ErrShardCount, count, MaxShards)
	}
	return ShardMap{n: uint64(count)}, nil
}

// Count is the number of shards.
func (m ShardMap) Count() int { return int(m.n) }

// Account returns the shard of an account.
func (m ShardMap) Account(username string) ShardID {
	return ShardID(xxhash.Sum64String(username) % m.n)
}

// Group returns the shard of a group (its membership record).
func (m ShardMap) Group(id [16]byte) ShardID {
	return ShardID(xxhash.Sum64(id[:]) % m.n)
}
