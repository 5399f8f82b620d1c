package inbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
)

// members returns n devices m0..m(n-1), device 1 each.
func members(n int) []wire.DeviceAddr {
	out := make([]wire.DeviceAddr, n)
	for i := range out {
		out[i] = wire.DeviceAddr{Account: fmt.Sprintf("m%d", i), Device: 1}
	}
	return out
}

// fanJobKeys counts the job records ('j') left in db.
func fanJobKeys(t testing.TB, db pebble.Reader) int {
	t.Helper()
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixFanout}, UpperBound: []byte{prefixFanout + 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	n := 0
	for ok := it.First(); ok; ok = it.Next() {
		if k := it.Key(); len(k) == 10 && k[9] == 'j' {
			n++
		}
	}
	return n
}

// waitFanout waits until every job is expanded and the readers' view
// shows it (the last chunk may still be syncing when its job key is gone
// from the live database).
func waitFanout(t testing.TB, s *Store, db *pebble.DB) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for fanJobKeys(t, db) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d fan-out jobs still pending", fanJobKeys(t, db))
		}
		time.Sleep(time.Millisecond) // polling Pebble: no event to await from outside the committer
	}
	barrier(t, s)
}

// barrier returns once every group committed before it is synced and
// visible to readers: an op that writes nothing goes through the sync
// stage behind them.
func barrier(t testing.TB, s *Store) {
	t.Helper()
	if err := s.do(context.Background(), func(*group) error { return nil }); err != nil {
		t.Fatal(err)
	}
}

// seqs returns the seq of every item.
func seqs(items []Item) []uint64 {
	out := make([]uint64, len(items))
	for i, it := range items {
		out[i] = it.Env.Seq
	}
	return out
}

func TestFanoutQueuesLargeGroups(t *testing.T) {
	reg := prometheus.NewRegistry()
	s, db := newStore(t, Options{FanoutInline: 4, FanoutChunk: 3, Registerer: reg})
	to := members(10)
	acc := mustAppendGroup(t, s, groupSend(alice1, "big", "hello", to...))
	if acc.Seq != 1 {
		t.Fatalf("seq = %d, want 1", acc.Seq)
	}
	waitFanout(t, s, db)
	for _, d := range to {
		items := rangeAll(t, s, d)
		if len(items) != 1 || string(items[0].Env.Content) != "hello" || items[0].Env.Seq != 1 ||
			items[0].Env.ServerTimeMs != acc.ServerTime.UnixMilli() || items[0].Env.GroupId != testGroup {
			t.Fatalf("%s holds %v, want one entry of the message", d, items)
		}
	}
	bodies, refs := bodyKeys(t, db)
	if len(bodies) != 1 || len(refs) != 1 || bodyRefCount(t, s, bodies[0]) != 10 {
		t.Fatalf("bodies %v refs %v, want one body with 10 references", bodies, refs)
	}
	if v, _ := metricValue(t, reg, "ferry_inbox_fanout_jobs_queued_total", nil); v != 1 {
		t.Fatalf("jobs queued = %v, want 1", v)
	}
	if v, _ := metricValue(t, reg, "ferry_inbox_fanout_entries_total", nil); v != 10 {
		t.Fatalf("fan-out entries = %v, want 10", v)
	}
	// A retry is a duplicate and queues nothing.
	if dup := mustAppendGroup(t, s, groupSend(alice1, "big", "hello", to...)); !dup.Duplicate || dup.Seq != 1 {
		t.Fatalf("retry = %+v, want the duplicate of seq 1", dup)
	}
	// Small groups stay inline.
	mustAppendGroup(t, s, groupSend(alice1, "small", "hi", to[:4]...))
	if v, _ := metricValue(t, reg, "ferry_inbox_fanout_jobs_queued_total", nil); v != 1 {
		t.Fatalf("jobs queued = %v after a retry and a small send, want 1", v)
	}
	// Acking every entry deletes the body.
	for _, d := range to {
		for _, it := range rangeAll(t, s, d) {
			if _, err := s.Ack(context.Background(), d, []uint64{it.ID}, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	if bodies, refs := bodyKeys(t, db); len(bodies)+len(refs) != 0 {
		t.Fatalf("after every ack bodies %v refs %v remain", bodies, refs)
	}
}

// An append to a conversation with a job pending queues behind it, so every
// device gets the group's messages in seq order; other conversations do not
// wait.
func TestFanoutKeepsOrderBehindAJob(t *testing.T) {
	reg := prometheus.NewRegistry()
	gate := newGate()
	s, db := newStore(t, Options{FanoutInline: 4, FanoutChunk: 1, Registerer: reg, commit: gate.commit})
	to := members(8)
	big := async(func() (Accepted, error) {
		return s.AppendGroup(context.Background(), groupSend(alice1, "big", "first", to...))
	})
	<-gate.entered // the job's commit is held
	small := async(func() (Accepted, error) {
		return s.AppendGroup(context.Background(), groupSend(alice1, "small", "second", to[6], to[7]))
	})
	waitQueued(t, s, 1)
	close(gate.release)
	if r := <-big; r.err != nil || r.v.Seq != 1 {
		t.Fatalf("big send = %+v, %v", r.v, r.err)
	}
	if r := <-small; r.err != nil || r.v.Seq != 2 {
		t.Fatalf("small send = %+v, %v", r.v, r.err)
	}
	// A 1:1 message is not held up by the group's job.
	mustAppend(t, s, send(alice1, "direct", "dm", "dm", to[7]))
	waitFanout(t, s, db)
	if v, _ := metricValue(t, reg, "ferry_inbox_fanout_jobs_queued_total", nil); v != 2 {
		t.Fatalf("jobs queued = %v, want 2 (the small send queued behind the big one)", v)
	}
	for _, d := range to[6:] {
		var group []uint64
		for _, it := range rangeAll(t, s, d) {
			if it.Env.GroupId != "" {
				group = append(group, it.Env.Seq)
			}
		}
		if fmt.Sprint(group) != "[1 2]" {
			t.Fatalf("%s got group seqs %v, want [1 2]", d, group)
		}
	}
}

// A crash between chunks: after a restart the job goes on from its cursor,
// and every device ends with exactly one entry.
func TestFanoutResumesAfterRestart(t *testing.T) {
	for _, okChunks := range []int{0, 2} {
		t.Run(fmt.Sprintf("after %d chunks", okChunks), func(t *testing.T) {
			fs := vfs.NewMem()
			db, err := store.Open("db", store.Options{FS: fs})
			if err != nil {
				t.Fatal(err)
			}
			boom := errors.New("disk gone")
			gate := newGate()
			close(gate.release)
			gate.fail = func(call int) error {
				if call > 1+okChunks { // call 1 commits the job
					return boom
				}
				return nil
			}
			o := Options{FanoutInline: 2, FanoutChunk: 2, SweepInterval: -1, Now: newClock().Now,
				Logger: slog.New(slog.DiscardHandler), commit: gate.commit}
			s, err := New(db, o)
			if err != nil {
				t.Fatal(err)
			}
			to := members(9)
			mustAppendGroup(t, s, groupSend(alice1, "big", "hello", to...))
			deadline := time.Now().Add(10 * time.Second)
			for int(gate.calls.Load()) < 2+okChunks { // the first failing chunk was tried
				if time.Now().After(deadline) {
					t.Fatal("the committer never tried the failing chunk")
				}
				time.Sleep(time.Millisecond)
			}
			s.Close()
			got := 0
			for _, d := range to {
				got += len(rangeAllDB(t, db, d))
			}
			if got != 2*okChunks {
				t.Fatalf("%d entries before the restart, want %d", got, 2*okChunks)
			}
			db.Close()

			db, err = store.Open("db", store.Options{FS: fs})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() }) // after the store's Close (cleanups run last-in first-out)
			o.commit = nil
			s = startStore(t, db, o)
			waitFanout(t, s, db)
			for _, d := range to {
				if items := rangeAll(t, s, d); len(items) != 1 || items[0].Env.Seq != 1 {
					t.Fatalf("%s holds %v after the restart, want one entry", d, items)
				}
			}
		})
	}
}

// rangeAllDB reads a device's entries straight from db (the store is closed).
func rangeAllDB(t testing.TB, db *pebble.DB, dev wire.DeviceAddr) [][]byte {
	t.Helper()
	p := devPrefix(prefixInbox, dev)
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	var out [][]byte
	for ok := it.First(); ok; ok = it.Next() {
		out = append(out, append([]byte(nil), it.Value()...))
	}
	return out
}

func TestFanoutQueueIsBounded(t *testing.T) {
	gate := newGate()
	s, db := newStore(t, Options{FanoutInline: 2, FanoutChunk: 1, MaxFanoutJobs: 1, commit: gate.commit})
	to := members(5)
	one := async(func() (Accepted, error) {
		return s.AppendGroup(context.Background(), groupSend(alice1, "one", "x", to...))
	})
	<-gate.entered // the first job's commit is held
	two := async(func() (Accepted, error) {
		return s.AppendGroup(context.Background(), groupSend(alice1, "two", "y", to...))
	})
	waitQueued(t, s, 1)
	close(gate.release)
	if r := <-one; r.err != nil {
		t.Fatal(r.err)
	}
	r := <-two
	var we *wire.Error
	if !errors.As(r.err, &we) || we.Code != wirepb.ErrorCode_UNAVAILABLE || !we.Retryable || we.Message != ErrFanoutBusy.Message {
		t.Fatalf("second large send = %v, want ErrFanoutBusy", r.err)
	}
	waitFanout(t, s, db)
	if acc := mustAppendGroup(t, s, groupSend(alice1, "two", "y", to...)); acc.Duplicate || acc.Seq != 2 {
		t.Fatalf("retry after the queue drained = %+v, want seq 2", acc)
	}
}

// GroupAppend.Also commits with the append, inline and queued, or not at
// all.
func TestGroupAppendAlsoIsAtomic(t *testing.T) {
	for _, n := range []int{2, 6} { // inline, queued (FanoutInline 4)
		t.Run(fmt.Sprint(n, " recipients"), func(t *testing.T) {
			gate := newGate()
			close(gate.release)
			gate.fail = func(call int) error {
				if call == 1 {
					return errors.New("disk gone")
				}
				return nil
			}
			s, db := newStore(t, Options{FanoutInline: 4, commit: gate.commit})
			m := groupSend(alice1, "", "update", members(n)...)
			m.Also = []store.Write{{Key: []byte("gr-test"), Value: []byte("v2")}}
			if _, err := s.AppendGroup(context.Background(), m); err == nil {
				t.Fatal("the failed commit succeeded")
			}
			if _, c, err := db.Get([]byte("gr-test")); err == nil {
				c.Close()
				t.Fatal("a failed append kept its Also write")
			}
			mustAppendGroup(t, s, m)
			v, c, err := db.Get([]byte("gr-test"))
			if err != nil || string(v) != "v2" {
				t.Fatalf("Also write after the append: %q, %v", v, err)
			}
			c.Close()
		})
	}
}
