package inbox

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
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
func (s *Store) do(ctx context.Context, apply func(g *group) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if s.failed.Load() {
		return errFailed
	}
	o := &op{ctx: ctx, apply: apply, done: make(chan struct{})}
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

// run is the committer: it takes one op (blocking, unless fan-out jobs are
// pending), drains up to MaxGroup without blocking, and commits them as one
// group.
func (s *Store) run() {
	defer close(s.stopped)
	// The sync stage: at most two groups wait for their fsync (one in the
	// stage, one in the channel) while the next one is built and applied
	// (see commitGroup); the committer blocks beyond that.
	s.syncing = make(chan *applied, 1)
	syncDone := make(chan struct{})
	go s.syncStage(syncDone)
	defer func() {
		close(s.syncing)
		<-syncDone
	}()
	ops := make([]*op, 0, s.o.MaxGroup)
	for {
		select {
		case <-s.quit: // checked first so queued ops are not started after Close
			s.rejectQueued()
			return
		default:
		}
		ops = ops[:0]
		if len(s.fan.jobs) == 0 {
			select {
			case <-s.quit:
				s.rejectQueued()
				return
			case o := <-s.ops:
				ops = append(ops, o)
			}
		}
		// With fan-out jobs pending the committer does not wait for ops:
		// every group carries a chunk, with whatever ops are queued.
	drain:
		for len(ops) < s.o.MaxGroup {
			select {
			case o := <-s.ops:
				ops = append(ops, o)
			default:
				break drain
			}
		}
		progress := s.commitGroup(ops)
		clear(ops)
		if !progress && len(ops) == 0 {
			// A fan-out chunk could not be read or committed (storage
			// trouble): wait for an op or a moment instead of spinning.
			select {
			case <-s.quit:
			case o := <-s.ops:
				s.commitGroup([]*op{o})
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
}

// errFailed is the error of every mutation after a fatal commit error.
var errFailed = storageErr("commit", errors.New("an earlier commit failed fatally; the node must restart"))

// commitBatch applies b with a WAL sync requested, without waiting for the
// sync (syncStage waits). A fatal Pebble error (a failed WAL write: Pebble's
// Fatalf, which store's logger turns into a *store.FatalError panic) comes
// back as an error.
func (s *Store) commitBatch(b *pebble.Batch) (err error) {
	defer store.RecoverFatal(&err)
	return s.o.commit(b, pebble.Sync)
}

// applied is a group handed from the committer to the sync stage: applied
// to Pebble (readable in the live database, not yet in the readers' view),
// waiting for its fsync.
type applied struct {
	g     *group
	ops   []*op
	snap  *pebble.Snapshot // the database right after this group: the readers' view once synced
	start time.Time
	sync  bool // the batch was committed and has a sync to wait for
}

// syncStage waits for each applied group's fsync, in order, then makes it
// visible to readers and answers its ops: nothing is answered, shown to a
// reader or announced (OnAppend) before it is durable. It ends when
// s.syncing is closed and drained.
func (s *Store) syncStage(done chan<- struct{}) {
	defer close(done)
	for a := range s.syncing {
		s.finishGroup(a)
	}
}

func (s *Store) finishGroup(a *applied) {
	g := a.g
	defer g.b.Close()
	var err error
	if a.sync {
		if err = g.b.SyncWait(); err != nil {
			// A failed WAL sync is fatal, as for a synchronous commit.
			err = &store.FatalError{Msg: "inbox: WAL sync failed: " + err.Error()}
		}
		s.m.commitSync.Observe(time.Since(a.start).Seconds())
	}
	if err == nil && s.failed.Load() {
		err = errFailed // an earlier group's sync failed: this one's is lost with it
	}
	if err != nil {
		_ = a.snap.Close()
		s.o.Logger.Error("inbox: commit failed", "ops", len(a.ops), "err", err)
		if errors.Is(err, store.ErrFatal) && s.failed.CompareAndSwap(false, true) {
			s.o.Logger.Error("inbox: storage failed fatally; refusing every write from now on")
			if s.o.OnFatal != nil {
				s.o.OnFatal(err)
			}
		}
		serr := storageErr("commit", err)
		for _, o := range a.ops {
			o.finish(serr)
		}
		return
	}
	s.publishSnap(a.snap)
	g.count.report(s.m)
	for _, o := range a.ops {
		o.finish(o.err)
	}
	if s.o.OnAppend != nil && len(g.notify) > 0 {
		s.o.OnAppend(g.notify)
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

// commitGroup applies ops (and the next fan-out chunk) into one batch,
// applies it to Pebble with a sync requested, and hands it to the sync
// stage, which answers the ops once the fsync is done. Building and
// applying the next group overlaps with that fsync (group commit,
// pipelined): the next group reads the live database, which includes this
// one, and if this one's sync fails the store fails as a whole (every
// later write is refused), so nothing built on it is ever acknowledged.
// It reports whether it committed anything.
func (s *Store) commitGroup(ops []*op) bool {
	if s.failed.Load() {
		for _, o := range ops {
			if o.state.CompareAndSwap(opQueued, opClaimed) {
				o.finish(errFailed)
			}
		}
		return len(ops) > 0
	}
	g := s.newGroup()
	handed := false
	defer func() {
		if !handed {
			g.b.Close()
		}
	}()
	g.expand() // first: ops of this group queue behind the job it works on
	expanding := len(s.fan.jobs) > 0 && s.fan.jobs[0].inFlight
	var done []*op
	for _, o := range ops {
		if !o.state.CompareAndSwap(opQueued, opClaimed) {
			continue // the caller gave up
		}
		if err := o.ctx.Err(); err != nil {
			o.finish(err)
			continue
		}
		o.err = o.apply(g)
		done = append(done, o)
	}
	if len(done) == 0 && !expanding {
		return false
	}
	g.flush()
	start := time.Now()
	synced := false
	if err := g.err; err == nil && !g.b.Empty() {
		// Every group is synced, acks included: readers see the state after
		// the last durable commit (see view.go), so nothing a reader sees
		// may be lost in a crash.
		g.err = s.commitBatch(g.b)
		synced = g.err == nil
		s.m.groupOps.Observe(float64(len(done)))
	}
	s.fan.committed(g, g.err == nil)
	s.m.fanPending.Set(float64(s.fan.pendingEntries()))
	if g.err != nil {
		// Nothing of this group reached Pebble; groups before it may still
		// be syncing, and this one's ops are answered now (with the error).
		s.o.Logger.Error("inbox: commit failed", "ops", len(done), "err", g.err)
		if errors.Is(g.err, store.ErrFatal) && s.failed.CompareAndSwap(false, true) {
			s.o.Logger.Error("inbox: storage failed fatally; refusing every write from now on")
			if s.o.OnFatal != nil {
				s.o.OnFatal(g.err)
			}
		}
		err := storageErr("commit", g.err)
		for _, o := range done {
			o.finish(err)
		}
		return len(done) > 0 // a failed chunk alone is retried after a pause
	}
	// Even a group that wrote nothing goes through the sync stage: its
	// answers (a duplicate's ✓, say) may rest on a group still syncing.
	handed = true
	s.syncing <- &applied{g: g, ops: done, snap: s.db.NewSnapshot(), start: start, sync: synced}
	return true
}

// group is the state of one commit group: the batch, and what its ops have
// changed so far, overlaid on Pebble for the ops that follow. It lives on
// the committer only and is dropped after the commit.
type group struct {
	s      *Store
	b      *pebble.Batch
	now    int64 // ms; the time of every entry appended in this group (or later, per device)
	err    error // a batch write error; it fails the whole group
	devs   map[wire.DeviceAddr]*devState
	ctrs   map[string]*counter   // by key: conversation sequences and the body id counter
	bodies map[uint64]*bodyState // shared group bodies this group touched
	notify []wire.DeviceAddr     // distinct devices that got entries
	fanNew []*fanJob             // fan-out jobs queued by this group's ops (fanout.go)
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
	bodies   []uint64                       // bodies referred to by entries appended to it in this group
	markers  map[string]*marker             // marker index entries read or written in this group, by key (nil: none)
	notified bool
}

// marker is a device's marker index entry for one coalescing key as this
// group leaves it.
type marker struct {
	id, seq uint64
	size    int  // the entry's size, if fresh
	fresh   bool // the entry was appended in this group (it is not in Pebble)
}

// counter is an 8-byte big-endian counter key (a conversation sequence or
// the body id counter) as this group leaves it.
type counter struct {
	v     uint64
	dirty bool
}

// bodyState is a shared body's reference count as this group leaves it.
type bodyState struct {
	refs   uint32
	timeMs int64
	known  bool // a refs record exists (in Pebble or written by this group)
	dirty  bool
}

// counts are the group's metric increments, reported after a good commit.
type counts struct {
	appended, acked, expired, full, duplicate int
	bodiesStored, bodiesDeleted               int
	fanQueued, fanEntries                     int
}

func (s *Store) newGroup() *group {
	return &group{
		s:      s,
		b:      s.db.NewBatch(),
		now:    s.nowMs(),
		devs:   make(map[wire.DeviceAddr]*devState),
		ctrs:   make(map[string]*counter),
		bodies: make(map[uint64]*bodyState),
	}
}

// dev returns the state of a device, reading its meta on first use.
func (g *group) dev(a wire.DeviceAddr) (*devState, error) {
	if ds := g.devs[a]; ds != nil {
		return ds, nil
	}
	meta := &storepb.InboxMeta{}
	if _, err := getProto(g.s.db, metaKey(a), meta); err != nil {
		return nil, err
	}
	ds := &devState{addr: a, meta: meta}
	g.devs[a] = ds
	return ds, nil
}

// seq returns the state of a conversation's sequence, reading it on first use.
func (g *group) seq(conv string) (*counter, error) { return g.counter(seqKey(conv)) }

// counter returns the state of the counter at key, reading it on first use.
func (g *group) counter(key []byte) (*counter, error) {
	if st := g.ctrs[string(key)]; st != nil {
		return st, nil
	}
	st := &counter{}
	v, closer, err := g.s.db.Get(key)
	if err != nil && !errors.Is(err, pebble.ErrNotFound) {
		return nil, storageErr("get counter", err)
	}
	if err == nil {
		defer closer.Close()
		if len(v) != 8 {
			return nil, storageErr("get counter", fmt.Errorf("value of %d bytes", len(v)))
		}
		st.v = binary.BigEndian.Uint64(v)
	}
	g.ctrs[string(key)] = st
	return st, nil
}

// body returns the reference count of body id, reading it on first use.
func (g *group) body(id uint64) (*bodyState, error) {
	if st := g.bodies[id]; st != nil {
		return st, nil
	}
	rec := &storepb.BodyRefs{}
	found, err := getProto(g.s.db, bodyRefsKey(id), rec)
	if err != nil {
		return nil, err
	}
	st := &bodyState{refs: rec.Refs, timeMs: rec.ServerTimeMs, known: found}
	g.bodies[id] = st
	return st, nil
}

// loadBody reads the reference count of body id (0: none) so that a later
// unref only writes. Ops call it while validating.
func (g *group) loadBody(id uint64) error {
	if id == 0 {
		return nil
	}
	_, err := g.body(id)
	return err
}

// unref drops one reference to body id (0: none), loaded by loadBody. At 0
// the body goes (flush).
func (g *group) unref(id uint64) {
	if id == 0 {
		return
	}
	st := g.bodies[id]
	if st == nil || !st.known || st.refs == 0 {
		// Never happens unless the store was damaged: nothing to count down.
		g.s.o.Logger.Error("inbox: entry refers to a body without references", "body", id)
		return
	}
	st.refs--
	st.dirty = true
}

// dedupRecord returns the dedup record of ds for clientMsgID, or nil.
func (g *group) dedupRecord(ds *devState, clientMsgID string) (*storepb.SendRecord, error) {
	if rec, ok := ds.dedup[clientMsgID]; ok || ds.wiped {
		return rec, nil
	}
	rec := &storepb.SendRecord{}
	found, err := getProto(g.s.db, dedupKey(ds.addr, clientMsgID), rec)
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

// storedEntry is what a group knows of a present entry.
type storedEntry struct {
	size   int // as quotas count it (the body's size included)
	timeMs int64
	bodyID uint64
}

// entry reports whether entry id of ds is present as the batch leaves it,
// and its size, server time and body. Entries appended in this same group
// count as absent: no client can know their id before the commit.
func (g *group) entry(ds *devState, id uint64) (e storedEntry, ok bool, err error) {
	if ds.wiped || ds.gone[id] {
		return storedEntry{}, false, nil
	}
	v, closer, err := g.s.db.Get(entryKey(ds.addr, id))
	if errors.Is(err, pebble.ErrNotFound) {
		return storedEntry{}, false, nil
	}
	if err != nil {
		return storedEntry{}, false, storageErr("get entry", err)
	}
	defer closer.Close()
	m := parseEntry(v)
	return storedEntry{size: m.size(v), timeMs: m.timeMs, bodyID: m.bodyID}, true, nil
}

// put is one planned entry write.
type put struct {
	ds   *devState
	id   uint64
	t    int64
	val  []byte
	size int    // as quotas count it
	body uint64 // the shared body it refers to, or 0
}

// bodyRef names the shared body of planned entries (id 0: none).
type bodyRef struct {
	id   uint64
	size uint32
}

// plan assigns ids and times to n entries (item returns the i-th one's
// device and marshaled envelope) without changing any state. Their time is
// t0 (0: the group's), or later to keep each device's times monotonic. Entries refer
// to body if its id is not 0. With quota, it fails with a *FullError if a
// device would go over its quota.
func (g *group) plan(n int, item func(i int) (wire.DeviceAddr, []byte), seq uint64, body bodyRef, quota bool, t0 int64) ([]put, error) {
	if t0 == 0 {
		t0 = g.now
	}
	type added struct{ n, bytes uint64 }
	adds := make(map[*devState]*added, n)
	var order []*devState
	puts := make([]put, n)
	for i := range n {
		to, base := item(i)
		ds, err := g.dev(to)
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
		t := max(t0, ds.meta.LastTimeMs)
		id := ds.meta.LastId + a.n
		val := withServerFields(base, id, seq, t)
		size := len(val)
		if body.id != 0 {
			val = withBodyRef(val, body.id, body.size)
			size = len(val) + int(body.size)
		}
		a.bytes += uint64(size)
		puts[i] = put{ds: ds, id: id, t: t, val: val, size: size, body: body.id}
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
		m.Bytes += uint64(p.size)
		p.ds.dirty = true
		if p.body != 0 {
			p.ds.bodies = append(p.ds.bodies, p.body)
		}
		if !p.ds.notified {
			p.ds.notified = true
			g.notify = append(g.notify, p.ds.addr)
		}
	}
	g.count.appended += len(puts)
}

// deleteEntry deletes a present entry of ds and drops its body reference
// (loaded by loadBody).
func (g *group) deleteEntry(ds *devState, id uint64, e storedEntry) {
	g.unref(e.bodyID)
	g.del(entryKey(ds.addr, id))
	if ds.gone == nil {
		ds.gone = make(map[uint64]bool)
	}
	ds.gone[id] = true
	ds.meta.Count--
	ds.meta.Bytes -= uint64(e.size)
	ds.dirty = true
}

// checkDup returns the sender's state for a send with a client message id
// ("" : none) and, if that id was accepted before, the original result.
func (g *group) checkDup(sender wire.DeviceAddr, clientMsgID string) (*devState, *Accepted, error) {
	if clientMsgID == "" {
		return nil, nil, nil
	}
	ds, err := g.dev(sender)
	if err != nil {
		return nil, nil, err
	}
	rec, err := g.dedupRecord(ds, clientMsgID)
	if err != nil {
		return nil, nil, err
	}
	if rec != nil && !g.s.expired(rec.ServerTimeMs, g.now) {
		g.count.duplicate++
		acc := duplicateOf(rec)
		return ds, &acc, nil
	}
	return ds, nil, nil
}

// nextSeq returns a conversation's counter ("": none) and its next value.
func (g *group) nextSeq(conversation string) (*counter, uint64, error) {
	if conversation == "" {
		return nil, 0, nil
	}
	conv, err := g.seq(conversation)
	if err != nil {
		return nil, 0, err
	}
	return conv, conv.v + 1, nil
}

// planned counts a rejected plan in the metrics and passes it on.
func (g *group) planned(puts []put, err error) ([]put, error) {
	var full *FullError
	if errors.As(err, &full) {
		g.count.full++
	}
	return puts, err
}

// accept writes the sequence and dedup record of an accepted send.
func (g *group) accept(conv *counter, seq uint64, sender *devState, clientMsgID string) Accepted {
	if conv != nil {
		conv.v, conv.dirty = seq, true
	}
	if sender != nil {
		g.setDedup(sender, clientMsgID, &storepb.SendRecord{Seq: seq, ServerTimeMs: g.now})
	}
	return Accepted{Seq: seq, ServerTime: time.UnixMilli(g.now)}
}

// append is the op of Append.
func (g *group) append(m *Send, vals [][]byte) (Accepted, error) {
	dedupDev, dedupID := dedupOf(m.Sender, m.DedupAccount, m.ClientMsgID)
	sender, dup, err := g.checkDup(dedupDev, dedupID)
	if err != nil || dup != nil {
		return derefAcc(dup), err
	}
	conv, seq, err := g.nextSeq(m.Conversation)
	if err != nil {
		return Accepted{}, err
	}
	if conv == nil {
		seq = m.Seq
	}
	puts, err := g.planned(g.plan(len(m.Entries), func(i int) (wire.DeviceAddr, []byte) {
		return m.Entries[i].To, vals[i]
	}, seq, bodyRef{}, true, 0))
	if err != nil {
		return Accepted{}, err
	}
	// Validated: from here on the op only writes.
	g.write(puts)
	return g.accept(conv, seq, sender, dedupID), nil
}

// dedupOf returns the device and id a send's dedup record is kept under
// (Send.DedupAccount).
func dedupOf(sender wire.DeviceAddr, account, clientMsgID string) (wire.DeviceAddr, string) {
	if account == "" || clientMsgID == "" {
		return sender, clientMsgID
	}
	return wire.DeviceAddr{Account: account}, sender.Account + "." + strconv.FormatUint(uint64(sender.Device), 10) + ":" + clientMsgID
}

// appendGroup is the op of AppendGroup: body is the marshaled envelope
// every entry refers to.
func (g *group) appendGroup(m *GroupAppend, body []byte) (Accepted, error) {
	dedupDev, dedupID := dedupOf(m.Sender, m.DedupAccount, m.ClientMsgID)
	sender, dup, err := g.checkDup(dedupDev, dedupID)
	if err != nil || dup != nil {
		return derefAcc(dup), err
	}
	conv, seq, err := g.nextSeq(m.Conversation)
	if err != nil {
		return Accepted{}, err
	}
	if conv == nil {
		seq = m.Seq
	}
	key := m.Order
	if key == "" {
		key = m.Conversation
	}
	if len(m.Recipients) > 0 && (len(m.Recipients) > g.s.o.FanoutInline || g.queued(key)) {
		return g.queueGroup(m, key, body, conv, seq, sender, dedupID)
	}
	var ref bodyRef
	var ctr *counter
	if len(m.Recipients) > 0 {
		if ctr, err = g.counter(bodyCounterKey); err != nil {
			return Accepted{}, err
		}
		ref = bodyRef{id: ctr.v + 1, size: uint32(len(body))}
	}
	puts, err := g.planned(g.plan(len(m.Recipients), func(i int) (wire.DeviceAddr, []byte) {
		return m.Recipients[i], nil
	}, seq, ref, !m.NoQuota, 0))
	if err != nil {
		return Accepted{}, err
	}
	// Validated: from here on the op only writes.
	g.apply(m.Also)
	if ref.id != 0 {
		ctr.v, ctr.dirty = ref.id, true
		g.set(bodyKey(ref.id), body)
		g.bodies[ref.id] = &bodyState{refs: uint32(len(puts)), timeMs: g.now, known: true, dirty: true}
		g.count.bodiesStored++
	}
	g.write(puts)
	return g.accept(conv, seq, sender, dedupID), nil
}

func derefAcc(a *Accepted) Accepted {
	if a == nil {
		return Accepted{}
	}
	return *a
}

// ack is the op of Ack.
func (g *group) ack(dev wire.DeviceAddr, ids []uint64, follow map[uint64][]Entry, vals map[uint64][][]byte) ([]uint64, error) {
	ds, err := g.dev(dev)
	if err != nil {
		return nil, err
	}
	var deleted []uint64
	var stored []storedEntry
	var fe []Entry
	var fv [][]byte
	seen := make(map[uint64]bool, len(ids))
	for _, id := range ids {
		if seen[id] {
			continue
		}
		seen[id] = true
		e, ok, err := g.entry(ds, id)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		if err := g.loadBody(e.bodyID); err != nil {
			return nil, err
		}
		deleted = append(deleted, id)
		stored = append(stored, e)
		fe = append(fe, follow[id]...)
		fv = append(fv, vals[id]...)
	}
	fp, err := g.planFollow(fe, fv)
	if err != nil {
		return nil, err
	}
	// Validated: from here on the op only writes.
	for i, id := range deleted {
		g.deleteEntry(ds, id, stored[i])
	}
	g.writeFollow(fp)
	g.count.acked += len(deleted)
	return deleted, nil
}

// appendMarkers is the op of AppendMarkers.
func (g *group) appendMarkers(es []Entry, vals [][]byte) (int, error) {
	fp, err := g.planFollow(es, vals)
	if err != nil {
		return 0, err
	}
	// Validated: from here on the op only writes.
	g.writeFollow(fp)
	return len(fp.puts), nil
}

// followPlan is the plan of server-made entries (receipts): puts[:plain]
// are ordinary entries, puts[plain:] the markers of marks, in order.
type followPlan struct {
	puts  []put
	plain int
	marks []markerWrite
}

// markerWrite is a marker an op appends and the entry it replaces.
type markerWrite struct {
	ds     *devState
	key    string
	seq    uint64
	i      int  // the entry's index in the op's entries
	hasOld bool // an entry to delete: oldID
	oldID  uint64
	old    storedEntry
}

// planFollow plans server-made entries es (marshaled as vals) without
// quotas or seq: ordinary entries are appended; of the markers, only the
// highest seq per device and key counts, and it is skipped if that key's
// present entry has a seq at least as high. It only reads.
func (g *group) planFollow(es []Entry, vals [][]byte) (*followPlan, error) {
	var plain []int
	type mk struct {
		to  wire.DeviceAddr
		key string
	}
	pos := make(map[mk]int)
	var cand []markerWrite
	for i, e := range es {
		if e.Coalesce == "" {
			plain = append(plain, i)
			continue
		}
		seq := e.Env.GetReceipt().GetSeq()
		k := mk{e.To, e.Coalesce}
		if j, ok := pos[k]; ok {
			if seq > cand[j].seq {
				cand[j].seq, cand[j].i = seq, i
			}
			continue
		}
		pos[k] = len(cand)
		cand = append(cand, markerWrite{key: e.Coalesce, seq: seq, i: i})
	}
	marks := cand[:0]
	for _, w := range cand {
		ds, err := g.dev(es[w.i].To)
		if err != nil {
			return nil, err
		}
		w.ds = ds
		m, err := g.marker(ds, w.key)
		if err != nil {
			return nil, err
		}
		if m != nil {
			e, ok, err := g.markerEntry(ds, m)
			if err != nil {
				return nil, err
			}
			if ok {
				if m.seq >= w.seq && !g.s.expired(e.timeMs, g.now) {
					continue // the pending marker already says as much
				}
				if err := g.loadBody(e.bodyID); err != nil {
					return nil, err
				}
				w.hasOld, w.oldID, w.old = true, m.id, e
			}
		}
		marks = append(marks, w)
	}
	n := len(plain) + len(marks)
	puts, err := g.plan(n, func(i int) (wire.DeviceAddr, []byte) {
		j := 0
		if i < len(plain) {
			j = plain[i]
		} else {
			j = marks[i-len(plain)].i
		}
		return es[j].To, vals[j]
	}, 0, bodyRef{}, false, 0)
	if err != nil {
		return nil, err
	}
	return &followPlan{puts: puts, plain: len(plain), marks: marks}, nil
}

// writeFollow applies a followPlan: it deletes the markers' replaced
// entries (unless gone already), writes the entries and points the marker
// index at the new ones.
func (g *group) writeFollow(p *followPlan) {
	for _, w := range p.marks {
		if w.hasOld && !w.ds.gone[w.oldID] {
			g.deleteEntry(w.ds, w.oldID, w.old)
		}
	}
	g.write(p.puts)
	for k, w := range p.marks {
		pt := p.puts[p.plain+k]
		v := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(make([]byte, 0, 16), pt.id), w.seq)
		g.set(markerKey(w.ds.addr, w.key), v)
		w.ds.markers[w.key] = &marker{id: pt.id, seq: w.seq, size: pt.size, fresh: true}
	}
}

// marker returns the marker index entry of key for ds (nil: none), reading
// it on first use.
func (g *group) marker(ds *devState, key string) (*marker, error) {
	if m, ok := ds.markers[key]; ok {
		return m, nil
	}
	var m *marker
	if !ds.wiped {
		v, closer, err := g.s.db.Get(markerKey(ds.addr, key))
		if err != nil && !errors.Is(err, pebble.ErrNotFound) {
			return nil, storageErr("get marker", err)
		}
		if err == nil {
			if len(v) == 16 { // anything else is damaged: overwritten
				m = &marker{id: binary.BigEndian.Uint64(v[:8]), seq: binary.BigEndian.Uint64(v[8:])}
			}
			closer.Close()
		}
	}
	if ds.markers == nil {
		ds.markers = make(map[string]*marker)
	}
	ds.markers[key] = m
	return m, nil
}

// markerEntry reports whether the entry m points to is present, like entry,
// but also for an entry appended earlier in this group.
func (g *group) markerEntry(ds *devState, m *marker) (storedEntry, bool, error) {
	if m.fresh {
		if ds.gone[m.id] {
			return storedEntry{}, false, nil
		}
		return storedEntry{size: m.size, timeMs: g.now}, true, nil
	}
	return g.entry(ds, m.id)
}

// deleteDevice is the op of DeleteDevice. Entries that refer to a shared
// body drop their reference, so it reads every entry of the device (on the
// committer: O(entries of the device), a rare operation).
func (g *group) deleteDevice(dev wire.DeviceAddr) error {
	ds := g.devs[dev]
	var refs []uint64
	if ds != nil {
		refs = append(refs, ds.bodies...) // appended in this group: not in Pebble yet
	}
	if ds == nil || !ds.wiped {
		p := devPrefix(prefixInbox, dev)
		it, err := g.s.db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
		if err != nil {
			return storageErr("delete device", err)
		}
		for ok := it.First(); ok; ok = it.Next() {
			if ds != nil && ds.gone[entryID(it.Key())] {
				continue // deleted (and unreferenced) earlier in this group
			}
			v, err := it.ValueAndErr()
			if err != nil {
				break
			}
			if id := parseEntry(v).bodyID; id != 0 {
				refs = append(refs, id)
			}
		}
		err = it.Error()
		if cerr := it.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return storageErr("delete device", err)
		}
	}
	for _, id := range refs {
		if err := g.loadBody(id); err != nil {
			return err
		}
	}
	// Validated: from here on the op only writes.
	for _, id := range refs {
		g.unref(id)
	}
	g.deleteRange(devPrefix(prefixInbox, dev))
	g.deleteRange(devPrefix(prefixDedup, dev))
	g.deleteRange(devPrefix(prefixMarker, dev))
	g.del(metaKey(dev))
	notified := ds != nil && ds.notified
	g.devs[dev] = &devState{addr: dev, meta: &storepb.InboxMeta{}, wiped: true, notified: notified}
	return nil
}

// expire is the op of one expiry chunk: it deletes the listed entries and
// dedup records that are still present and still expired at the group's time.
func (g *group) expire(c *expireChunk) (int, error) {
	type del struct {
		ds *devState
		id uint64
		e  storedEntry
	}
	var dels []del
	for _, ref := range c.entries {
		ds, err := g.dev(ref.dev)
		if err != nil {
			return 0, err
		}
		e, ok, err := g.entry(ds, ref.id)
		if err != nil {
			return 0, err
		}
		if ok && g.s.expired(e.timeMs, g.now) {
			if err := g.loadBody(e.bodyID); err != nil {
				return 0, err
			}
			dels = append(dels, del{ds, ref.id, e})
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
			g.deleteEntry(d.ds, d.id, d.e)
			n++
		}
	}
	for _, d := range dedups {
		g.setDedup(d.ds, d.id, nil)
	}
	g.count.expired += n
	return n, nil
}

// flush writes the metas, counters and body reference counts the group
// changed, and deletes the bodies nothing refers to any more.
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
	for key, st := range g.ctrs {
		switch {
		case st.dirty && st.v == 0: // only DropShard sets a counter to 0: it goes
			g.del([]byte(key))
		case st.dirty:
			g.set([]byte(key), binary.BigEndian.AppendUint64(nil, st.v))
		}
	}
	for id, st := range g.bodies {
		if !st.dirty {
			continue
		}
		if st.refs == 0 {
			g.del(bodyKey(id))
			g.del(bodyRefsKey(id))
			g.count.bodiesDeleted++
			continue
		}
		v, err := proto.Marshal(&storepb.BodyRefs{Refs: st.refs, ServerTimeMs: st.timeMs})
		if err != nil {
			g.fail(err)
			return
		}
		g.set(bodyRefsKey(id), v)
	}
}

func (g *group) set(k, v []byte) { g.fail(g.b.Set(k, v, nil)) }

// apply writes another store's changes into the batch.
func (g *group) apply(ws []store.Write) {
	for _, w := range ws {
		if w.Delete {
			g.del(w.Key)
		} else {
			g.set(w.Key, w.Value)
		}
	}
}
func (g *group) del(k []byte) { g.fail(g.b.Delete(k, nil)) }
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
	m.bodiesStored.Add(float64(c.bodiesStored))
	m.bodiesDeleted.Add(float64(c.bodiesDeleted))
	m.fanQueued.Add(float64(c.fanQueued))
	m.fanEntries.Add(float64(c.fanEntries))
}
