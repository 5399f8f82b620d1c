// Package inbox keeps the per-device ciphertext inboxes of a ferryd node in
// Pebble: durable append with group commit, range reads after a cursor,
// delete on ack, expiry after a TTL, per-device quotas and dedup of retried
// sends.
//
// One committer goroutine is the only writer. Every mutation (Append, Ack,
// DeleteDevice, expiry) is an op sent to it over a bounded channel; it
// applies a group of ops into one Pebble batch and commits that batch once,
// with fsync if any op in the group needs it. Envelope ids and conversation
// sequence numbers are therefore assigned in commit order: a reader that can
// see id N+1 of a device can also see id N (unless N was acked or expired),
// so it may advance its cursor past everything it read without ever
// skipping a message that commits later (design invariant 2). Concurrent
// sends share one fsync.
//
// Keys (package store documents the whole key space):
//
//	'i' username 0x00 device(4) id(8)            marshaled wirepb.Envelope
//	'm' username 0x00 device(4)                  storepb.InboxMeta
//	'q' conversation                             sequence, 8 bytes big-endian
//	'd' username 0x00 device(4) client_msg_id    storepb.SendRecord (sender's dedup)
//	'c'                                          last body id, 8 bytes big-endian
//	'c' body_id(8) 'b'                           shared envelope (without id, seq, time)
//	'c' body_id(8) 'r'                           storepb.BodyRefs (entries referring to the body)
//	'x' username 0x00 device(4) coalesce_key     marker index: entry id(8), receipt seq(8)
//
// Markers (Entry.Coalesce) are RECEIPT entries that say "up to seq N": a
// device holds at most one pending marker per coalescing key. Appending a
// marker whose key already has a present entry with a seq at least as high
// writes nothing; otherwise the old entry is deleted (as an ack would) and
// the new one appended, in the same batch. So N acks of one sender's
// messages leave its devices one marker, not N receipts.
//
// Group messages (AppendGroup) store their envelope once: the body (the
// envelope but its id, seq and time: content, or the GroupInfo of a
// GROUP_UPDATE, sender, group id, ...) goes under a 'c' key with a
// reference count, and each recipient device's entry holds only its id, seq
// and time plus a storepb.EntryBodyRef. So the bytes written per group
// message grow with the number of devices and with the body size, never
// with their product. Deleting an entry (ack, expiry, DeleteDevice) drops
// its reference in the same batch; the body goes with its last reference.
// Range and Get put the body back, so devices see whole envelopes. Quotas
// count an entry's body in each device's bytes (what it would download).
//
// Nothing is cached across commit groups: every op reads Pebble, overlaid
// with what earlier ops of its own group changed, so a failed commit leaves
// no stale state behind.
package inbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
)

// Errors. ErrInboxFull, ErrStorage and ErrClosed are *wire.Error values, so
// the relay maps them to client codes with errors.As. wire.Error matches by
// code, so errors.Is cannot tell ErrStorage from ErrClosed (both UNAVAILABLE
// and retryable); compare the code, not the sentinel, when that matters.
var (
	// ErrInboxFull: a recipient device is at its MaxDepth or MaxBytes quota.
	// Append returns it inside a *FullError that names the devices.
	ErrInboxFull = &wire.Error{Code: wirepb.ErrorCode_INBOX_FULL, Message: "inbox: full", Retryable: true}
	// ErrStorage: Pebble failed to read or commit. Nothing of the failed
	// operation is acknowledged; retrying may succeed.
	ErrStorage = &wire.Error{Code: wirepb.ErrorCode_UNAVAILABLE, Message: "inbox: storage failed", Retryable: true}
	// ErrClosed: the Store is closed (the node is shutting down).
	ErrClosed = &wire.Error{Code: wirepb.ErrorCode_UNAVAILABLE, Message: "inbox: closed", Retryable: true}
	// ErrNotFound: no such entry (or it has expired).
	ErrNotFound = errors.New("inbox: not found")
)

// FullError is the error of an Append that would put devices over their
// quota. Nothing of that send was stored.
type FullError struct {
	Devices []wire.DeviceAddr // the full devices, in the order of the send's entries
}

func (e *FullError) Error() string {
	names := make([]string, len(e.Devices))
	for i, d := range e.Devices {
		names[i] = d.String()
	}
	return "inbox: full: " + strings.Join(names, ", ")
}

// Unwrap returns ErrInboxFull.
func (e *FullError) Unwrap() error { return ErrInboxFull }

// Options configure a Store. Every zero value means the documented default.
type Options struct {
	// TTL is how long an undelivered entry (and a dedup record) lives; 0 means 30 days.
	TTL time.Duration
	// MaxDepth is the most entries one device's inbox holds; 0 means 100000.
	MaxDepth int
	// MaxBytes is the most bytes per device (entry sizes; an entry referring
	// to a shared group body counts the body too); 0 means 256 MiB.
	MaxBytes int64
	// FanoutInline is the most recipients a group append writes entries for
	// in its own commit; a larger one is committed as a fan-out job and
	// expanded after the ✓ (fanout.go). 0 means 256.
	FanoutInline int
	// FanoutChunk is the most entries of a fan-out job one commit writes;
	// 0 means 256.
	FanoutChunk int
	// MaxFanoutJobs bounds the queued fan-out jobs; over it a large group
	// append fails with ErrFanoutBusy (retryable). 0 means 1024.
	MaxFanoutJobs int
	// MaxGroup is the most ops the committer puts into one batch; 0 means 1024.
	MaxGroup int
	// QueueSize is the capacity of the committer's channel; 0 means 4096.
	QueueSize int
	// SweepInterval is the period of the background expiry sweep; 0 means
	// one minute, a negative value disables the sweeper (call ExpireNow).
	SweepInterval time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// OnAppend is called after each successful commit with the distinct
	// devices that got entries in it. It runs on the committer goroutine and
	// must not block; nil means no callback.
	OnAppend func(devs []wire.DeviceAddr)
	// Registerer receives the store's metrics; nil means no metrics.
	Registerer prometheus.Registerer
	// OnFatal is called once, on the committer, when a commit fails in a
	// way Pebble cannot go on from (store.ErrFatal: a WAL write or fsync
	// failed). From then on every mutation fails with ErrStorage; readers
	// keep seeing the last synced state. The owner should stop the process
	// (ferryd exits non-zero). nil means no callback.
	OnFatal func(err error)
	// Logger gets commit failures and sweep results (ids and counts only,
	// never content); nil means slog.Default().
	Logger *slog.Logger

	// commit commits a group's batch; nil means applying it without
	// waiting for its fsync (DB.ApplyNoSyncWait), which the committer's
	// sync stage then waits for (Batch.SyncWait). Tests inject commit
	// failures through it (a hook may also commit synchronously).
	commit func(b *pebble.Batch, o *pebble.WriteOptions) error
}

func (o Options) withDefaults() Options {
	if o.TTL <= 0 {
		o.TTL = 30 * 24 * time.Hour
	}
	if o.MaxDepth <= 0 {
		o.MaxDepth = 100000
	}
	if o.MaxBytes <= 0 {
		o.MaxBytes = 256 << 20
	}
	if o.MaxGroup <= 0 {
		o.MaxGroup = 1024
	}
	if o.FanoutInline <= 0 {
		o.FanoutInline = 256
	}
	if o.FanoutChunk <= 0 {
		o.FanoutChunk = 256
	}
	if o.MaxFanoutJobs <= 0 {
		o.MaxFanoutJobs = 1024
	}
	if o.QueueSize <= 0 {
		o.QueueSize = 4096
	}
	if o.SweepInterval == 0 {
		o.SweepInterval = time.Minute
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// Store is the inbox store of one Pebble database. Its methods are safe for
// concurrent use.
type Store struct {
	// static after construction
	db    *pebble.DB
	o     Options
	ttlMs int64
	m     *metrics
	ops   chan *op // to the committer

	fan    *fanout    // owned by the committer (fanout.go)
	bodies *bodyCache // shared bodies read by RangeRaw

	cur atomic.Pointer[view] // what readers see: the state after the last (synced) commit

	// failed is set by the committer after a fatal commit error: the
	// database may hold unsynced writes, so no mutation runs again.
	failed atomic.Bool

	// shutdown
	quit      chan struct{} // closed by Close
	stopped   chan struct{} // closed when the committer has exited
	syncing   chan *applied // committer → its sync stage (committer.go); made by run
	sweepDone chan struct{} // closed when the sweeper has exited
	stopSweep context.CancelFunc
	closeOnce sync.Once
}

// New starts a Store on db: its committer and, unless disabled, its expiry
// sweeper. Close stops them; it does not close db, and db must stay open
// until Close has returned and no other method is running.
func New(db *pebble.DB, o Options) (*Store, error) {
	if db == nil {
		return nil, errors.New("inbox: nil db")
	}
	o = o.withDefaults()
	m, err := newMetrics(o.Registerer, o.Now)
	if err != nil {
		return nil, fmt.Errorf("inbox: metrics: %w", err)
	}
	fan, err := loadFanout(db)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Store{
		fan:       fan,
		bodies:    newBodyCache(256),
		db:        db,
		o:         o,
		ttlMs:     o.TTL.Milliseconds(),
		m:         m,
		ops:       make(chan *op, o.QueueSize),
		quit:      make(chan struct{}),
		stopped:   make(chan struct{}),
		sweepDone: make(chan struct{}),
		stopSweep: cancel,
	}
	if s.o.commit == nil {
		s.o.commit = func(b *pebble.Batch, wo *pebble.WriteOptions) error { return db.ApplyNoSyncWait(b, wo) }
	}
	s.publish()
	go s.run()
	go s.sweep(ctx)
	return s, nil
}

// Close stops the committer and the sweeper. Ops not yet applied get
// ErrClosed; an op already applied to a batch gets its real result. Close is
// idempotent and returns nil.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.stopSweep() // first, so the sweeper does not log the ErrClosed it may see
		close(s.quit)
	})
	<-s.stopped
	<-s.sweepDone
	if v := s.cur.Swap(nil); v != nil {
		v.release()
	}
	return nil
}

// Entry is one envelope for one device. The caller sets Sender,
// SenderDevice, To, Type, Content, ClientMsgId and Receipt of Env; the
// stored copy gets Id, Seq and ServerTimeMs from the store (values the
// caller set there are overridden). Env itself is not modified.
//
// Coalesce, if not "", makes the entry a marker: Env.Receipt must be set,
// and To keeps at most one pending entry per Coalesce key, the one with the
// highest Receipt.Seq (see the package doc). Markers skip quotas and get no
// conversation seq.
type Entry struct {
	To       wire.DeviceAddr
	Env      *wirepb.Envelope
	Coalesce string
}

// Send is one message: its envelopes for every recipient device.
type Send struct {
	Sender       wire.DeviceAddr
	ClientMsgID  string // "" means no dedup (server-made entries such as receipts)
	Conversation string // key of the sequence counter; "" means no sequence (Seq 0)
	Entries      []Entry
	// Seq, with no Conversation, is a sequence number allocated elsewhere:
	// in cluster mode by the node that owns the conversation (package route).
	Seq uint64
	// DedupAccount, if set, keeps the dedup record under (DedupAccount,
	// device 0, "<sender>.<device>:<client msg id>") instead of under the
	// sender device: the part of a send stored on a node that does not own
	// the sender's shard is deduplicated under an account of its own shard,
	// so the record moves with that shard.
	DedupAccount string
}

// GroupAppend is one group message (or server-made group update) for many
// devices, with its shared part stored once.
type GroupAppend struct {
	Sender       wire.DeviceAddr
	ClientMsgID  string // "" means no dedup (server-made updates)
	Conversation string // the group's sequence counter ("g:" + group id); "" means no sequence
	// Env is the envelope every recipient gets (Sender, SenderDevice,
	// GroupId, Type, ClientMsgId, and Group for an update); Id, Seq and
	// ServerTimeMs are the store's. It is stored once, as the shared body,
	// and each entry holds only its own id, seq and time and a reference.
	Env *wirepb.Envelope
	// Body is the content (the sender-key ciphertext); it overrides
	// Env.Content.
	Body []byte
	// Recipients get one entry each, in this order (duplicates get two).
	// None is allowed: the send then only takes a sequence number and a
	// dedup record.
	Recipients []wire.DeviceAddr
	// NoQuota skips the quota checks (server-made updates, like receipts:
	// a membership change must reach everyone).
	NoQuota bool
	// Also are another store's writes that must commit atomically with
	// this append (a membership change with its GROUP_UPDATE). They are
	// applied as given, after the append validated.
	Also []store.Write
	// Order is the key of the order devices get group appends in; "" means
	// Conversation. Give a group's updates its conversation, so they are not
	// handed out ahead of messages queued before them.
	Order string
	// Seq and DedupAccount are as in Send.
	Seq          uint64
	DedupAccount string
}

// Accepted is the result of a committed (or duplicate) send.
type Accepted struct {
	Seq        uint64    // conversation sequence number, 0 without a conversation
	ServerTime time.Time // millisecond precision
	Duplicate  bool      // the send was accepted before; Seq and ServerTime are the original ones
}

// Item is one entry read from an inbox.
type Item struct {
	ID   uint64
	Env  *wirepb.Envelope
	Size int    // stored bytes, plus the shared body's for a group entry
	Raw  []byte // RangeRaw only: Env whole, encoded as the device gets it
}

// Append stores every entry of m in one synced commit and returns once it
// is durable. If (m.Sender, m.ClientMsgID) was accepted before (within the
// TTL), it returns the original Accepted with Duplicate set and stores
// nothing. If a recipient device would go over MaxDepth or MaxBytes, it
// returns a *FullError (errors.Is ErrInboxFull) and stores nothing for any
// recipient. m.Entries must not change until Append returns.
func (s *Store) Append(ctx context.Context, m Send) (Accepted, error) {
	if len(m.Entries) == 0 && m.Conversation == "" && m.ClientMsgID == "" {
		return Accepted{}, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "inbox: send has no entries")
	}
	vals, err := marshalEntries(m.Entries)
	if err != nil {
		return Accepted{}, err
	}
	var acc Accepted
	err = s.do(ctx, func(g *group) (err error) {
		acc, err = g.append(&m, vals)
		return err
	})
	if err != nil {
		return Accepted{}, err
	}
	return acc, nil
}

// AppendGroup stores one group message for every recipient device in one
// synced commit, like Append: dedup of (m.Sender, m.ClientMsgID), the
// sequence of m.Conversation, quota checks for every recipient (a
// *FullError stores nothing), then the shared body once and one small entry
// per recipient referring to it. m must not change until it returns.
func (s *Store) AppendGroup(ctx context.Context, m GroupAppend) (Accepted, error) {
	if m.Env == nil {
		return Accepted{}, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "inbox: group send has no envelope")
	}
	shared := proto.CloneOf(m.Env)
	if m.Body != nil {
		shared.Content = m.Body
	}
	shared.Id, shared.Seq, shared.ServerTimeMs = 0, 0, 0 // per entry
	shared.ProtoReflect().SetUnknown(nil)
	body, err := proto.Marshal(shared)
	if err != nil {
		return Accepted{}, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "inbox: group body does not encode")
	}
	if len(body) > math.MaxUint32 {
		return Accepted{}, wire.Errorf(wirepb.ErrorCode_MESSAGE_TOO_LARGE, "inbox: group body of %d bytes", len(body))
	}
	var acc Accepted
	err = s.do(ctx, func(g *group) (err error) {
		acc, err = g.appendGroup(&m, body)
		return err
	})
	if err != nil {
		return Accepted{}, err
	}
	return acc, nil
}

// Ack deletes the entries ids of dev; ids that are not present are ignored
// (acks are idempotent). For each id it actually deletes, the entries in
// follow[id] (receipts to the sender's devices, usually markers) are
// appended in the same batch, with ids and time but no seq and without
// quota checks; markers coalesce as AppendMarkers does. It returns the
// deleted ids. Like every commit it is synced before readers see it; the
// receipts are kept or lost together with the delete.
func (s *Store) Ack(ctx context.Context, dev wire.DeviceAddr, ids []uint64, follow map[uint64][]Entry) ([]uint64, error) {
	vals := make(map[uint64][][]byte, len(follow))
	for id, es := range follow {
		v, err := marshalEntries(es)
		if err != nil {
			return nil, err
		}
		vals[id] = v
	}
	var deleted []uint64
	err := s.do(ctx, func(g *group) (err error) {
		deleted, err = g.ack(dev, ids, follow, vals)
		return err
	})
	if err != nil {
		return nil, err
	}
	return deleted, nil
}

// AppendMarkers appends markers (every entry must have Coalesce and
// Env.Receipt set) in one synced commit, without quotas or seq. A marker
// whose key already has a present entry with a seq at least as high is
// skipped; otherwise it replaces that entry. Of several entries with the
// same device and key, only the one with the highest seq counts. It returns
// how many entries it wrote.
func (s *Store) AppendMarkers(ctx context.Context, entries []Entry) (int, error) {
	for i, e := range entries {
		if e.Coalesce == "" {
			return 0, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "inbox: entry %d for %s is not a marker", i, e.To)
		}
	}
	vals, err := marshalEntries(entries)
	if err != nil {
		return 0, err
	}
	if len(entries) == 0 {
		return 0, nil
	}
	var n int
	err = s.do(ctx, func(g *group) (err error) {
		n, err = g.appendMarkers(entries, vals)
		return err
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// DeleteDevice removes every entry, the meta, the marker index and the
// dedup records of dev, in one synced commit. A later Append to dev starts
// again at id 1, so the caller must not reuse a deleted device's id (the
// account layer never does).
func (s *Store) DeleteDevice(ctx context.Context, dev wire.DeviceAddr) error {
	return s.do(ctx, func(g *group) error { return g.deleteDevice(dev) })
}

// Lookup reports the original result of the send (sender, clientMsgID), if
// it was accepted within the TTL. It only reads; Append does the same check
// itself.
func (s *Store) Lookup(ctx context.Context, sender wire.DeviceAddr, clientMsgID string) (Accepted, bool, error) {
	if err := s.readable(ctx); err != nil {
		return Accepted{}, false, err
	}
	v := s.acquire()
	defer v.release()
	rec := &storepb.SendRecord{}
	found, err := getProto(v.snap, dedupKey(sender, clientMsgID), rec)
	if err != nil || !found || s.expired(rec.ServerTimeMs, s.nowMs()) {
		return Accepted{}, false, err
	}
	return duplicateOf(rec), true, nil
}

// Range returns up to limit entries of dev with id > after, in ascending
// id order. Expired entries are skipped even before the sweep removes them.
func (s *Store) Range(ctx context.Context, dev wire.DeviceAddr, after uint64, limit int) ([]Item, error) {
	return s.rangeItems(ctx, dev, after, limit, false)
}

// RangeRaw is Range for delivery: each Item's Raw is the whole envelope,
// encoded as the device gets it, and its Env holds every field but the
// content and group of a shared group body (routing fields: sender, seq,
// type, ids). A group body is decoded once, not once per device: shared
// bodies are cached by id (they never change; an entry present in the read
// snapshot proves its body was).
func (s *Store) RangeRaw(ctx context.Context, dev wire.DeviceAddr, after uint64, limit int) ([]Item, error) {
	return s.rangeItems(ctx, dev, after, limit, true)
}

func (s *Store) rangeItems(ctx context.Context, dev wire.DeviceAddr, after uint64, limit int, raw bool) ([]Item, error) {
	if err := s.readable(ctx); err != nil {
		return nil, err
	}
	if limit <= 0 || after == math.MaxUint64 {
		return nil, nil
	}
	v := s.acquire()
	defer v.release()
	it, err := v.snap.NewIter(&pebble.IterOptions{
		LowerBound: entryKey(dev, after+1),
		UpperBound: prefixEnd(devPrefix(prefixInbox, dev)),
	})
	if err != nil {
		return nil, storageErr("range", err)
	}
	defer it.Close()
	now := s.nowMs()
	var items []Item
	for ok := it.First(); ok && len(items) < limit; ok = it.Next() {
		val, err := it.ValueAndErr()
		if err != nil {
			return nil, storageErr("range", err)
		}
		em := parseEntry(val)
		if s.expired(em.timeMs, now) {
			continue
		}
		id := entryID(it.Key())
		item := Item{ID: id, Size: em.size(val)}
		if raw {
			item.Env, item.Raw, err = s.decodeRaw(v.snap, dev, id, val, em)
		} else {
			item.Env, err = s.decodeEntry(v.snap, dev, id, val, em)
		}
		if errors.Is(err, ErrNotFound) {
			continue // acked or expired since the iterator opened
		}
		if err != nil {
			return nil, err
		}
		items = append(items, item)
	}
	if err := it.Error(); err != nil {
		return nil, storageErr("range", err)
	}
	return items, nil
}

// decodeRaw is decodeEntry for RangeRaw.
func (s *Store) decodeRaw(r pebble.Reader, dev wire.DeviceAddr, id uint64, v []byte, em entryMeta) (*wirepb.Envelope, []byte, error) {
	if em.bodyID == 0 {
		env := &wirepb.Envelope{}
		if err := proto.Unmarshal(v, env); err != nil {
			return nil, nil, storageErr("decode entry", err)
		}
		return env, bytes.Clone(v), nil
	}
	own := v[:em.refAt] // the entry's id, seq and time, without the EntryBodyRef
	b, ok := s.bodies.get(em.bodyID)
	if !ok {
		body, closer, err := r.Get(bodyKey(em.bodyID))
		if err != nil {
			// Gone (the entry was deleted meanwhile, or damage) or a read
			// error: decodeEntry tells which and answers accordingly.
			full, err := s.decodeEntry(r, dev, id, v, em)
			if err != nil {
				return nil, nil, err
			}
			return full, mustMarshal(full), nil
		}
		head := &wirepb.Envelope{}
		err = (proto.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(body, head)
		b = &cachedBody{raw: bytes.Clone(body)}
		closer.Close()
		if err != nil {
			return nil, nil, storageErr("decode body", err)
		}
		head.Content, head.Group = nil, nil
		b.head = head
		s.bodies.put(em.bodyID, b)
	}
	env := proto.CloneOf(b.head)
	if err := (proto.UnmarshalOptions{Merge: true}).Unmarshal(own, env); err != nil {
		return nil, nil, storageErr("decode entry", err)
	}
	raw := make([]byte, 0, len(own)+len(b.raw))
	return env, append(append(raw, b.raw...), own...), nil
}

func mustMarshal(m proto.Message) []byte {
	b, _ := proto.Marshal(m)
	return b
}

// cachedBody is a shared group body as RangeRaw hands it out: read-only.
type cachedBody struct {
	raw  []byte           // the stored body
	head *wirepb.Envelope // decoded, without content and group
}

// bodyCache holds the most recently read shared bodies.
type bodyCache struct {
	mu   sync.Mutex
	m    map[uint64]*cachedBody // guarded by mu
	ring []uint64               // guarded by mu: ids in insertion order, for eviction
	next int                    // guarded by mu
}

func newBodyCache(n int) *bodyCache {
	return &bodyCache{m: make(map[uint64]*cachedBody, n), ring: make([]uint64, n)}
}

func (c *bodyCache) get(id uint64) (*cachedBody, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	b, ok := c.m[id]
	return b, ok
}

func (c *bodyCache) put(id uint64, b *cachedBody) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[id]; ok {
		return
	}
	if old := c.ring[c.next]; old != 0 {
		delete(c.m, old)
	}
	c.ring[c.next] = id
	c.next = (c.next + 1) % len(c.ring)
	c.m[id] = b
}

// Get returns entry id of dev, or ErrNotFound if it is absent or expired.
func (s *Store) Get(ctx context.Context, dev wire.DeviceAddr, id uint64) (*wirepb.Envelope, error) {
	if err := s.readable(ctx); err != nil {
		return nil, err
	}
	view := s.acquire()
	defer view.release()
	v, closer, err := view.snap.Get(entryKey(dev, id))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, storageErr("get", err)
	}
	defer closer.Close()
	em := parseEntry(v)
	if s.expired(em.timeMs, s.nowMs()) {
		return nil, ErrNotFound
	}
	return s.decodeEntry(view.snap, dev, id, v, em)
}

// decodeEntry decodes a stored entry and puts its shared body back. If the
// body is gone because the entry was deleted meanwhile (Range and Get read
// without the committer), it returns ErrNotFound.
func (s *Store) decodeEntry(r pebble.Reader, dev wire.DeviceAddr, id uint64, v []byte, em entryMeta) (*wirepb.Envelope, error) {
	env := &wirepb.Envelope{}
	if err := proto.Unmarshal(v, env); err != nil {
		return nil, storageErr("decode entry", err)
	}
	if em.bodyID == 0 {
		return env, nil
	}
	env.ProtoReflect().SetUnknown(nil) // the EntryBodyRef is the store's, not the device's
	body, closer, err := r.Get(bodyKey(em.bodyID))
	if errors.Is(err, pebble.ErrNotFound) {
		if _, c2, err2 := r.Get(entryKey(dev, id)); errors.Is(err2, pebble.ErrNotFound) {
			return nil, ErrNotFound
		} else if err2 == nil {
			c2.Close()
		}
		// Only a damaged store gets here. The envelope goes out without its
		// shared part, so the device can drop and ack it instead of
		// stalling its inbox on an entry that can never be read.
		s.o.Logger.Error("inbox: entry refers to a missing body", "device", dev.String(), "id", id, "body", em.bodyID)
		return env, nil
	}
	if err != nil {
		return nil, storageErr("get body", err)
	}
	defer closer.Close()
	if err := (proto.UnmarshalOptions{Merge: true}).Unmarshal(body, env); err != nil {
		return nil, storageErr("decode body", err)
	}
	return env, nil
}

// Depth returns how many entries dev holds and their stored bytes, counting
// expired entries the sweep has not removed yet.
func (s *Store) Depth(ctx context.Context, dev wire.DeviceAddr) (count uint64, bytes uint64, err error) {
	if err := s.readable(ctx); err != nil {
		return 0, 0, err
	}
	v := s.acquire()
	defer v.release()
	meta := &storepb.InboxMeta{}
	if _, err := getProto(v.snap, metaKey(dev), meta); err != nil {
		return 0, 0, err
	}
	return meta.Count, meta.Bytes, nil
}

// readable reports whether a read may run.
func (s *Store) readable(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case <-s.quit:
		return ErrClosed
	default:
		return nil
	}
}

// getProto reads key into m; found is false if the key is absent.
func getProto(r pebble.Reader, key []byte, m proto.Message) (found bool, err error) {
	v, closer, err := r.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, storageErr("get", err)
	}
	defer closer.Close()
	if err := proto.Unmarshal(v, m); err != nil {
		return false, storageErr("decode", err)
	}
	return true, nil
}

func (s *Store) nowMs() int64 { return s.o.Now().UnixMilli() }

// expired reports whether something stored at timeMs is past the TTL at nowMs.
func (s *Store) expired(timeMs, nowMs int64) bool { return timeMs+s.ttlMs <= nowMs }

func duplicateOf(rec *storepb.SendRecord) Accepted {
	return Accepted{Seq: rec.Seq, ServerTime: time.UnixMilli(rec.ServerTimeMs), Duplicate: true}
}

func storageErr(what string, err error) error {
	return fmt.Errorf("%w: %s: %w", ErrStorage, what, err)
}

// marshalEntries marshals each entry's envelope as the caller gave it. The
// committer appends Id, Seq and ServerTimeMs (see withServerFields), so the
// expensive part runs on the caller's goroutine, not the committer's.
func marshalEntries(es []Entry) ([][]byte, error) {
	vals := make([][]byte, len(es))
	for i, e := range es {
		if e.Env == nil {
			return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "inbox: entry %d for %s has no envelope", i, e.To)
		}
		if e.Coalesce != "" && e.Env.Receipt == nil {
			return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "inbox: marker %d for %s has no receipt", i, e.To)
		}
		env := e.Env
		if len(env.ProtoReflect().GetUnknown()) > 0 {
			// Unknown fields could pose as the store's own (EntryBodyRef).
			env = proto.CloneOf(env)
			env.ProtoReflect().SetUnknown(nil)
		}
		v, err := proto.Marshal(env)
		if err != nil {
			return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "inbox: entry %d for %s does not encode", i, e.To)
		}
		vals[i] = v
	}
	return vals, nil
}
