package cluster

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
)

// ErrStore wraps failures of the node's own cluster records.
var ErrStore = errors.New("cluster: store")

// Key layout under store.PrefixCluster ('e'), all written with Sync:
//
//	'e' 'c'              shard count (4) + cluster id: the cluster this data dir belongs to
//	'e' 'n'              the node id this data dir belongs to
//	'e' 's' shard(4)     ShardRecord: seen epoch (8) + home epoch (8)
var (
	keyCluster = []byte{store.PrefixCluster, 'c'}
	keyNodeID  = []byte{store.PrefixCluster, 'n'}
)

func shardKey(s ShardID) []byte {
	return binary.BigEndian.AppendUint32([]byte{store.PrefixCluster, 's'}, uint32(s))
}

// ShardRecord is what a node remembers about a shard across restarts and
// across Redis losing everything.
type ShardRecord struct {
	// Seen is the highest epoch this node ever saw for the shard (its own
	// acquisitions and other holders' leases). A re-registration asks for
	// an epoch above it, so epochs never go backwards.
	Seen uint64
	// Home is the epoch at which this node last acquired the shard, while it
	// considers itself the shard's home (its data is here); 0 if not. Only a
	// home may acquire a shard that was owned before.
	Home uint64
}

// ClusterRecord is the cluster this data dir joined.
type ClusterRecord struct {
	ID     string
	Shards int
}

// Store keeps a node's cluster records in its Pebble. Safe for concurrent
// use.
type Store struct {
	db *pebble.DB
	mu sync.Mutex // serializes read-modify-write of shard records
}

// NewStore returns the cluster records in db (the node's one database).
func NewStore(db *pebble.DB) *Store { return &Store{db: db} }

func (s *Store) get(k []byte) ([]byte, bool, error) {
	v, c, err := s.db.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("%w: %w", ErrStore, err)
	}
	out := append([]byte(nil), v...)
	_ = c.Close()
	return out, true, nil
}

func (s *Store) set(k, v []byte) error {
	if err := s.db.Set(k, v, pebble.Sync); err != nil {
		return fmt.Errorf("%w: %w", ErrStore, err)
	}
	return nil
}

// Cluster returns the cluster this data dir joined, if any.
func (s *Store) Cluster() (ClusterRecord, bool, error) {
	v, ok, err := s.get(keyCluster)
	if err != nil || !ok {
		return ClusterRecord{}, false, err
	}
	if len(v) < 5 {
		return ClusterRecord{}, false, fmt.Errorf("%w: cluster record of %d bytes", ErrStore, len(v))
	}
	return ClusterRecord{Shards: int(binary.BigEndian.Uint32(v)), ID: string(v[4:])}, true, nil
}

// SetCluster records the cluster this data dir joined.
func (s *Store) SetCluster(c ClusterRecord) error {
	return s.set(keyCluster, append(binary.BigEndian.AppendUint32(nil, uint32(c.Shards)), c.ID...))
}

// NodeID returns the node id bound to this data dir, if any.
func (s *Store) NodeID() (string, bool, error) {
	v, ok, err := s.get(keyNodeID)
	return string(v), ok, err
}

// SetNodeID binds this data dir to a node id.
func (s *Store) SetNodeID(id string) error { return s.set(keyNodeID, []byte(id)) }

func decodeShardRecord(v []byte) (ShardRecord, error) {
	if len(v) != 16 {
		return ShardRecord{}, fmt.Errorf("%w: shard record of %d bytes", ErrStore, len(v))
	}
	return ShardRecord{Seen: binary.BigEndian.Uint64(v), Home: binary.BigEndian.Uint64(v[8:])}, nil
}

func (r ShardRecord) encode() []byte {
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(make([]byte, 0, 16), r.Seen), r.Home)
}

// Shard returns the record of one shard (zero if none).
func (s *Store) Shard(shard ShardID) (ShardRecord, error) {
	v, ok, err := s.get(shardKey(shard))
	if err != nil || !ok {
		return ShardRecord{}, err
	}
	return decodeShardRecord(v)
}

// Shards returns every shard record.
func (s *Store) Shards() (map[ShardID]ShardRecord, error) {
	lo := []byte{store.PrefixCluster, 's'}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: []byte{store.PrefixCluster, 's' + 1}})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrStore, err)
	}
	out := make(map[ShardID]ShardRecord)
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		if len(k) != 6 {
			continue
		}
		r, err := decodeShardRecord(it.Value())
		if err != nil {
			_ = it.Close()
			return nil, err
		}
		out[ShardID(binary.BigEndian.Uint32(k[2:]))] = r
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrStore, err)
	}
	return out, nil
}

// update applies fn to shard's record and writes it (with Sync) if changed.
func (s *Store) update(shard ShardID, fn func(*ShardRecord)) (ShardRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, err := s.Shard(shard)
	if err != nil {
		return r, err
	}
	n := r
	fn(&n)
	if n == r {
		return r, nil
	}
	return n, s.set(shardKey(shard), n.encode())
}

// Observe raises the shard's seen epoch to epoch.
func (s *Store) Observe(shard ShardID, epoch uint64) error {
	_, err := s.update(shard, func(r *ShardRecord) { r.Seen = max(r.Seen, epoch) })
	return err
}

// SetHome records that this node acquired shard at epoch and holds its data.
// It is durable before the node serves the shard at that epoch.
func (s *Store) SetHome(shard ShardID, epoch uint64) error {
	_, err := s.update(shard, func(r *ShardRecord) { r.Seen, r.Home = max(r.Seen, epoch), epoch })
	return err
}

// ClearHome records that shard's data is no longer this node's to serve
// (another node acquired it at a higher epoch).
func (s *Store) ClearHome(shard ShardID) error {
	_, err := s.update(shard, func(r *ShardRecord) { r.Home = 0 })
	return err
}
