package inbox

// Fan-out of large group appends.
//
// A group append with more recipients than Options.FanoutInline is not
// written as one entry per device in the sender's commit. That commit holds
// what makes the send durable and answerable: its sequence number, its
// dedup record, the shared body (with a reference count for every
// recipient) and a fan-out job listing the recipients ('f' keys, see
// package store). The sender's ✓ waits for that commit only. The committer
// then expands the job: each later commit group carries one chunk of at
// most Options.FanoutChunk entries plus the job's cursor, next to whatever
// ops the group holds, so other sends wait for at most one chunk and share
// its fsync. A crash between chunks loses nothing: the job and its cursor
// are in Pebble, and New picks the job up where the last commit left it.
//
// Order: appends with the same order key (the group's conversation) are
// handed to every device in sequence order. An append whose key has a job
// pending is therefore queued as a job too, behind it, whatever its size;
// jobs are expanded strictly one after another, in id order.
//
// Quotas: a job's entries skip the recipients' quotas. The sender was told
// ✓ before the entries exist, so refusing one later would be a silent drop
// (invariant 9); a device's inbox can go over its quota by queued group
// messages, and 1:1 sends to it then fail with INBOX_FULL as usual. Group
// traffic is bounded by the group size cap, MaxFanoutJobs and the senders'
// rate limits instead.
//
// All of this state is the committer's: the job queue below is read and
// changed only on the committer goroutine (and by New before it starts),
// and only after a commit succeeded, so a failed commit changes nothing.

import (
	"encoding/binary"
	"errors"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

const prefixFanout = store.PrefixFanout

// fanCounterKey holds the last job id assigned.
var fanCounterKey = []byte{prefixFanout}

func fanJobKey(id uint64) []byte {
	return append(binary.BigEndian.AppendUint64([]byte{prefixFanout}, id), 'j')
}

func fanNextKey(id uint64) []byte {
	return append(binary.BigEndian.AppendUint64([]byte{prefixFanout}, id), 'n')
}

// ErrFanoutBusy: MaxFanoutJobs jobs are queued; a large group append is
// refused (nothing stored) until some are expanded.
var ErrFanoutBusy = &wire.Error{Code: wirepb.ErrorCode_UNAVAILABLE, Message: "inbox: group fan-out queue is full", Retryable: true, RetryAfterMs: 100}

// fanJob is a queued job as the committer knows it.
type fanJob struct {
	id       uint64
	key      string // order key
	body     bodyRef
	seq      uint64
	timeMs   int64
	to       []wire.DeviceAddr
	next     int // recipients whose entry is committed
	upto     int // recipients whose entry is in the current group (>= next)
	inFlight bool
}

// fanout is the committer's job queue.
type fanout struct {
	jobs    []*fanJob      // pending, in id order
	pending map[string]int // order key -> pending jobs
}

// queued reports whether an append with order key must queue behind a job.
func (g *group) queued(key string) bool {
	if key == "" {
		return false
	}
	if g.s.fan.pending[key] > 0 {
		return true
	}
	for _, j := range g.fanNew {
		if j.key == key {
			return true
		}
	}
	return false
}

// queueGroup is appendGroup's path for a large (or queued) append: it
// stores the body with a reference for every recipient and a job, and
// writes no entries.
func (g *group) queueGroup(m *GroupAppend, key string, body []byte, conv *counter, seq uint64, sender *devState, dedupID string) (Accepted, error) {
	if len(g.s.fan.jobs)+len(g.fanNew) >= g.s.o.MaxFanoutJobs {
		return Accepted{}, ErrFanoutBusy.Clone()
	}
	bodies, err := g.counter(bodyCounterKey)
	if err != nil {
		return Accepted{}, err
	}
	jobs, err := g.counter(fanCounterKey)
	if err != nil {
		return Accepted{}, err
	}
	j := &fanJob{id: jobs.v + 1, key: key, body: bodyRef{id: bodies.v + 1, size: uint32(len(body))},
		seq: seq, timeMs: g.now, to: m.Recipients}
	rec := &storepb.FanoutJob{OrderKey: key, BodyId: j.body.id, BodySize: j.body.size, Seq: seq, ServerTimeMs: g.now,
		Recipients: make([]*storepb.FanoutRecipient, len(m.Recipients))}
	for i, d := range m.Recipients {
		rec.Recipients[i] = &storepb.FanoutRecipient{Username: d.Account, DeviceId: d.Device}
	}
	v, err := proto.Marshal(rec)
	if err != nil {
		return Accepted{}, storageErr("encode fan-out job", err)
	}
	// Validated: from here on the op only writes.
	g.apply(m.Also)
	bodies.v, bodies.dirty = j.body.id, true
	jobs.v, jobs.dirty = j.id, true
	g.set(bodyKey(j.body.id), body)
	g.bodies[j.body.id] = &bodyState{refs: uint32(len(m.Recipients)), timeMs: g.now, known: true, dirty: true}
	g.set(fanJobKey(j.id), v)
	g.fanNew = append(g.fanNew, j)
	g.count.bodiesStored++
	g.count.fanQueued++
	return g.accept(conv, seq, sender, dedupID), nil
}

// expand writes the next chunk of the oldest job into g (before the
// group's ops). A read error leaves the chunk for a later group.
func (g *group) expand() {
	if len(g.s.fan.jobs) == 0 {
		return
	}
	j := g.s.fan.jobs[0]
	upto := min(j.next+g.s.o.FanoutChunk, len(j.to))
	chunk := j.to[j.next:upto]
	puts, err := g.plan(len(chunk), func(i int) (wire.DeviceAddr, []byte) { return chunk[i], nil },
		j.seq, j.body, false, j.timeMs)
	if err != nil {
		g.s.o.Logger.Error("inbox: fan-out chunk", "job", j.id, "err", err)
		return
	}
	g.write(puts)
	if upto == len(j.to) {
		g.del(fanJobKey(j.id))
		g.del(fanNextKey(j.id))
	} else {
		g.set(fanNextKey(j.id), binary.BigEndian.AppendUint64(nil, uint64(upto)))
	}
	j.upto, j.inFlight = upto, true
	g.count.fanEntries += len(puts)
}

// committed updates the queue after g committed: the chunk it expanded
// moves the cursor (and may finish the oldest job), and the jobs its ops
// queued join the queue. After a failed commit it only forgets the chunk.
func (f *fanout) committed(g *group, ok bool) {
	if len(f.jobs) > 0 && f.jobs[0].inFlight {
		j := f.jobs[0]
		j.inFlight = false
		if ok {
			j.next = j.upto
			if j.next == len(j.to) {
				f.jobs[0] = nil
				f.jobs = f.jobs[1:]
				f.done(j.key)
			}
		}
	}
	if !ok {
		return
	}
	for _, j := range g.fanNew {
		f.jobs = append(f.jobs, j)
		if j.key != "" {
			f.pending[j.key]++
		}
	}
}

func (f *fanout) done(key string) {
	if key == "" {
		return
	}
	if f.pending[key]--; f.pending[key] <= 0 {
		delete(f.pending, key)
	}
}

// loadFanout reads the pending jobs and their cursors.
func loadFanout(db pebble.Reader) (*fanout, error) {
	f := &fanout{pending: make(map[string]int)}
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixFanout}, UpperBound: []byte{prefixFanout + 1}})
	if err != nil {
		return nil, storageErr("load fan-out jobs", err)
	}
	defer it.Close()
	var last *fanJob
	for ok := it.First(); ok; ok = it.Next() {
		k := it.Key()
		if len(k) != 10 {
			continue // the job counter
		}
		id := binary.BigEndian.Uint64(k[1:9])
		v, err := it.ValueAndErr()
		if err != nil {
			return nil, storageErr("load fan-out jobs", err)
		}
		switch k[9] {
		case 'j':
			rec := &storepb.FanoutJob{}
			if err := proto.Unmarshal(v, rec); err != nil {
				return nil, storageErr("load fan-out job", err)
			}
			j := &fanJob{id: id, key: rec.OrderKey, body: bodyRef{id: rec.BodyId, size: rec.BodySize},
				seq: rec.Seq, timeMs: rec.ServerTimeMs, to: make([]wire.DeviceAddr, len(rec.Recipients))}
			for i, r := range rec.Recipients {
				j.to[i] = wire.DeviceAddr{Account: r.Username, Device: r.DeviceId}
			}
			f.jobs = append(f.jobs, j)
			if j.key != "" {
				f.pending[j.key]++
			}
			last = j
		case 'n':
			if last == nil || last.id != id || len(v) != 8 {
				return nil, storageErr("load fan-out jobs", errors.New("cursor without its job"))
			}
			last.next = min(int(binary.BigEndian.Uint64(v)), len(last.to))
		}
	}
	if err := it.Error(); err != nil {
		return nil, storageErr("load fan-out jobs", err)
	}
	return f, nil
}

// pendingEntries is how many entries the queued jobs have still to write.
func (f *fanout) pendingEntries() int {
	n := 0
	for _, j := range f.jobs {
		n += len(j.to) - j.next
	}
	return n
}
