package inbox

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"google.golang.org/protobuf/proto"
)

// op states: a queued op is claimed by the committer or abandoned by its
// caller, whichever comes first.
const (
	opQueued int32 = iota
	opClaimed
	opAbandoned
)

// op is one mutation for the committer.
type op struct {
	ctx   context.Context
	sync  bool                 // its commit must be synced
	apply func(g *group) error // validates, then writes into g; runs on the committer
	state atomic.Int32
	err   error         // the result, set before done is closed
	done  chan struct{} // closed when the op is answered
}

func (o *op) finish(err error) {
	o.err = err
	close(o.done)
}

// do runs apply on the committer and returns its result once the group it
// joined has committed. If ctx ends or the store closes before the op is
// applied, the op is skipped; once applied, its result is returned regardless.
func (s *Store) do(ctx context.Context, sync bool, apply func(g *group) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	o := &op{ctx: ctx, sync: sync, apply: apply, done: make(chan struct{})}
	select {
	case s.ops <- o:
	case <-ctx.Done():
		return ctx.Err()
	case <-s.quit:
		return ErrClosed
	}
	select {
	case <-o.done:
		return o.err
	case <-ctx.Done():
		if o.state.CompareAndSwap(opQueued, opAbandoned) {
			return ctx.Err()
		}
	case <-s.stopped:
		if o.state.CompareAndSwap(opQueued, opAbandoned) {
			return ErrClosed
		}
	}
	<-o.done // claimed: the committer answers it
	return o.err
}

// run is the committer: it takes one op (blocking), drains up to MaxGroup
// without blocking, and commits them as one group.
func (s *Store) run() {
	defer close(s.stopped)
	ops := make([]*op, 0, s.o.MaxGroup)
	for {
		select {
		case <-s.quit: // checked first so queued ops are not started after Close
			s.rejectQueued()
			return
		default:
		}
		select {
		case <-s.quit:
			s.rejectQueued()
			return
		case o := <-s.ops:
			ops = append(ops[:0], o)
		}
	drain:
		for len(ops) < s.o.MaxGroup {
			select {
			case o := <-s.ops:
				ops = append(ops, o)
			default:
				break drain
			}
		}
		s.commitGroup(ops)
		clear(ops)
	}
}

// rejectQueued answers every queued op with ErrClosed.
func (s *Store) rejectQueued() {
	for {
		select {
		case o := <-s.ops:
			if o.state.CompareAndSwap(opQueued, opClaimed) {
				o.finish(ErrClosed)
			}
		default:
			return
		}
	}
}

// commitGroup applies ops into one batch, commits it, and answers them.
func (s *Store) commitGroup(ops []*op) {
	g := s.newGroup()
	defer g.b.Close()
	applied := ops[:0]
	for _, o := range ops {
		if !o.state.CompareAndSwap(opQueued, opClaimed) {
			continue // the caller gave up
		}
		if err := o.ctx.Err(); err != nil {
			o.finish(err)
			continue
		}
		o.err = o.apply(g)
		g.sync = g.sync || (o.sync && o.err == nil)
		applied = append(applied, o)
	}
	if len(applied) == 0 {
		return
	}
	g.flush()
	if err := g.err; err == nil && !g.b.Empty() {
		wo, hist := pebble.NoSync, s.m.commitNoSync
		if g.sync {
			wo, hist = pebble.Sync, s.m.commitSync
		}
		start := time.Now()
		g.err = s.o.commit(g.b, wo)
		hist.Observe(time.Since(start).Seconds())
		s.m.groupOps.Observe(float64(len(applied)))
	}
	if g.err != nil {
		s.o.Logger.Error("inbox: commit failed", "ops", len(applied), "err", g.err)
		err := storageErr("commit", g.err)
		for _, o := range applied {
			o.finish(err)
		}
		return
	}
	g.count.report(s.m)
	for _, o := range applied {
		o.finish(o.err)
	}
	if s.o.OnAppend != nil && len(g.notify) > 0 {
		s.o.OnAppend(g.notify)
	}
}

// group is the state of one commit group: the batch, and what its ops have
// changed so far, overlaid on Pebble for the ops that follow. It lives on
// the committer only and is dropped after the commit.
type group struct {
	s      *Store
	b      *pebble.Batch
	now    int64 // ms; the time of every entry appended in this group (or later, per device)
	sync   bool
	err    error // a batch write error; it fails the whole group
	devs   map[wire.DeviceAddr]*devState
	seqs   map[string]*seqState
	notify []wire.DeviceAddr // distinct devices that got entries
	count  counts
}

// devState is a device's inbox as this group leaves it.
type devState struct {
	addr     wire.DeviceAddr
	meta     *storepb.InboxMeta
	dirty    bool                           // meta changed: flush writes it
	wiped    bool                           // DeleteDevice ran: nothing in Pebble counts
	gone     map[uint64]bool                // entries deleted in this group
	dedup    map[string]*storepb.SendRecord // records written (or deleted: nil) in this group, by client msg id
	notified bool
}

type seqState struct {
	v     uint64
	dirty bool
}

// counts are the group's metric increments, reported after a good commit.
type counts struct {
	appended, acked, expired, full, duplicate int
}

func (s *Store) newGroup() *group {
	return &group{
		s:    s,
		b:    s.db.NewBatch(),
		now:  s.nowMs(),
		devs: make(map[wire.DeviceAddr]*devState),
		seqs: make(map[string]*seqState),
	}
}

// dev returns the state of a device, reading its meta on first use.
func (g *group) dev(a wire.DeviceAddr) (*devState, error) {
	if ds := g.devs[a]; ds != nil {
		return ds, nil
	}
	meta := &storepb.InboxMeta{}
	if _, err := g.s.getProto(metaKey(a), meta); err != nil {
		return nil, err
	}
	ds := &devState{addr: a, meta: meta}
	g.devs[a] = ds
	return ds, nil
}

// seq returns the state of a conversation's sequence, reading it on first use.
func (g *group) seq(conv string) (*seqState, error) {
	if st := g.seqs[conv]; st != nil {
		return st, nil
	}
	st := &seqState{}
	v, closer, err := g.s.db.Get(seqKey(conv))
	if err != nil && !errors.Is(err, pebble.ErrNotFound) {
		return nil, storageErr("get seq", err)
	}
	if err == nil {
		defer closer.Close()
		if len(v) != 8 {
			return nil, storageErr("get seq", fmt.Errorf("value of %d bytes", len(v)))
		}
		st.v = binary.BigEndian.Uint64(v)
	}
	g.seqs[conv] = st
	return st, nil
}

// dedupRecord returns the dedup record of ds for clientMsgID, or nil.
func (g *group) dedupRecord(ds *devState, clientMsgID string) (*storepb.SendRecord, error) {
	if rec, ok := ds.dedup[clientMsgID]; ok || ds.wiped {
		return rec, nil
	}
	rec := &storepb.SendRecord{}
	found, err := g.s.getProto(dedupKey(ds.addr, clientMsgID), rec)
	if err != nil || !found {
		return nil, err
	}
	return rec, nil
}

func (g *group) setDedup(ds *devState, clientMsgID string, rec *storepb.SendRecord) {
	if ds.dedup == nil {
		ds.dedup = make(map[string]*storepb.SendRecord)
	}
	ds.dedup[clientMsgID] = rec
	key := dedupKey(ds.addr, clientMsgID)
	if rec == nil {
		g.del(key)
		return
	}
	v, err := proto.Marshal(rec)
	if err != nil {
		g.fail(err)
		return
	}
	g.set(key, v)
}

// entry reports whether entry id of ds is present as the batch leaves it,
// and its stored size and server time. Entries appended in this same group
// count as absent: no client can know their id before the commit.
func (g *group) entry(ds *devState, id uint64) (size int, timeMs int64, ok bool, err error) {
	if ds.wiped || ds.gone[id] {
		return 0, 0, false, nil
	}
	v, closer, err := g.s.db.Get(entryKey(ds.addr, id))
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, 0, false, nil
	}
	if err != nil {
		return 0, 0, false, storageErr("get entry", err)
	}
	defer closer.Close()
	return len(v), envTime(v), true, nil
}

// put is one planned entry write.
type put struct {
	ds  *devState
	id  uint64
	t   int64
	val []byte
}

// plan assigns ids and times to entries (marshaled as vals) without
// changing any state. With quota, it fails with a *FullError if a device
// would go over its quota.
func (g *group) plan(entries []Entry, vals [][]byte, seq uint64, quota bool) ([]put, error) {
	type added struct{ n, bytes uint64 }
	adds := make(map[*devState]*added, len(entries))
	var order []*devState
	puts := make([]put, len(entries))
	for i, e := range entries {
		ds, err := g.dev(e.To)
		if err != nil {
			return nil, err
		}
		a := adds[ds]
		if a == nil {
			a = &added{}
			adds[ds] = a
			order = append(order, ds)
		}
		a.n++
		t := max(g.now, ds.meta.LastTimeMs)
		id := ds.meta.LastId + a.n
		val := withServerFields(vals[i], id, seq, t)
		a.bytes += uint64(len(val))
		puts[i] = put{ds: ds, id: id, t: t, val: val}
	}
	if !quota {
		return puts, nil
	}
	var full []wire.DeviceAddr
	for _, ds := range order {
		a := adds[ds]
		if ds.meta.Count+a.n > uint64(g.s.o.MaxDepth) || ds.meta.Bytes+a.bytes > uint64(g.s.o.MaxBytes) {
			full = append(full, ds.addr)
		}
	}
	if full != nil {
		return nil, &FullError{Devices: full}
	}
	return puts, nil
}

// write applies planned puts.
func (g *group) write(puts []put) {
	for _, p := range puts {
		g.set(entryKey(p.ds.addr, p.id), p.val)
		m := p.ds.meta
		m.LastId = p.id
		m.LastTimeMs = p.t
		m.Count++
		m.Bytes += uint64(len(p.val))
		p.ds.dirty = true
		if !p.ds.notified {
			p.ds.notified = true
			g.notify = append(g.notify, p.ds.addr)
		}
	}
	g.count.appended += len(puts)
}

// deleteEntry deletes a present entry of ds.
func (g *group) deleteEntry(ds *devState, id uint64, size int) {
	g.del(entryKey(ds.addr, id))
	if ds.gone == nil {
		ds.gone = make(map[uint64]bool)
	}
	ds.gone[id] = true
	ds.meta.Count--
	ds.meta.Bytes -= uint64(size)
	ds.dirty = true
}

// append is the op of Append.
func (g *group) append(m *Send, vals [][]byte) (Accepted, error) {
	var sender *devState
	if m.ClientMsgID != "" {
		var err error
		if sender, err = g.dev(m.Sender); err != nil {
			return Accepted{}, err
		}
		rec, err := g.dedupRecord(sender, m.ClientMsgID)
		if err != nil {
			return Accepted{}, err
		}
		if rec != nil && !g.s.expired(rec.ServerTimeMs, g.now) {
			g.count.duplicate++
			return duplicateOf(rec), nil
		}
	}
	var conv *seqState
	var seq uint64
	if m.Conversation != "" {
		var err error
		if conv, err = g.seq(m.Conversation); err != nil {
			return Accepted{}, err
		}
		seq = conv.v + 1
	}
	puts, err := g.plan(m.Entries, vals, seq, true)
	if err != nil {
		var full *FullError
		if errors.As(err, &full) {
			g.count.full++
		}
		return Accepted{}, err
	}
	// Validated: from here on the op only writes.
	g.write(puts)
	if conv != nil {
		conv.v, conv.dirty = seq, true
	}
	if sender != nil {
		g.setDedup(sender, m.ClientMsgID, &storepb.SendRecord{Seq: seq, ServerTimeMs: g.now})
	}
	return Accepted{Seq: seq, ServerTime: time.UnixMilli(g.now)}, nil
}

// ack is the op of Ack.
func (g *group) ack(dev wire.DeviceAddr, ids []uint64, follow map[uint64][]Entry, vals map[uint64][][]byte) ([]uint64, error) {
	ds, err := g.dev(dev)
	if err != nil {
		return nil, err
	}
	var deleted []uint64
	var sizes []int
	var fe []Entry
	var fv [][]byte
	seen := make(map[uint64]bool, len(ids))
	for _, id := range ids {
		if seen[id] {
			continue
		}
		seen[id] = true
		size, _, ok, err := g.entry(ds, id)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		deleted = append(deleted, id)
		sizes = append(sizes, size)
		fe = append(fe, follow[id]...)
		fv = append(fv, vals[id]...)
	}
	puts, err := g.plan(fe, fv, 0, false)
	if err != nil {
		return nil, err
	}
	// Validated: from here on the op only writes.
	for i, id := range deleted {
		g.deleteEntry(ds, id, sizes[i])
	}
	g.write(puts)
	g.count.acked += len(deleted)
	return deleted, nil
}

// deleteDevice is the op of DeleteDevice.
func (g *group) deleteDevice(dev wire.DeviceAddr) error {
	g.deleteRange(devPrefix(prefixInbox, dev))
	g.deleteRange(devPrefix(prefixDedup, dev))
	g.del(metaKey(dev))
	ds := g.devs[dev]
	notified := ds != nil && ds.notified
	g.devs[dev] = &devState{addr: dev, meta: &storepb.InboxMeta{}, wiped: true, notified: notified}
	return nil
}

// expire is the op of one expiry chunk: it deletes the listed entries and
// dedup records that are still present and still expired at the group's time.
func (g *group) expire(c *expireChunk) (int, error) {
	type del struct {
		ds   *devState
		id   uint64
		size int
	}
	var dels []del
	for _, e := range c.entries {
		ds, err := g.dev(e.dev)
		if err != nil {
			return 0, err
		}
		size, t, ok, err := g.entry(ds, e.id)
		if err != nil {
			return 0, err
		}
		if ok && g.s.expired(t, g.now) {
			dels = append(dels, del{ds, e.id, size})
		}
	}
	type dedupDel struct {
		ds *devState
		id string
	}
	var dedups []dedupDel
	for _, r := range c.dedup {
		ds, err := g.dev(r.dev)
		if err != nil {
			return 0, err
		}
		rec, err := g.dedupRecord(ds, r.clientMsgID)
		if err != nil {
			return 0, err
		}
		if rec != nil && g.s.expired(rec.ServerTimeMs, g.now) {
			dedups = append(dedups, dedupDel{ds, r.clientMsgID})
		}
	}
	// Validated: from here on the op only writes.
	n := 0
	for _, d := range dels {
		if !d.ds.gone[d.id] { // listed twice
			g.deleteEntry(d.ds, d.id, d.size)
			n++
		}
	}
	for _, d := range dedups {
		g.setDedup(d.ds, d.id, nil)
	}
	g.count.expired += n
	return n, nil
}

// flush writes the metas and sequences the group changed.
func (g *group) flush() {
	for _, ds := range g.devs {
		if !ds.dirty {
			continue
		}
		v, err := proto.Marshal(ds.meta)
		if err != nil {
			g.fail(err)
			return
		}
		g.set(metaKey(ds.addr), v)
	}
	for conv, st := range g.seqs {
		if st.dirty {
			g.set(seqKey(conv), binary.BigEndian.AppendUint64(nil, st.v))
		}
	}
}

func (g *group) set(k, v []byte) { g.fail(g.b.Set(k, v, nil)) }
func (g *group) del(k []byte)    { g.fail(g.b.Delete(k, nil)) }
func (g *group) deleteRange(prefix []byte) {
	g.fail(g.b.DeleteRange(prefix, prefixEnd(prefix), nil))
}

func (g *group) fail(err error) {
	if g.err == nil {
		g.err = err
	}
}

func (c counts) report(m *metrics) {
	m.appended.Add(float64(c.appended))
	m.acked.Add(float64(c.acked))
	m.expired.Add(float64(c.expired))
	m.rejectedFull.Add(float64(c.full))
	m.rejectedDup.Add(float64(c.duplicate))
}
