package inbox

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
)

var (
	alice1 = wire.DeviceAddr{Account: "alice", Device: 1}
	alice2 = wire.DeviceAddr{Account: "alice", Device: 2}
	bob1   = wire.DeviceAddr{Account: "bob", Device: 1}
	bob2   = wire.DeviceAddr{Account: "bob", Device: 2}
	carol1 = wire.DeviceAddr{Account: "carol", Device: 1}
)

// t0 is the fake clock's start.
var t0 = time.UnixMilli(1_700_000_000_000)

// clock is a settable clock for Options.Now.
type clock struct{ ms atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ms.Store(t0.UnixMilli())
	return c
}

func (c *clock) Now() time.Time { return time.UnixMilli(c.ms.Load()) }

// Set puts the clock at t0 + d.
func (c *clock) Set(d time.Duration) { c.ms.Store(t0.Add(d).UnixMilli()) }

// newStore opens a Store on a fresh in-memory Pebble. The background
// sweeper is off unless o sets SweepInterval; Now defaults to a fixed clock.
func newStore(t testing.TB, o Options) (*Store, *pebble.DB) {
	t.Helper()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return startStore(t, db, o), db
}

// startStore starts a Store on db and closes it when the test ends.
func startStore(t testing.TB, db *pebble.DB, o Options) *Store {
	t.Helper()
	if o.SweepInterval == 0 {
		o.SweepInterval = -1
	}
	if o.Now == nil {
		o.Now = newClock().Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	s, err := New(db, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func envelope(from wire.DeviceAddr, text string) *wirepb.Envelope {
	return &wirepb.Envelope{Sender: from.Account, SenderDevice: from.Device,
		Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte(text)}
}

// send makes a Send of text from sender to every device in to.
func send(from wire.DeviceAddr, clientMsgID, conv, text string, to ...wire.DeviceAddr) Send {
	m := Send{Sender: from, ClientMsgID: clientMsgID, Conversation: conv}
	for _, d := range to {
		e := envelope(from, text)
		e.ClientMsgId = clientMsgID
		m.Entries = append(m.Entries, Entry{To: d, Env: e})
	}
	return m
}

func mustAppend(t testing.TB, s *Store, m Send) Accepted {
	t.Helper()
	acc, err := s.Append(context.Background(), m)
	if err != nil {
		t.Fatalf("Append(%s): %v", m.ClientMsgID, err)
	}
	return acc
}

// rangeAll returns every live entry of dev.
func rangeAll(t testing.TB, s *Store, dev wire.DeviceAddr) []Item {
	t.Helper()
	items, err := s.Range(context.Background(), dev, 0, 1<<30)
	if err != nil {
		t.Fatalf("Range(%s): %v", dev, err)
	}
	return items
}

func itemIDs(items []Item) []uint64 {
	ids := []uint64{}
	for _, it := range items {
		ids = append(ids, it.ID)
	}
	return ids
}

func contents(items []Item) []string {
	out := []string{}
	for _, it := range items {
		out = append(out, string(it.Env.Content))
	}
	return out
}

type depthWant struct{ count, bytes uint64 }

func depth(t testing.TB, s *Store, dev wire.DeviceAddr) depthWant {
	t.Helper()
	c, b, err := s.Depth(context.Background(), dev)
	if err != nil {
		t.Fatalf("Depth(%s): %v", dev, err)
	}
	return depthWant{c, b}
}

// sizes sums the stored sizes of items.
func sizes(items []Item) uint64 {
	var n uint64
	for _, it := range items {
		n += uint64(it.Size)
	}
	return n
}

// isSentinel reports whether the first *wire.Error in err's chain is
// exactly want (errors.Is matches by code, which ErrStorage and ErrClosed share).
func isSentinel(err error, want *wire.Error) bool {
	var we *wire.Error
	return errors.As(err, &we) && we == want
}

// gate blocks the committer inside its first commit until released, so a
// test can queue ops that then land in one group.
type gate struct {
	entered chan struct{}
	release chan struct{}
	once    sync.Once
	fail    func(call int) error // optional: the error of commit number call (1-based)
	calls   atomic.Int32
}

func newGate() *gate {
	return &gate{entered: make(chan struct{}), release: make(chan struct{})}
}

func (g *gate) commit(b *pebble.Batch, o *pebble.WriteOptions) error {
	call := int(g.calls.Add(1))
	g.once.Do(func() {
		close(g.entered)
		<-g.release
	})
	if g.fail != nil {
		if err := g.fail(call); err != nil {
			return err
		}
	}
	return b.Commit(o)
}

// waitQueued waits until n ops sit in the committer's channel.
func waitQueued(t testing.TB, s *Store, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(s.ops) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d ops queued, want %d", len(s.ops), n)
		}
		runtime.Gosched()
	}
}

// result of an async call.
type result[T any] struct {
	v   T
	err error
}

func async[T any](f func() (T, error)) <-chan result[T] {
	ch := make(chan result[T], 1)
	go func() {
		v, err := f()
		ch <- result[T]{v, err}
	}()
	return ch
}

// metricValue returns the value of a counter (or the sample sum and count of
// a histogram) from reg, matching every label in labels.
func metricValue(t testing.TB, reg *prometheus.Registry, name string, labels map[string]string) (value float64, count uint64) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if want, ok := labels[lp.GetName()]; ok && want != lp.GetValue() {
					continue next
				}
			}
			if h := m.GetHistogram(); h != nil {
				value += h.GetSampleSum()
				count += h.GetSampleCount()
			} else {
				value += m.GetCounter().GetValue()
			}
		}
	}
	return value, count
}

// reopener returns a function that opens a Store (and its db) on fs,
// again and again, as a restarted node would.
func reopener(t testing.TB, fs vfs.FS) func() (*Store, *pebble.DB) {
	return func() (*Store, *pebble.DB) {
		t.Helper()
		db, err := store.Open("db", store.Options{FS: fs})
		if err != nil {
			t.Fatal(err)
		}
		s, err := New(db, Options{SweepInterval: -1, Now: newClock().Now})
		if err != nil {
			t.Fatal(err)
		}
		return s, db
	}
}
