package store

// Shard moves: the store side (docs/cluster.md, "Moving a shard: the store
// side"). Each store package that owns keys exports, imports and drops the
// records of the shards a ShardFilter selects. The simple stores (device,
// keys, group, push, presence) describe their keys with a KeySpace and use
// ExportKeys, ImportKeys and DropKeys; the inbox has its own (its bodies
// have node-local ids and its writes go through its committer).

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store/storepb"
)

// ShardFilter selects the records of one or more shards.
type ShardFilter struct {
	Account func(username string) bool // the account's shard is moving
	Group   func(id []byte) bool       // the group's (16-byte id) shard is moving
}

// Owner is who a record belongs to: an account (Account set) or a group
// (Group set, its 16-byte id as a string).
type Owner struct {
	Account string
	Group   string
}

// Owns reports whether the owner's shard is selected. A nil function
// selects nothing.
func (f ShardFilter) Owns(o Owner) bool {
	if o.Group != "" {
		return f.Group != nil && f.Group([]byte(o.Group))
	}
	return o.Account != "" && f.Account != nil && f.Account(o.Account)
}

// GroupIDSize is the length of a group id (package group's IDSize).
const GroupIDSize = 16

// ConversationOwner returns the owner of a conversation sequence counter
// ('q' key): "d:A:B" belongs to the lower of the two names (the 1:1 router
// assigns its sequence numbers on the lower name's shard), "g:" + 32 hex
// characters to the group. ok is false for any other form.
func ConversationOwner(conv string) (o Owner, ok bool) {
	switch {
	case strings.HasPrefix(conv, "d:"):
		a, b, found := strings.Cut(conv[2:], ":")
		if !found || a == "" || b == "" || strings.Contains(b, ":") {
			return Owner{}, false
		}
		return Owner{Account: min(a, b)}, true
	case strings.HasPrefix(conv, "g:"):
		id, err := hex.DecodeString(conv[2:])
		if err != nil || len(id) != GroupIDSize {
			return Owner{}, false
		}
		return Owner{Group: string(id)}, true
	}
	return Owner{}, false
}

// ErrShardRecord wraps every rejected ShardRecord (import): a record of
// another store, a key outside the store's space, a value that does not
// decode. Nothing of such an import is written.
var ErrShardRecord = errors.New("store: bad shard record")

// KeySpace describes the keys of one simple store for shard moves.
type KeySpace struct {
	// Store is the name records carry ("device", "keys", ...).
	Store string
	// Prefixes are the key prefixes the store owns.
	Prefixes [][]byte
	// Owner returns who a key (under one of Prefixes) belongs to; ok false
	// for a key that belongs to no shard (not exported, not dropped, and
	// rejected on import).
	Owner func(key []byte) (Owner, bool)
	// Clear returns the keys of o's records on r as [lo, hi) ranges: what an
	// import removes before it writes o's records, so that importing the
	// same records twice leaves the same state.
	Clear func(r pebble.Reader, o Owner) ([][2][]byte, error)
}

func (ks *KeySpace) owns(key []byte) (Owner, bool) {
	for _, p := range ks.Prefixes {
		if bytes.HasPrefix(key, p) {
			return ks.Owner(key)
		}
	}
	return Owner{}, false
}

// ExportKeys emits every record under ks.Prefixes on r whose owner f
// selects, in key order. Pass a snapshot as r for a point-in-time copy.
func ExportKeys(ctx context.Context, r pebble.Reader, ks *KeySpace, f ShardFilter, emit func(*storepb.ShardRecord) error) error {
	return ScanOwned(ctx, r, ks.Prefixes, ks.Owner, f, func(key, value []byte) error {
		return emit(&storepb.ShardRecord{Store: ks.Store, Key: slices.Clone(key), Value: slices.Clone(value)})
	})
}

// ScanOwned calls fn with every key and value under prefixes on r whose
// owner f selects (key and value are valid only during the call).
func ScanOwned(ctx context.Context, r pebble.Reader, prefixes [][]byte, owner func([]byte) (Owner, bool), f ShardFilter, fn func(key, value []byte) error) error {
	for _, p := range prefixes {
		it, err := r.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: PrefixEnd(p)})
		if err != nil {
			return fmt.Errorf("store: shard scan: %w", err)
		}
		n := 0
		for ok := it.First(); ok; ok = it.Next() {
			if n++; n%1024 == 0 {
				if err = ctx.Err(); err != nil {
					break
				}
			}
			o, ok := owner(it.Key())
			if !ok || !f.Owns(o) {
				continue
			}
			v, verr := it.ValueAndErr()
			if verr != nil {
				err = verr
				break
			}
			if err = fn(it.Key(), v); err != nil {
				break
			}
		}
		if err == nil {
			err = it.Error()
		}
		if cerr := it.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("store: shard scan: %w", err)
		}
	}
	return nil
}

// ImportKeys writes recs (all of store ks.Store) into db in one synced
// batch, after removing every record the owners of recs have there (their
// Clear ranges). It returns those owners, in no particular order. A record
// of another store or outside the key space fails the whole import with
// ErrShardRecord.
func ImportKeys(ctx context.Context, db *pebble.DB, ks *KeySpace, recs []*storepb.ShardRecord) ([]Owner, error) {
	owners := make(map[Owner]bool)
	var order []Owner
	for i, r := range recs {
		if r.GetStore() != ks.Store {
			return nil, fmt.Errorf("%w %d: store %q in an import of %q", ErrShardRecord, i, r.GetStore(), ks.Store)
		}
		o, ok := ks.owns(r.GetKey())
		if !ok {
			return nil, fmt.Errorf("%w %d: key %x is not a %s shard key", ErrShardRecord, i, r.GetKey(), ks.Store)
		}
		if !owners[o] {
			owners[o] = true
			order = append(order, o)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	b := db.NewBatch()
	defer b.Close()
	for _, o := range order {
		ranges, err := ks.Clear(db, o)
		if err != nil {
			return nil, fmt.Errorf("store: %s import: %w", ks.Store, err)
		}
		for _, rg := range ranges {
			if err := b.DeleteRange(rg[0], rg[1], nil); err != nil {
				return nil, fmt.Errorf("store: %s import: %w", ks.Store, err)
			}
		}
	}
	// Later writes of a batch win over its earlier range deletions.
	for _, r := range recs {
		if err := b.Set(r.Key, r.Value, nil); err != nil {
			return nil, fmt.Errorf("store: %s import: %w", ks.Store, err)
		}
	}
	if err := commitSync(b); err != nil {
		return nil, fmt.Errorf("store: %s import: %w", ks.Store, err)
	}
	return order, nil
}

// DropKeys deletes every record under ks.Prefixes whose owner f selects, in
// one synced batch, and returns the owners it deleted records of.
func DropKeys(ctx context.Context, db *pebble.DB, ks *KeySpace, f ShardFilter) ([]Owner, error) {
	b := db.NewBatch()
	defer b.Close()
	seen := make(map[Owner]bool)
	var owners []Owner
	err := ScanOwned(ctx, db, ks.Prefixes, func(key []byte) (Owner, bool) {
		o, ok := ks.Owner(key)
		if ok && f.Owns(o) && !seen[o] {
			seen[o] = true
			owners = append(owners, o)
		}
		return o, ok
	}, f, func(key, _ []byte) error { return b.Delete(key, nil) })
	if err != nil {
		return nil, fmt.Errorf("store: %s drop: %w", ks.Store, err)
	}
	if b.Empty() {
		return nil, nil
	}
	if err := commitSync(b); err != nil {
		return nil, fmt.Errorf("store: %s drop: %w", ks.Store, err)
	}
	return owners, nil
}

func commitSync(b *pebble.Batch) (err error) {
	defer RecoverFatal(&err)
	return b.Commit(pebble.Sync)
}

// PrefixEnd returns the smallest key greater than every key starting with
// p (nil if there is none: p is all 0xff).
func PrefixEnd(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		end[i]++
		if end[i] != 0 {
			return end[:i+1]
		}
	}
	return nil
}

// ExactKey is the [lo, hi) range holding only key.
func ExactKey(key []byte) [2][]byte {
	return [2][]byte{key, append(bytes.Clone(key), 0)}
}

// PrefixRange is the [lo, hi) range of every key starting with p.
func PrefixRange(p []byte) [2][]byte { return [2][]byte{p, PrefixEnd(p)} }

// AccountOf parses key = prefix(n bytes) username [0x00 rest]: with sep,
// the username ends at the first 0x00 (which must be there); without, it
// is the rest of the key. ok is false for an empty name.
func AccountOf(key []byte, n int, sep bool) (Owner, bool) {
	if len(key) <= n {
		return Owner{}, false
	}
	rest := key[n:]
	if sep {
		i := bytes.IndexByte(rest, 0)
		if i < 1 {
			return Owner{}, false
		}
		rest = rest[:i]
	} else if bytes.IndexByte(rest, 0) >= 0 {
		return Owner{}, false
	}
	return Owner{Account: string(rest)}, true
}

// LockStripes locks every stripe of a striped lock, in order (so it cannot
// deadlock with a writer taking several stripes in order), and returns the
// unlock: stores hold them all while they import or drop a shard.
func LockStripes(locks []sync.Mutex) (unlock func()) {
	for i := range locks {
		locks[i].Lock()
	}
	return func() {
		for i := range locks {
			locks[i].Unlock()
		}
	}
}
