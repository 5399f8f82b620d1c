package inbox

// Shard moves (docs/cluster.md, "Moving a shard: the store side").
//
// Records of a shard: the entries 'i', metas 'm', dedup records 'd' and
// marker index keys 'x' of every device of the shard's accounts, and the
// sequence counters 'q' the shard owns (store.ConversationOwner: "d:A:B" is
// the lower name's, "g:<hex>" the group's). The shared bodies ('c') the
// shard's entries refer to are exported with them, once each, carrying the
// number of the shard's entries that refer to them; the importer gives them
// new ids in its own counter space. Fan-out jobs ('f') never move: Export
// and Drop refuse (ErrFanoutPending) while a job still has to write entries
// for the shard's devices.
//
// Export takes its snapshot on the committer (so the fan-out check and the
// snapshot agree) and reads it on the caller's goroutine. Import and Drop
// are committer ops: they delete through the normal path (deleteDevice,
// which drops body references and deletes bodies at zero), and write
// counters and device state through the group, so nothing the committer
// keeps goes stale.

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// ShardStoreName is the store name of this package's ShardRecords.
const ShardStoreName = "inbox"

// ErrFanoutPending: a fan-out job still has entries to write for a device
// of the shard, so the shard cannot be exported (or dropped) yet. It comes
// wrapped in a retryable UNAVAILABLE *wire.Error; the mover retries after a
// moment (jobs expand a chunk per commit, so they finish quickly once the
// shard's writes are fenced).
var ErrFanoutPending = errors.New("inbox: a group fan-out to the shard is still expanding")

func fanoutPending() error {
	return fmt.Errorf("%w: %w", &wire.Error{Code: wirepb.ErrorCode_UNAVAILABLE, Message: "inbox: fan-out pending",
		Retryable: true, RetryAfterMs: 100}, ErrFanoutPending)
}

// shardDevPrefixes are the prefixes of keys that start with username 0x00
// device(4).
var shardDevPrefixes = [][]byte{{prefixInbox}, {prefixMeta}, {prefixDedup}, {prefixMarker}}

func devOwner(key []byte) (store.Owner, bool) { return store.AccountOf(key, 1, true) }

func seqOwner(key []byte) (store.Owner, bool) { return store.ConversationOwner(string(key[1:])) }

// dropChunk is how many devices one Drop op deletes.
const dropChunk = 64

// ShardStore returns the name of this store in ShardRecords.
func (s *Store) ShardStore() string { return ShardStoreName }

// fanPending reports whether a queued fan-out job (committed or queued by
// this group) still has entries to write for a device f selects.
func (g *group) fanPending(f store.ShardFilter) bool {
	hit := func(to []wire.DeviceAddr) bool {
		return slices.ContainsFunc(to, func(d wire.DeviceAddr) bool { return f.Owns(store.Owner{Account: d.Account}) })
	}
	for _, j := range g.s.fan.jobs {
		if hit(j.to[j.next:]) {
			return true
		}
	}
	for _, j := range g.fanNew {
		if hit(j.to) {
			return true
		}
	}
	return false
}

// ExportShard emits every inbox record of the shard f selects, from one
// snapshot of the state after the last commit: entries, metas, dedup
// records and marker index keys of the shard's accounts, its sequence
// counters, then each shared body the entries refer to, once, with the
// number of those entries (ShardRecord.body_refs). If a fan-out job still
// has entries to write for the shard, it emits nothing and returns an
// error matching ErrFanoutPending (retry later).
func (s *Store) ExportShard(ctx context.Context, f store.ShardFilter, emit func(*storepb.ShardRecord) error) error {
	var snap *pebble.Snapshot
	err := s.do(ctx, func(g *group) error {
		if g.fanPending(f) {
			return fanoutPending()
		}
		snap = s.db.NewSnapshot() // the last commit: this group's writes are not in it
		return nil
	})
	if err != nil {
		if snap != nil {
			_ = snap.Close() // the op ran, then its group failed
		}
		return err
	}
	defer snap.Close()
	refs := make(map[uint64]uint32)
	err = store.ScanOwned(ctx, snap, shardDevPrefixes, devOwner, f, func(k, v []byte) error {
		if k[0] == prefixInbox {
			if id := parseEntry(v).bodyID; id != 0 {
				refs[id]++
			}
		}
		return emit(&storepb.ShardRecord{Store: ShardStoreName, Key: bytes.Clone(k), Value: bytes.Clone(v)})
	})
	if err == nil {
		err = store.ScanOwned(ctx, snap, [][]byte{{prefixSeq}}, seqOwner, f, func(k, v []byte) error {
			return emit(&storepb.ShardRecord{Store: ShardStoreName, Key: bytes.Clone(k), Value: bytes.Clone(v)})
		})
	}
	if err != nil {
		return fmt.Errorf("inbox: export shard: %w", err)
	}
	for _, id := range slices.Sorted(maps.Keys(refs)) {
		br := &storepb.BodyRefs{}
		found, err := getProto(snap, bodyRefsKey(id), br)
		if err != nil {
			return err
		}
		body, closer, err := snap.Get(bodyKey(id))
		if err != nil || !found {
			if err == nil {
				closer.Close()
				err = errors.New("no reference count")
			}
			return storageErr("export shard", fmt.Errorf("body %d: %w", id, err))
		}
		rec := &storepb.ShardRecord{Store: ShardStoreName, Key: bodyKey(id), Value: bytes.Clone(body),
			BodyRefs: refs[id], BodyTimeMs: br.ServerTimeMs}
		closer.Close()
		if err := emit(rec); err != nil {
			return err
		}
	}
	return nil
}

// shardImport is a validated set of inbox ShardRecords.
type shardImport struct {
	accounts []string                               // distinct, sorted
	devs     map[wire.DeviceAddr]*storepb.InboxMeta // every device with a record (nil: no meta)
	entries  []importEntry
	dedup    []importDedup
	markers  []importMarker
	seqs     []importSeq
	bodies   []importBody // by source id
}

type importEntry struct {
	dev  wire.DeviceAddr
	id   uint64
	val  []byte
	meta entryMeta
}

type importDedup struct {
	dev wire.DeviceAddr
	id  string
	rec *storepb.SendRecord
}

type importMarker struct {
	dev     wire.DeviceAddr
	key     string
	id, seq uint64
}

type importSeq struct {
	conv string
	v    uint64
}

type importBody struct {
	src    uint64
	val    []byte
	refs   uint32
	timeMs int64
}

// parseShardImport validates recs: each must be an inbox record with a key
// of the shard layout and a value that decodes; the entries referring to
// each body must number its body_refs; each device with entries must have
// its meta, counting them.
func parseShardImport(recs []*storepb.ShardRecord) (*shardImport, error) {
	imp := &shardImport{devs: make(map[wire.DeviceAddr]*storepb.InboxMeta)}
	bad := func(i int, format string, args ...any) error {
		return fmt.Errorf("%w %d: %s", store.ErrShardRecord, i, fmt.Sprintf(format, args...))
	}
	accounts := make(map[string]bool)
	for i, r := range recs {
		if r.GetStore() != ShardStoreName {
			return nil, bad(i, "store %q in an inbox import", r.GetStore())
		}
		k, v := r.GetKey(), r.GetValue()
		if len(k) == 0 {
			return nil, bad(i, "empty key")
		}
		switch k[0] {
		case prefixInbox, prefixMeta, prefixDedup, prefixMarker:
			dev, rest, ok := parseDevKey(k)
			if !ok {
				return nil, bad(i, "key %x", k)
			}
			accounts[dev.Account] = true
			if _, seen := imp.devs[dev]; !seen {
				imp.devs[dev] = nil
			}
			switch k[0] {
			case prefixInbox:
				m := parseEntry(v)
				if len(rest) != entryIDBytes || m.refAt == 0 || proto.Unmarshal(v[:m.refAt], &wirepb.Envelope{}) != nil {
					return nil, bad(i, "entry %x", k)
				}
				imp.entries = append(imp.entries, importEntry{dev: dev, id: entryID(k), val: v, meta: m})
			case prefixMeta:
				meta := &storepb.InboxMeta{}
				if len(rest) != 0 || proto.Unmarshal(v, meta) != nil || imp.devs[dev] != nil {
					return nil, bad(i, "meta %x", k)
				}
				imp.devs[dev] = meta
			case prefixDedup:
				rec := &storepb.SendRecord{}
				if len(rest) == 0 || proto.Unmarshal(v, rec) != nil {
					return nil, bad(i, "dedup record %x", k)
				}
				imp.dedup = append(imp.dedup, importDedup{dev: dev, id: string(rest), rec: rec})
			case prefixMarker:
				if len(rest) == 0 || len(v) != 16 {
					return nil, bad(i, "marker %x", k)
				}
				imp.markers = append(imp.markers, importMarker{dev: dev, key: string(rest),
					id: binary.BigEndian.Uint64(v[:8]), seq: binary.BigEndian.Uint64(v[8:])})
			}
		case prefixSeq:
			if _, ok := seqOwner(k); !ok || len(v) != 8 {
				return nil, bad(i, "sequence %x", k)
			}
			imp.seqs = append(imp.seqs, importSeq{conv: string(k[1:]), v: binary.BigEndian.Uint64(v)})
		case prefixBody:
			if len(k) != 10 || k[9] != 'b' || binary.BigEndian.Uint64(k[1:9]) == 0 || r.GetBodyRefs() == 0 ||
				proto.Unmarshal(v, &wirepb.Envelope{}) != nil {
				return nil, bad(i, "body %x", k)
			}
			imp.bodies = append(imp.bodies, importBody{src: binary.BigEndian.Uint64(k[1:9]), val: v,
				refs: r.GetBodyRefs(), timeMs: r.GetBodyTimeMs()})
		default:
			return nil, bad(i, "key %x is not an inbox shard key", k)
		}
	}
	slices.SortFunc(imp.bodies, func(a, b importBody) int { return cmp.Compare(a.src, b.src) })
	refs := make(map[uint64]uint32, len(imp.bodies))
	for i, b := range imp.bodies {
		if i > 0 && imp.bodies[i-1].src == b.src {
			return nil, fmt.Errorf("%w: body %d twice", store.ErrShardRecord, b.src)
		}
		refs[b.src] = 0
	}
	count := make(map[wire.DeviceAddr]uint64)
	for _, e := range imp.entries {
		if e.meta.bodyID != 0 {
			n, ok := refs[e.meta.bodyID]
			if !ok {
				return nil, fmt.Errorf("%w: entry %d of %s refers to body %d, not in the import", store.ErrShardRecord, e.id, e.dev, e.meta.bodyID)
			}
			refs[e.meta.bodyID] = n + 1
		}
		count[e.dev]++
		if m := imp.devs[e.dev]; m == nil || m.LastId < e.id {
			return nil, fmt.Errorf("%w: entry %d of %s without a meta that covers it", store.ErrShardRecord, e.id, e.dev)
		}
	}
	for _, b := range imp.bodies {
		if refs[b.src] != b.refs {
			return nil, fmt.Errorf("%w: body %d has %d references in the import, %d declared", store.ErrShardRecord, b.src, refs[b.src], b.refs)
		}
	}
	for dev, m := range imp.devs {
		if m != nil && m.Count != count[dev] {
			return nil, fmt.Errorf("%w: meta of %s counts %d entries, the import has %d", store.ErrShardRecord, dev, m.Count, count[dev])
		}
	}
	imp.accounts = slices.Sorted(maps.Keys(accounts))
	return imp, nil
}

// ImportShard writes inbox records of a shard (from ExportShard on another
// node, all of them in one call) in one synced commit on the committer.
// It first deletes whatever the target holds of the accounts in recs (as
// DeleteDevice does, bodies included), so importing the same records twice
// leaves the same state. Each body gets a new id from this node's counter
// and the entries' references are rewritten (their sizes, and so the metas'
// bytes, follow the new id's encoding). Sequence counters are overwritten.
// Invalid records fail the import with store.ErrShardRecord, writing
// nothing.
func (s *Store) ImportShard(ctx context.Context, recs []*storepb.ShardRecord) error {
	imp, err := parseShardImport(recs)
	if err != nil {
		return err
	}
	if len(recs) == 0 {
		return nil
	}
	return s.do(ctx, func(g *group) error { return g.importShard(imp) })
}

// accountDevices returns the devices of account that have any inbox key in
// Pebble or state in this group.
func (g *group) accountDevices(account string) ([]wire.DeviceAddr, error) {
	seen := make(map[wire.DeviceAddr]bool)
	for a := range g.devs {
		if a.Account == account {
			seen[a] = true
		}
	}
	for _, p := range shardDevPrefixes {
		lo := append([]byte{p[0]}, account+"\x00"...)
		it, err := g.s.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: prefixEnd(lo)})
		if err != nil {
			return nil, storageErr("account devices", err)
		}
		for ok := it.First(); ok; {
			dev, _, valid := parseDevKey(it.Key())
			if !valid {
				ok = it.Next()
				continue
			}
			seen[dev] = true
			ok = it.SeekGE(prefixEnd(devPrefix(p[0], dev))) // the next device
		}
		err = it.Error()
		if cerr := it.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, storageErr("account devices", err)
		}
	}
	return slices.SortedFunc(maps.Keys(seen), func(a, b wire.DeviceAddr) int {
		return cmp.Or(cmp.Compare(a.Account, b.Account), cmp.Compare(a.Device, b.Device))
	}), nil
}

// wipe deletes every device in devs through deleteDevice. Once one has
// written, a failure fails the whole group (nothing half-done commits).
func (g *group) wipe(devs []wire.DeviceAddr) error {
	for i, d := range devs {
		if err := g.deleteDevice(d); err != nil {
			if i > 0 {
				g.fail(err)
			}
			return err
		}
	}
	return nil
}

// importShard is the op of ImportShard.
func (g *group) importShard(imp *shardImport) error {
	var devs []wire.DeviceAddr
	for _, a := range imp.accounts {
		ds, err := g.accountDevices(a)
		if err != nil {
			return err
		}
		devs = append(devs, ds...)
	}
	for d := range imp.devs {
		if !slices.Contains(devs, d) {
			devs = append(devs, d)
		}
	}
	bodies, err := g.counter(bodyCounterKey)
	if err != nil {
		return err
	}
	seqs := make([]*counter, len(imp.seqs))
	for i, q := range imp.seqs {
		if seqs[i], err = g.seq(q.conv); err != nil {
			return err
		}
	}
	if err := g.wipe(devs); err != nil {
		return err
	}
	// From here on the op only writes.
	newID := make(map[uint64]uint64, len(imp.bodies))
	for _, b := range imp.bodies {
		bodies.v++
		bodies.dirty = true
		newID[b.src] = bodies.v
		g.set(bodyKey(bodies.v), b.val)
		g.bodies[bodies.v] = &bodyState{refs: b.refs, timeMs: b.timeMs, known: true, dirty: true}
		g.count.bodiesStored++
	}
	metas := make(map[wire.DeviceAddr]*storepb.InboxMeta, len(imp.devs))
	for d, m := range imp.devs {
		if m != nil {
			metas[d] = proto.CloneOf(m)
		}
	}
	sizes := make(map[wire.DeviceAddr]map[uint64]int)
	for _, e := range imp.entries {
		ds := g.devs[e.dev]
		v := e.val
		if e.meta.bodyID != 0 {
			id := newID[e.meta.bodyID]
			v = withBodyRef(bytes.Clone(v[:e.meta.refAt]), id, e.meta.bodySize)
			ds.bodies = append(ds.bodies, id)
		}
		m := metas[e.dev]
		m.Bytes = m.Bytes - uint64(e.meta.size(e.val)) + uint64(len(v)+int(e.meta.bodySize))
		g.set(entryKey(e.dev, e.id), v)
		if sizes[e.dev] == nil {
			sizes[e.dev] = make(map[uint64]int)
		}
		sizes[e.dev][e.id] = len(v) + int(e.meta.bodySize)
	}
	for d, m := range metas {
		ds := g.devs[d]
		ds.meta, ds.dirty = m, true
	}
	for _, r := range imp.dedup {
		g.setDedup(g.devs[r.dev], r.id, r.rec)
	}
	for _, mk := range imp.markers {
		ds := g.devs[mk.dev]
		g.set(markerKey(mk.dev, mk.key), binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, mk.id), mk.seq))
		if ds.markers == nil {
			ds.markers = make(map[string]*marker)
		}
		ds.markers[mk.key] = nil // it points to an acked entry: none
		if size, ok := sizes[mk.dev][mk.id]; ok {
			ds.markers[mk.key] = &marker{id: mk.id, seq: mk.seq, size: size, fresh: true}
		}
	}
	for i, q := range imp.seqs {
		seqs[i].v, seqs[i].dirty = q.v, true
	}
	return nil
}

// DropShard deletes every inbox record of the shard f selects: each device
// of its accounts as DeleteDevice does (entries, meta, dedup records,
// marker index; the shared bodies lose those entries' references and go at
// zero), and the shard's sequence counters. It runs as committer ops of at
// most 64 devices each, every one synced; it fails with an error matching
// ErrFanoutPending, before deleting anything, while a fan-out job still has
// entries to write for the shard. Run it again after a failure: it is
// idempotent.
func (s *Store) DropShard(ctx context.Context, f store.ShardFilter) error {
	if err := s.readable(ctx); err != nil {
		return err
	}
	var devs []wire.DeviceAddr
	var convs []string
	seen := make(map[wire.DeviceAddr]bool)
	v := s.acquire()
	err := store.ScanOwned(ctx, v.snap, shardDevPrefixes, devOwner, f, func(k, _ []byte) error {
		if d, _, ok := parseDevKey(k); ok && !seen[d] {
			seen[d] = true
			devs = append(devs, d)
		}
		return nil
	})
	if err == nil {
		err = store.ScanOwned(ctx, v.snap, [][]byte{{prefixSeq}}, seqOwner, f, func(k, _ []byte) error {
			convs = append(convs, string(k[1:]))
			return nil
		})
	}
	v.release()
	if err != nil {
		return storageErr("drop shard", err)
	}
	for first := true; first || len(devs) > 0; first = false {
		chunk := devs[:min(dropChunk, len(devs))]
		devs = devs[len(chunk):]
		last := len(devs) == 0
		err := s.do(ctx, func(g *group) error {
			if g.fanPending(f) {
				return fanoutPending()
			}
			if err := g.wipe(chunk); err != nil {
				return err
			}
			if !last {
				return nil
			}
			cs := make([]*counter, len(convs))
			for i, c := range convs {
				var err error
				if cs[i], err = g.seq(c); err != nil {
					g.fail(err)
					return err
				}
			}
			for _, c := range cs {
				c.v, c.dirty = 0, true // flush deletes a counter at 0
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}
