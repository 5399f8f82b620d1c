package inbox

import (
	"context"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"google.golang.org/protobuf/proto"
)

// expireChunkSize is how many deletions one expiry op carries at most.
const expireChunkSize = 1024

// expireChunk is one expiry op: entries and dedup records found expired by a
// sweep. The committer checks each again before deleting it.
type expireChunk struct {
	entries []entryRef
	dedup   []dedupRef
}

type entryRef struct {
	dev wire.DeviceAddr
	id  uint64
}

type dedupRef struct {
	dev         wire.DeviceAddr
	clientMsgID string
}

// ExpireNow runs one expiry sweep: it deletes the entries and dedup records
// older than the TTL and returns how many entries it deleted. The
// background sweeper calls it every SweepInterval.
//
// Cost: it reads every inbox meta, the expired entries plus one live entry
// per non-empty inbox, and every dedup record, so O(devices + dedup
// records) per sweep.
func (s *Store) ExpireNow(ctx context.Context) (int, error) {
	if err := s.readable(ctx); err != nil {
		return 0, err
	}
	sw := &sweep{s: s, ctx: ctx, now: s.nowMs(), chunk: &expireChunk{}}
	err := sw.scanMetas()
	if err == nil {
		err = sw.scanDedup()
	}
	if err == nil {
		err = sw.flush()
	}
	if err == nil {
		sw.sample.report(s.m)
	}
	return sw.expired, err
}

// sweep is the state of one ExpireNow.
type sweep struct {
	s       *Store
	ctx     context.Context
	now     int64
	chunk   *expireChunk
	expired int
	sample  depthSample
}

// depthSample is what a sweep learns of inbox depth on the way: the
// on-call gauges come from it, so a scrape scans nothing.
type depthSample struct {
	entries, bytes, maxDepth uint64
	oldestMs                 int64 // server time of the oldest live entry (0: none)
}

func (d depthSample) report(m *metrics) {
	m.depthEntries.Set(float64(d.entries))
	m.depthBytes.Set(float64(d.bytes))
	m.depthMax.Set(float64(d.maxDepth))
	m.oldestMs.Store(d.oldestMs)
}

// scanMetas finds the expired entries of every non-empty inbox. Ids and
// times grow together per device, so it stops at a device's first live entry.
func (sw *sweep) scanMetas() error {
	it, err := sw.s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixMeta}, UpperBound: []byte{prefixMeta + 1}})
	if err != nil {
		return storageErr("sweep", err)
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		dev, rest, ok := parseDevKey(it.Key())
		if !ok || len(rest) != 0 {
			continue
		}
		meta := &storepb.InboxMeta{}
		if v, err := it.ValueAndErr(); err != nil || proto.Unmarshal(v, meta) != nil || meta.Count == 0 {
			continue
		}
		sw.sample.entries += meta.Count
		sw.sample.bytes += meta.Bytes
		sw.sample.maxDepth = max(sw.sample.maxDepth, meta.Count)
		if err := sw.scanDevice(dev); err != nil {
			return err
		}
	}
	return sw.iterErr(it)
}

func (sw *sweep) scanDevice(dev wire.DeviceAddr) error {
	p := devPrefix(prefixInbox, dev)
	it, err := sw.s.db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
	if err != nil {
		return storageErr("sweep", err)
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			break // reported by iterErr
		}
		if t := envTime(v); !sw.s.expired(t, sw.now) {
			if o := sw.sample.oldestMs; o == 0 || t < o {
				sw.sample.oldestMs = t
			}
			break
		}
		sw.chunk.entries = append(sw.chunk.entries, entryRef{dev, entryID(it.Key())})
		if err := sw.maybeFlush(); err != nil {
			return err
		}
	}
	return sw.iterErr(it)
}

// scanDedup finds the expired dedup records.
func (sw *sweep) scanDedup() error {
	it, err := sw.s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixDedup}, UpperBound: []byte{prefixDedup + 1}})
	if err != nil {
		return storageErr("sweep", err)
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		dev, rest, ok := parseDevKey(it.Key())
		if !ok {
			continue
		}
		rec := &storepb.SendRecord{}
		if v, err := it.ValueAndErr(); err != nil || proto.Unmarshal(v, rec) != nil {
			continue
		}
		if sw.s.expired(rec.ServerTimeMs, sw.now) {
			sw.chunk.dedup = append(sw.chunk.dedup, dedupRef{dev, string(rest)})
			if err := sw.maybeFlush(); err != nil {
				return err
			}
		}
	}
	return sw.iterErr(it)
}

func (sw *sweep) iterErr(it *pebble.Iterator) error {
	if err := it.Error(); err != nil {
		return storageErr("sweep", err)
	}
	return sw.ctx.Err()
}

func (sw *sweep) maybeFlush() error {
	if len(sw.chunk.entries)+len(sw.chunk.dedup) < expireChunkSize {
		return sw.ctx.Err()
	}
	return sw.flush()
}

// flush sends the current chunk to the committer and waits for it.
func (sw *sweep) flush() error {
	c := sw.chunk
	if len(c.entries)+len(c.dedup) == 0 {
		return nil
	}
	sw.chunk = &expireChunk{}
	var n int
	err := sw.s.do(sw.ctx, func(g *group) (err error) {
		n, err = g.expire(c)
		return err
	})
	sw.expired += n
	return err
}

// sweep runs ExpireNow every SweepInterval until ctx ends.
func (s *Store) sweep(ctx context.Context) {
	defer close(s.sweepDone)
	if s.o.SweepInterval < 0 {
		return
	}
	t := time.NewTicker(s.o.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, err := s.ExpireNow(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			s.o.Logger.Warn("inbox: expiry sweep failed", "expired", n, "err", err)
		case n > 0:
			s.o.Logger.Info("inbox: expired entries", "count", n)
		}
	}
}
