package inbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
)

func TestAppendThenRange(t *testing.T) {
	clk := newClock()
	s, _ := newStore(t, Options{Now: clk.Now})
	for i := 1; i <= 5; i++ {
		clk.Set(time.Duration(i) * time.Second)
		acc := mustAppend(t, s, send(alice1, fmt.Sprint("m", i), "alice|bob", fmt.Sprint("hello ", i), bob1))
		if acc.Seq != uint64(i) || !acc.ServerTime.Equal(t0.Add(time.Duration(i)*time.Second)) || acc.Duplicate {
			t.Fatalf("send %d: Accepted = %+v", i, acc)
		}
	}

	items := rangeAll(t, s, bob1)
	for i, it := range items {
		n := uint64(i + 1)
		e := it.Env
		if it.ID != n || e.Id != n || e.Seq != n || e.ServerTimeMs != t0.Add(time.Duration(n)*time.Second).UnixMilli() {
			t.Errorf("item %d: ID %d, envelope id %d seq %d time %d", i, it.ID, e.Id, e.Seq, e.ServerTimeMs)
		}
		if string(e.Content) != fmt.Sprint("hello ", n) || e.Sender != "alice" || e.SenderDevice != 1 ||
			e.ClientMsgId != fmt.Sprint("m", n) || e.Type != wirepb.EnvelopeType_SIGNAL_MESSAGE {
			t.Errorf("item %d: envelope %v", i, e)
		}
		if it.Size < proto.Size(e) {
			t.Errorf("item %d: size %d for an envelope of %d bytes", i, it.Size, proto.Size(e))
		}
	}
	if got := depth(t, s, bob1); got != (depthWant{5, sizes(items)}) {
		t.Errorf("Depth = %+v, want 5 entries of %d bytes", got, sizes(items))
	}

	tests := map[string]struct {
		after uint64
		limit int
		want  []uint64
	}{
		"all":          {0, 100, []uint64{1, 2, 3, 4, 5}},
		"limit":        {0, 2, []uint64{1, 2}},
		"after cursor": {2, 2, []uint64{3, 4}},
		"after last":   {5, 10, []uint64{}},
		"zero limit":   {0, 0, []uint64{}},
		"max after":    {^uint64(0), 10, []uint64{}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			items, err := s.Range(context.Background(), bob1, tc.after, tc.limit)
			if err != nil {
				t.Fatal(err)
			}
			if got := itemIDs(items); !slices.Equal(got, tc.want) {
				t.Errorf("Range(after %d, limit %d) = %v, want %v", tc.after, tc.limit, got, tc.want)
			}
		})
	}

	if items := rangeAll(t, s, bob2); len(items) != 0 {
		t.Errorf("other device of the same account has %v", itemIDs(items))
	}
	env, err := s.Get(context.Background(), bob1, 3)
	if err != nil || string(env.Content) != "hello 3" {
		t.Errorf("Get(3) = %v, %v", env, err)
	}
	if _, err := s.Get(context.Background(), bob1, 6); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(6) error = %v, want ErrNotFound", err)
	}
}

func TestCallerEnvelopeUntouched(t *testing.T) {
	s, _ := newStore(t, Options{})
	m := send(alice1, "m1", "c", "x", bob1)
	m.Entries[0].Env.Id = 77 // ignored
	before := proto.Clone(m.Entries[0].Env)
	mustAppend(t, s, m)
	if !proto.Equal(before, m.Entries[0].Env) {
		t.Errorf("Append modified the caller's envelope: %v", m.Entries[0].Env)
	}
	if items := rangeAll(t, s, bob1); len(items) != 1 || items[0].Env.Id != 1 {
		t.Errorf("stored %v, want id 1 (the store's, not the caller's)", items)
	}
}

func TestIDsIncreasePerDevice(t *testing.T) {
	s, _ := newStore(t, Options{})
	sends := [][]wire.DeviceAddr{
		{bob1, bob2},
		{bob1},
		{bob2, carol1},
		{bob1, bob2, carol1},
		{bob1, bob1}, // two entries for one device in one send
	}
	for i, to := range sends {
		mustAppend(t, s, send(alice1, "", "", fmt.Sprint("s", i), to...))
	}
	want := map[wire.DeviceAddr][]uint64{
		bob1:   {1, 2, 3, 4, 5},
		bob2:   {1, 2, 3},
		carol1: {1, 2},
	}
	for dev, ids := range want {
		if got := itemIDs(rangeAll(t, s, dev)); !slices.Equal(got, ids) {
			t.Errorf("%s ids = %v, want %v", dev, got, ids)
		}
	}

	// Ids are never reused, even when the inbox is empty.
	if _, err := s.Ack(context.Background(), carol1, []uint64{1, 2}, nil); err != nil {
		t.Fatal(err)
	}
	mustAppend(t, s, send(alice1, "", "", "after ack", carol1))
	if got := itemIDs(rangeAll(t, s, carol1)); !slices.Equal(got, []uint64{3}) {
		t.Errorf("after acking everything, next id = %v, want [3]", got)
	}
}

func TestConversationSeq(t *testing.T) {
	s, _ := newStore(t, Options{})
	tests := []struct {
		conv    string
		to      []wire.DeviceAddr
		wantSeq uint64
	}{
		{"alice|bob", []wire.DeviceAddr{bob1, bob2, alice2}, 1},
		{"alice|bob", []wire.DeviceAddr{bob1, bob2, alice2}, 2},
		{"alice|carol", []wire.DeviceAddr{carol1}, 1},
		{"", []wire.DeviceAddr{bob1}, 0},
		{"alice|bob", []wire.DeviceAddr{bob1}, 3},
		{"alice|carol", []wire.DeviceAddr{carol1, alice2}, 2},
	}
	for i, tc := range tests {
		acc := mustAppend(t, s, send(alice1, fmt.Sprint("m", i), tc.conv, fmt.Sprint("s", i), tc.to...))
		if acc.Seq != tc.wantSeq {
			t.Errorf("send %d to %q: seq %d, want %d", i, tc.conv, acc.Seq, tc.wantSeq)
		}
	}
	// Every entry of a send carries the send's seq.
	for _, dev := range []wire.DeviceAddr{bob1, bob2, alice2, carol1} {
		for _, it := range rangeAll(t, s, dev) {
			i := int(it.Env.Content[1] - '0')
			if it.Env.Seq != tests[i].wantSeq {
				t.Errorf("%s entry of send %d: seq %d, want %d", dev, i, it.Env.Seq, tests[i].wantSeq)
			}
		}
	}
}

func TestDedup(t *testing.T) {
	ctx := context.Background()
	clk := newClock()
	s, _ := newStore(t, Options{Now: clk.Now})
	first := mustAppend(t, s, send(alice1, "m1", "alice|bob", "hi", bob1, alice2))
	clk.Set(time.Minute)
	mustAppend(t, s, send(alice1, "m2", "alice|bob", "hi", bob1, alice2))

	again := mustAppend(t, s, send(alice1, "m1", "alice|bob", "hi (retry)", bob1, alice2))
	if want := (Accepted{Seq: first.Seq, ServerTime: first.ServerTime, Duplicate: true}); again != want {
		t.Errorf("retry = %+v, want %+v", again, want)
	}
	if got := contents(rangeAll(t, s, bob1)); !slices.Equal(got, []string{"hi", "hi"}) {
		t.Errorf("bob1 holds %q after a retry", got)
	}
	got, ok, err := s.Lookup(ctx, alice1, "m1")
	if err != nil || !ok || got != again {
		t.Errorf("Lookup = %+v, %v, %v; want %+v", got, ok, err, again)
	}
	if _, ok, _ := s.Lookup(ctx, alice2, "m1"); ok {
		t.Error("Lookup found another device's send")
	}
	// The same id from another device is another send.
	other := mustAppend(t, s, send(alice2, "m1", "alice|bob", "hi", bob1))
	if other.Duplicate || other.Seq != 3 {
		t.Errorf("same id from another device = %+v", other)
	}
}

func TestDedupInOneGroup(t *testing.T) {
	g := newGate()
	reg := prometheus.NewRegistry()
	s, _ := newStore(t, Options{commit: g.commit, Registerer: reg})
	first := async(func() (Accepted, error) { return s.Append(context.Background(), send(carol1, "c", "", "x", bob2)) })
	<-g.entered // the committer is busy with the first group
	a := async(func() (Accepted, error) {
		return s.Append(context.Background(), send(alice1, "m1", "alice|bob", "hi", bob1))
	})
	b := async(func() (Accepted, error) {
		return s.Append(context.Background(), send(alice1, "m1", "alice|bob", "hi", bob1))
	})
	waitQueued(t, s, 2)
	close(g.release)
	if r := <-first; r.err != nil {
		t.Fatal(r.err)
	}
	ra, rb := <-a, <-b
	if ra.err != nil || rb.err != nil {
		t.Fatal(ra.err, rb.err)
	}
	if ra.v.Duplicate == rb.v.Duplicate || ra.v.Seq != 1 || rb.v.Seq != 1 || !ra.v.ServerTime.Equal(rb.v.ServerTime) {
		t.Errorf("two sends of m1 in one group: %+v and %+v; want one original, one duplicate, same seq and time", ra.v, rb.v)
	}
	if got := depth(t, s, bob1); got.count != 1 {
		t.Errorf("bob1 holds %d entries, want 1", got.count)
	}
	if _, n := metricValue(t, reg, "ferry_inbox_commit_group_ops", nil); n != 2 {
		t.Errorf("%d commit groups, want 2 (the ops were not grouped)", n)
	}
	if v, _ := metricValue(t, reg, "ferry_inbox_rejected_sends_total", map[string]string{"reason": "duplicate"}); v != 1 {
		t.Errorf("duplicates counted: %v, want 1", v)
	}
}

func TestQuota(t *testing.T) {
	big := strings.Repeat("x", 300)
	tests := map[string]struct {
		opts     Options
		prefill  map[wire.DeviceAddr]int // entries of "small" already stored
		to       []wire.DeviceAddr
		text     string
		wantFull []wire.DeviceAddr // nil: accepted
	}{
		"depth": {
			opts: Options{MaxDepth: 2}, prefill: map[wire.DeviceAddr]int{bob1: 2},
			to: []wire.DeviceAddr{bob1, bob2}, text: "small", wantFull: []wire.DeviceAddr{bob1},
		},
		"depth reached exactly": {
			opts: Options{MaxDepth: 2}, prefill: map[wire.DeviceAddr]int{bob1: 1},
			to: []wire.DeviceAddr{bob1, bob2}, text: "small",
		},
		"depth within one send": {
			opts: Options{MaxDepth: 1},
			to:   []wire.DeviceAddr{bob1, bob1}, text: "small", wantFull: []wire.DeviceAddr{bob1},
		},
		"bytes": {
			opts: Options{MaxBytes: 400}, prefill: map[wire.DeviceAddr]int{bob2: 3},
			to: []wire.DeviceAddr{bob1, bob2}, text: big, wantFull: []wire.DeviceAddr{bob2},
		},
		"bytes of one large entry": {
			opts: Options{MaxBytes: 200},
			to:   []wire.DeviceAddr{bob1}, text: big, wantFull: []wire.DeviceAddr{bob1},
		},
		"several devices named in entry order": {
			opts: Options{MaxDepth: 1}, prefill: map[wire.DeviceAddr]int{bob1: 1, carol1: 1},
			to: []wire.DeviceAddr{carol1, bob2, bob1}, text: "small", wantFull: []wire.DeviceAddr{carol1, bob1},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			tc.opts.Registerer = reg
			s, _ := newStore(t, tc.opts)
			for dev, n := range tc.prefill {
				for range n {
					mustAppend(t, s, send(carol1, "", "", "small", dev))
				}
			}
			before := map[wire.DeviceAddr]depthWant{}
			for _, dev := range tc.to {
				before[dev] = depth(t, s, dev)
			}
			acc, err := s.Append(context.Background(), send(alice1, "m1", "alice|bob", tc.text, tc.to...))
			if tc.wantFull == nil {
				if err != nil || acc.Seq != 1 {
					t.Fatalf("Append = %+v, %v; want accepted with seq 1", acc, err)
				}
				return
			}
			var full *FullError
			if !errors.As(err, &full) || !errors.Is(err, ErrInboxFull) || wire.CodeOf(err) != wirepb.ErrorCode_INBOX_FULL {
				t.Fatalf("Append error = %v, want a *FullError that is ErrInboxFull", err)
			}
			if !slices.Equal(full.Devices, tc.wantFull) {
				t.Errorf("full devices = %v, want %v", full.Devices, tc.wantFull)
			}
			for dev, d := range before {
				if got := depth(t, s, dev); got != d {
					t.Errorf("%s depth %+v after a rejected send, want %+v", dev, got, d)
				}
			}
			if _, ok, _ := s.Lookup(context.Background(), alice1, "m1"); ok {
				t.Error("a rejected send left a dedup record")
			}
			if v, _ := metricValue(t, reg, "ferry_inbox_rejected_sends_total", map[string]string{"reason": "inbox_full"}); v != 1 {
				t.Errorf("inbox_full rejections counted: %v, want 1", v)
			}
			// The seq was not consumed: a send that fits gets seq 1.
			if acc := mustAppend(t, s, send(alice1, "m2", "alice|bob", "", alice2)); acc.Seq != 1 {
				t.Errorf("next send got seq %d, want 1", acc.Seq)
			}
		})
	}
}

func TestAck(t *testing.T) {
	ctx := context.Background()
	clk := newClock()
	s, _ := newStore(t, Options{Now: clk.Now})
	for i := 1; i <= 4; i++ {
		mustAppend(t, s, send(alice1, fmt.Sprint("m", i), "alice|bob", fmt.Sprint("m", i), bob1))
	}
	receipt := func(id uint64) []Entry {
		return []Entry{{To: alice1, Env: &wirepb.Envelope{Type: wirepb.EnvelopeType_RECEIPT,
			Receipt: &wirepb.Receipt{Kind: wirepb.ReceiptKind_DELIVERED, Username: "bob", DeviceId: 1, ClientMsgId: fmt.Sprint("m", id)}}}}
	}
	follow := map[uint64][]Entry{}
	for id := uint64(1); id <= 99; id++ {
		follow[id] = receipt(id)
	}

	steps := []struct {
		ids          []uint64
		wantDeleted  []uint64
		wantLeft     []uint64
		wantReceipts []string // client msg ids of alice1's receipts, cumulative
	}{
		{[]uint64{1, 3, 99}, []uint64{1, 3}, []uint64{2, 4}, []string{"m1", "m3"}},
		{[]uint64{1, 3}, nil, []uint64{2, 4}, []string{"m1", "m3"}},              // idempotent
		{[]uint64{2, 2}, []uint64{2}, []uint64{4}, []string{"m1", "m3", "m2"}},   // listed twice
		{nil, nil, []uint64{4}, []string{"m1", "m3", "m2"}},                      // nothing
		{[]uint64{4}, []uint64{4}, []uint64{}, []string{"m1", "m3", "m2", "m4"}}, // last
	}
	for i, st := range steps {
		clk.Set(time.Duration(i+1) * time.Second)
		deleted, err := s.Ack(ctx, bob1, st.ids, follow)
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if !slices.Equal(deleted, st.wantDeleted) {
			t.Errorf("step %d: Ack(%v) deleted %v, want %v", i, st.ids, deleted, st.wantDeleted)
		}
		left := rangeAll(t, s, bob1)
		if got := itemIDs(left); !slices.Equal(got, st.wantLeft) {
			t.Errorf("step %d: left %v, want %v", i, got, st.wantLeft)
		}
		if got := depth(t, s, bob1); got != (depthWant{uint64(len(left)), sizes(left)}) {
			t.Errorf("step %d: Depth %+v, want %d entries of %d bytes", i, got, len(left), sizes(left))
		}
		var got []string
		for j, r := range rangeAll(t, s, alice1) {
			got = append(got, r.Env.Receipt.GetClientMsgId())
			if r.ID != uint64(j+1) || r.Env.Seq != 0 || r.Env.ServerTimeMs == 0 || r.Env.Type != wirepb.EnvelopeType_RECEIPT {
				t.Errorf("step %d: receipt %v", i, r.Env)
			}
		}
		if !slices.Equal(got, st.wantReceipts) {
			t.Errorf("step %d: alice1 receipts %v, want %v", i, got, st.wantReceipts)
		}
	}
}

func TestAckReceiptIgnoresQuota(t *testing.T) {
	s, _ := newStore(t, Options{MaxDepth: 1})
	mustAppend(t, s, send(bob1, "", "", "fills alice1", alice1))
	mustAppend(t, s, send(alice1, "m1", "", "hi", bob1))
	deleted, err := s.Ack(context.Background(), bob1, []uint64{1},
		map[uint64][]Entry{1: {{To: alice1, Env: &wirepb.Envelope{Type: wirepb.EnvelopeType_RECEIPT}}}})
	if err != nil || len(deleted) != 1 {
		t.Fatalf("Ack = %v, %v", deleted, err)
	}
	if got := depth(t, s, alice1); got.count != 2 {
		t.Errorf("alice1 holds %d entries, want 2 (the receipt is over quota but kept)", got.count)
	}
}

func TestExpiry(t *testing.T) {
	ctx := context.Background()
	const ttl = time.Hour
	clk := newClock()
	reg := prometheus.NewRegistry()
	s, db := newStore(t, Options{TTL: ttl, Now: clk.Now, Registerer: reg})
	mustAppend(t, s, send(alice1, "old", "c", "old", bob1, bob2))
	clk.Set(30 * time.Minute)
	mustAppend(t, s, send(alice1, "new", "c", "new", bob1))

	tests := []struct {
		at          time.Duration
		sweep       bool
		wantLive    []string // bob1's contents Range returns
		wantDepth   uint64   // bob1's count
		wantExpired int      // from ExpireNow
	}{
		{at: ttl - time.Millisecond, wantLive: []string{"old", "new"}, wantDepth: 2},
		{at: ttl - time.Millisecond, sweep: true, wantLive: []string{"old", "new"}, wantDepth: 2},
		{at: ttl, wantLive: []string{"new"}, wantDepth: 2}, // hidden before the sweep
		{at: ttl, sweep: true, wantLive: []string{"new"}, wantDepth: 1, wantExpired: 2},
		{at: ttl, sweep: true, wantLive: []string{"new"}, wantDepth: 1},
		{at: ttl + 30*time.Minute, wantLive: []string{}, wantDepth: 1},
		{at: ttl + 30*time.Minute, sweep: true, wantLive: []string{}, wantDepth: 0, wantExpired: 1},
	}
	for i, tc := range tests {
		clk.Set(tc.at)
		if tc.sweep {
			n, err := s.ExpireNow(ctx)
			if err != nil || n != tc.wantExpired {
				t.Errorf("step %d: ExpireNow = %d, %v; want %d", i, n, err, tc.wantExpired)
			}
		}
		live := rangeAll(t, s, bob1)
		if got := contents(live); !slices.Equal(got, tc.wantLive) {
			t.Errorf("step %d at %v: Range = %q, want %q", i, tc.at, got, tc.wantLive)
		}
		if got := depth(t, s, bob1); got.count != tc.wantDepth {
			t.Errorf("step %d at %v: Depth = %d, want %d", i, tc.at, got.count, tc.wantDepth)
		}
		if _, err := s.Get(ctx, bob1, 1); (tc.at >= ttl) != errors.Is(err, ErrNotFound) {
			t.Errorf("step %d at %v: Get(1) error = %v", i, tc.at, err)
		}
	}
	if got := depth(t, s, bob1); got.bytes != 0 {
		t.Errorf("empty inbox has %d bytes", got.bytes)
	}
	if v, _ := metricValue(t, reg, "ferry_inbox_expired_entries_total", nil); v != 3 {
		t.Errorf("expired counter = %v, want 3", v)
	}

	// Dedup records expired with their entries: the lookup says no and the
	// sweep deleted them.
	if _, ok, _ := s.Lookup(ctx, alice1, "old"); ok {
		t.Error("Lookup found an expired send")
	}
	for _, id := range []string{"old", "new"} {
		if _, closer, err := db.Get(dedupKey(alice1, id)); err == nil {
			closer.Close()
			t.Errorf("dedup record %q survived the sweep", id)
		}
	}
	// An expired send id may be used again.
	if acc := mustAppend(t, s, send(alice1, "old", "c", "again", bob1)); acc.Duplicate || acc.Seq != 3 {
		t.Errorf("send after expiry = %+v", acc)
	}
	if got := itemIDs(rangeAll(t, s, bob1)); !slices.Equal(got, []uint64{3}) {
		t.Errorf("ids after expiry %v, want [3]", got)
	}
}

func TestExpiryManyEntries(t *testing.T) {
	// More expired entries than one expiry op carries.
	const ttl = time.Hour
	clk := newClock()
	s, _ := newStore(t, Options{TTL: ttl, Now: clk.Now})
	m := Send{Sender: alice1}
	for i := range expireChunkSize + 300 {
		to := []wire.DeviceAddr{bob1, bob2, carol1}[i%3]
		m.Entries = append(m.Entries, Entry{To: to, Env: envelope(alice1, "x")})
	}
	mustAppend(t, s, m)
	clk.Set(ttl)
	n, err := s.ExpireNow(context.Background())
	if err != nil || n != len(m.Entries) {
		t.Fatalf("ExpireNow = %d, %v; want %d", n, err, len(m.Entries))
	}
	for _, dev := range []wire.DeviceAddr{bob1, bob2, carol1} {
		if got := depth(t, s, dev); got != (depthWant{}) {
			t.Errorf("%s Depth %+v after expiry", dev, got)
		}
	}
}

func TestBackgroundSweeper(t *testing.T) {
	clk := newClock()
	logs := make(chan slog.Record, 10)
	s, _ := newStore(t, Options{TTL: time.Hour, Now: clk.Now, SweepInterval: time.Millisecond,
		Logger: slog.New(chanHandler(logs))})
	mustAppend(t, s, send(alice1, "", "", "secret text", bob1))
	clk.Set(time.Hour)
	r := <-logs // the sweeper logs what it expired
	var text strings.Builder
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&text, " %s=%v", a.Key, a.Value)
		return true
	})
	if r.Message != "inbox: expired entries" || text.String() != " count=1" {
		t.Errorf("sweeper logged %q%s", r.Message, text.String())
	}
	if got := depth(t, s, bob1); got.count != 0 {
		t.Errorf("Depth after the sweep = %d", got.count)
	}
}

// chanHandler is a slog.Handler that sends each record to ch.
type chanHandler chan<- slog.Record

func (h chanHandler) Enabled(context.Context, slog.Level) bool      { return true }
func (h chanHandler) Handle(_ context.Context, r slog.Record) error { h <- r.Clone(); return nil }
func (h chanHandler) WithAttrs([]slog.Attr) slog.Handler            { return h }
func (h chanHandler) WithGroup(string) slog.Handler                 { return h }

func TestDeleteDevice(t *testing.T) {
	ctx := context.Background()
	s, db := newStore(t, Options{})
	mustAppend(t, s, send(alice1, "a1", "alice|bob", "to bob", bob1, bob2))
	mustAppend(t, s, send(bob1, "b1", "alice|bob", "from bob1", alice1, bob2))
	bob2Before := rangeAll(t, s, bob2)

	if err := s.DeleteDevice(ctx, bob1); err != nil {
		t.Fatal(err)
	}
	if items := rangeAll(t, s, bob1); len(items) != 0 {
		t.Errorf("deleted device still has %v", itemIDs(items))
	}
	if got := depth(t, s, bob1); got != (depthWant{}) {
		t.Errorf("deleted device Depth %+v", got)
	}
	if _, ok, _ := s.Lookup(ctx, bob1, "b1"); ok {
		t.Error("deleted device's dedup record survived")
	}
	for _, prefix := range []byte{prefixInbox, prefixMeta, prefixDedup} {
		p := devPrefix(prefix, bob1)
		it, err := db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
		if err != nil {
			t.Fatal(err)
		}
		if it.First() {
			t.Errorf("key %q of the deleted device survived", it.Key())
		}
		it.Close()
	}
	// Others keep theirs.
	if got := rangeAll(t, s, bob2); len(got) != len(bob2Before) {
		t.Errorf("bob2 has %v, had %v", itemIDs(got), itemIDs(bob2Before))
	}
	if _, ok, _ := s.Lookup(ctx, alice1, "a1"); !ok {
		t.Error("another device's dedup record was deleted")
	}
	if err := s.DeleteDevice(ctx, carol1); err != nil {
		t.Errorf("deleting an empty device: %v", err)
	}
}

func TestDeleteDeviceInGroup(t *testing.T) {
	// Appends before and after a DeleteDevice in one commit group.
	g := newGate()
	s, _ := newStore(t, Options{commit: g.commit})
	ctx := context.Background()
	mustAppendAsync := func(text string) <-chan result[Accepted] {
		return async(func() (Accepted, error) { return s.Append(ctx, send(alice1, text, "", text, bob1)) })
	}
	first := mustAppendAsync("first")
	<-g.entered
	before := mustAppendAsync("before")
	waitQueued(t, s, 1)
	del := async(func() (struct{}, error) { return struct{}{}, s.DeleteDevice(ctx, bob1) })
	waitQueued(t, s, 2)
	after := mustAppendAsync("after")
	waitQueued(t, s, 3)
	close(g.release)
	for _, ch := range []<-chan result[Accepted]{first, before, after} {
		if r := <-ch; r.err != nil {
			t.Fatal(r.err)
		}
	}
	if r := <-del; r.err != nil {
		t.Fatal(r.err)
	}
	items := rangeAll(t, s, bob1)
	if got := contents(items); !slices.Equal(got, []string{"after"}) {
		t.Errorf("bob1 holds %q, want [after]", got)
	}
	if got := depth(t, s, bob1); got != (depthWant{1, sizes(items)}) {
		t.Errorf("Depth %+v, want 1 entry of %d bytes", got, sizes(items))
	}
}

func TestReopen(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	open := reopener(t, fs)
	s, db := open()
	for i := 1; i <= 3; i++ {
		mustAppend(t, s, send(alice1, fmt.Sprint("m", i), "alice|bob", fmt.Sprint("m", i), bob1, bob2))
	}
	if _, err := s.Ack(ctx, bob2, []uint64{1, 2, 3}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Ack(ctx, bob1, []uint64{2}, nil); err != nil {
		t.Fatal(err)
	}
	bob1Items := rangeAll(t, s, bob1)
	bob1Depth := depth(t, s, bob1)
	s.Close()
	db.Close()

	s, db = open()
	defer db.Close()
	defer s.Close()
	got := rangeAll(t, s, bob1)
	if !slices.Equal(itemIDs(got), []uint64{1, 3}) || len(got) != len(bob1Items) {
		t.Fatalf("after reopen bob1 has %v, want [1 3]", itemIDs(got))
	}
	for i := range got {
		if !proto.Equal(got[i].Env, bob1Items[i].Env) {
			t.Errorf("entry %d changed: %v, was %v", got[i].ID, got[i].Env, bob1Items[i].Env)
		}
	}
	if d := depth(t, s, bob1); d != bob1Depth {
		t.Errorf("Depth %+v, was %+v", d, bob1Depth)
	}
	if acc, ok, _ := s.Lookup(ctx, alice1, "m2"); !ok || acc.Seq != 2 {
		t.Errorf("Lookup(m2) after reopen = %+v, %v", acc, ok)
	}
	acc := mustAppend(t, s, send(alice1, "m4", "alice|bob", "m4", bob1, bob2))
	if acc.Seq != 4 {
		t.Errorf("seq after reopen = %d, want 4", acc.Seq)
	}
	if got := itemIDs(rangeAll(t, s, bob1)); !slices.Equal(got, []uint64{1, 3, 4}) {
		t.Errorf("bob1 ids after reopen and append = %v, want [1 3 4]", got)
	}
	if got := itemIDs(rangeAll(t, s, bob2)); !slices.Equal(got, []uint64{4}) {
		t.Errorf("bob2 ids (all acked before) = %v, want [4]", got)
	}
}

func TestCrashKeepsAccepted(t *testing.T) {
	// Invariant 1: what Append accepted survives a crash that loses every
	// unsynced write. An ack is not synced on its own, so it may be lost; the
	// meta must agree with the entries either way.
	ctx := context.Background()
	fs := vfs.NewCrashableMem()
	db, err := store.Open("db", store.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	s := startStore(t, db, Options{})
	for i := 1; i <= 5; i++ {
		mustAppend(t, s, send(alice1, fmt.Sprint("m", i), "c", fmt.Sprint("m", i), bob1, bob2))
	}
	if _, err := s.Ack(ctx, bob1, []uint64{1, 2}, nil); err != nil {
		t.Fatal(err)
	}
	crashed := fs.CrashClone(vfs.CrashCloneCfg{}) // only synced data
	s.Close()
	db.Close()

	db, err = store.Open("db", store.Options{FS: crashed})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() }) // after the store's Close (cleanups run last-in first-out)
	s = startStore(t, db, Options{})
	if got := itemIDs(rangeAll(t, s, bob2)); !slices.Equal(got, []uint64{1, 2, 3, 4, 5}) {
		t.Errorf("after a crash bob2 has %v, want all 5 accepted entries", got)
	}
	for _, dev := range []wire.DeviceAddr{bob1, bob2} {
		items := rangeAll(t, s, dev)
		if got := depth(t, s, dev); got != (depthWant{uint64(len(items)), sizes(items)}) {
			t.Errorf("%s after a crash: Depth %+v, entries %v of %d bytes", dev, got, itemIDs(items), sizes(items))
		}
	}
	if acc, ok, _ := s.Lookup(ctx, alice1, "m5"); !ok || acc.Seq != 5 {
		t.Errorf("dedup record of m5 after a crash: %+v, %v", acc, ok)
	}
}

func TestCommitFailureReadOnly(t *testing.T) {
	fs := vfs.NewMem()
	db, err := store.Open("db", store.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	db, err = store.Open("db", store.Options{FS: fs, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() }) // after the store's Close (cleanups run last-in first-out)
	s := startStore(t, db, Options{})
	acc, err := s.Append(context.Background(), send(alice1, "m1", "c", "hi", bob1))
	if !isSentinel(err, ErrStorage) || wire.CodeOf(err) != wirepb.ErrorCode_UNAVAILABLE {
		t.Fatalf("Append on a read-only db = %+v, %v; want ErrStorage", acc, err)
	}
	if acc != (Accepted{}) {
		t.Errorf("a failed Append returned %+v", acc)
	}
	if err := s.DeleteDevice(context.Background(), bob1); !isSentinel(err, ErrStorage) {
		t.Errorf("DeleteDevice on a read-only db: %v", err)
	}
}

func TestCommitFailureGroup(t *testing.T) {
	// The first commit blocks; the second (a group of two sends of m1)
	// fails. Nothing of it may count: not the ids, the seq or the dedup.
	ctx := context.Background()
	g := newGate()
	g.fail = func(call int) error {
		if call == 2 {
			return errors.New("injected")
		}
		return nil
	}
	s, _ := newStore(t, Options{commit: g.commit})
	first := async(func() (Accepted, error) { return s.Append(ctx, send(alice1, "m0", "c", "m0", bob1)) })
	<-g.entered
	a := async(func() (Accepted, error) { return s.Append(ctx, send(alice1, "m1", "c", "m1", bob1)) })
	b := async(func() (Accepted, error) { return s.Append(ctx, send(alice1, "m1", "c", "m1", bob1)) })
	waitQueued(t, s, 2)
	close(g.release)
	if r := <-first; r.err != nil || r.v.Seq != 1 {
		t.Fatalf("first = %+v, %v", r.v, r.err)
	}
	for _, r := range []result[Accepted]{<-a, <-b} {
		if !isSentinel(r.err, ErrStorage) || r.v != (Accepted{}) {
			t.Errorf("send in the failed group = %+v, %v; want ErrStorage", r.v, r.err)
		}
		if !strings.Contains(fmt.Sprint(r.err), "injected") {
			t.Errorf("error %v does not carry the cause", r.err)
		}
	}
	if _, ok, _ := s.Lookup(ctx, alice1, "m1"); ok {
		t.Error("the failed send left a dedup record")
	}
	acc := mustAppend(t, s, send(alice1, "m1", "c", "m1", bob1))
	if acc.Duplicate || acc.Seq != 2 {
		t.Errorf("retry after the failed commit = %+v, want a new send with seq 2", acc)
	}
	if got := itemIDs(rangeAll(t, s, bob1)); !slices.Equal(got, []uint64{1, 2}) {
		t.Errorf("bob1 ids = %v, want [1 2]", got)
	}
}

func TestContextCancel(t *testing.T) {
	t.Run("before the call", func(t *testing.T) {
		s, _ := newStore(t, Options{})
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := s.Append(ctx, send(alice1, "m1", "", "x", bob1)); !errors.Is(err, context.Canceled) {
			t.Errorf("Append = %v", err)
		}
		if _, err := s.Ack(ctx, bob1, []uint64{1}, nil); !errors.Is(err, context.Canceled) {
			t.Errorf("Ack = %v", err)
		}
		if _, err := s.Range(ctx, bob1, 0, 10); !errors.Is(err, context.Canceled) {
			t.Errorf("Range = %v", err)
		}
		if got := depth(t, s, bob1); got.count != 0 {
			t.Errorf("stored %d entries", got.count)
		}
	})
	t.Run("while queued", func(t *testing.T) {
		g := newGate()
		s, _ := newStore(t, Options{commit: g.commit})
		first := async(func() (Accepted, error) { return s.Append(context.Background(), send(alice1, "m0", "", "x", bob1)) })
		<-g.entered
		ctx, cancel := context.WithCancel(context.Background())
		queued := async(func() (Accepted, error) { return s.Append(ctx, send(alice1, "m1", "", "x", bob1)) })
		waitQueued(t, s, 1)
		cancel()
		// It returns while the committer is still blocked.
		if r := <-queued; !errors.Is(r.err, context.Canceled) {
			t.Errorf("cancelled queued Append = %+v, %v", r.v, r.err)
		}
		close(g.release)
		if r := <-first; r.err != nil {
			t.Fatal(r.err)
		}
		mustAppend(t, s, send(alice1, "m2", "", "x", bob2)) // the committer has passed the cancelled op
		if got := depth(t, s, bob1); got.count != 1 {
			t.Errorf("bob1 holds %d entries, want 1 (the cancelled send was applied)", got.count)
		}
	})
	t.Run("after it was applied", func(t *testing.T) {
		g := newGate()
		s, _ := newStore(t, Options{commit: g.commit})
		ctx, cancel := context.WithCancel(context.Background())
		r := async(func() (Accepted, error) { return s.Append(ctx, send(alice1, "m1", "c", "x", bob1)) })
		<-g.entered // applied, committing
		cancel()
		close(g.release)
		if got := <-r; got.err != nil || got.v.Seq != 1 {
			t.Errorf("Append cancelled after it was applied = %+v, %v; want its result", got.v, got.err)
		}
	})
}

func TestClose(t *testing.T) {
	ctx := context.Background()
	g := newGate()
	s, _ := newStore(t, Options{commit: g.commit})
	first := async(func() (Accepted, error) { return s.Append(ctx, send(alice1, "m0", "", "x", bob1)) })
	<-g.entered
	queued := async(func() (Accepted, error) { return s.Append(ctx, send(alice1, "m1", "", "x", bob1)) })
	waitQueued(t, s, 1)
	closed := async(func() (struct{}, error) { return struct{}{}, s.Close() })
	<-s.quit
	close(g.release)
	if r := <-first; r.err != nil {
		t.Errorf("op applied before Close = %v, want its result", r.err)
	}
	if r := <-queued; !isSentinel(r.err, ErrClosed) {
		t.Errorf("op queued at Close = %+v, %v; want ErrClosed", r.v, r.err)
	}
	<-closed
	if err := s.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if _, err := s.Append(ctx, send(alice1, "m2", "", "x", bob1)); !isSentinel(err, ErrClosed) {
		t.Errorf("Append after Close = %v", err)
	}
	if _, err := s.Range(ctx, bob1, 0, 1); !isSentinel(err, ErrClosed) {
		t.Errorf("Range after Close = %v", err)
	}
	if _, err := s.ExpireNow(ctx); !isSentinel(err, ErrClosed) {
		t.Errorf("ExpireNow after Close = %v", err)
	}
}

func TestOnAppend(t *testing.T) {
	got := make(chan []wire.DeviceAddr, 10)
	s, _ := newStore(t, Options{OnAppend: func(devs []wire.DeviceAddr) { got <- devs }})
	mustAppend(t, s, send(alice1, "m1", "", "x", bob1, bob2, bob1))
	if devs := <-got; !slices.Equal(devs, []wire.DeviceAddr{bob1, bob2}) {
		t.Errorf("OnAppend(%v), want [bob.1 bob.2]", devs)
	}
	// A duplicate commits nothing and wakes nobody; an ack with a receipt wakes the receipt's device.
	mustAppend(t, s, send(alice1, "m1", "", "x", bob1))
	if _, err := s.Ack(context.Background(), bob1, []uint64{1},
		map[uint64][]Entry{1: {{To: alice1, Env: &wirepb.Envelope{Type: wirepb.EnvelopeType_RECEIPT}}}}); err != nil {
		t.Fatal(err)
	}
	if devs := <-got; !slices.Equal(devs, []wire.DeviceAddr{alice1}) {
		t.Errorf("OnAppend(%v) after an ack, want [alice.1]", devs)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	s, _ := newStore(t, Options{Registerer: reg})
	mustAppend(t, s, send(alice1, "m1", "", "x", bob1, bob2))
	mustAppend(t, s, send(alice1, "m1", "", "x", bob1, bob2))
	if _, err := s.Ack(context.Background(), bob1, []uint64{1, 2}, nil); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]float64{
		"ferry_inbox_appended_entries_total": 2,
		"ferry_inbox_acked_entries_total":    1,
		"ferry_inbox_expired_entries_total":  0,
	} {
		if v, _ := metricValue(t, reg, name, nil); v != want {
			t.Errorf("%s = %v, want %v", name, v, want)
		}
	}
	// Every commit is synced, the ack's too (readers see only durable state).
	if _, n := metricValue(t, reg, "ferry_inbox_commit_duration_seconds", map[string]string{"sync": "true"}); n != 2 {
		t.Errorf("%d synced commits, want 2", n)
	}
	// A second store on the same registerer is a configuration error.
	db, _ := store.OpenMem()
	defer db.Close()
	if _, err := New(db, Options{Registerer: reg}); err == nil {
		t.Error("New registered its metrics twice")
	}
}

func TestBadInput(t *testing.T) {
	s, _ := newStore(t, Options{})
	ctx := context.Background()
	tests := map[string]Send{
		"no entries": {Sender: alice1}, // with a client msg id or a conversation it is a dedup/sequence record alone (cluster mode)
		"nil env":    {Sender: alice1, Entries: []Entry{{To: bob1}}},
		"bad utf8":   {Sender: alice1, Entries: []Entry{{To: bob1, Env: &wirepb.Envelope{Sender: "\xff"}}}},
	}
	for name, m := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := s.Append(ctx, m); wire.CodeOf(err) != wirepb.ErrorCode_BAD_REQUEST {
				t.Errorf("Append = %v, want BAD_REQUEST", err)
			}
		})
	}
}

func TestKeys(t *testing.T) {
	k := entryKey(bob2, 0x0102)
	want := []byte("ibob\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x01\x02")
	if !bytes.Equal(k, want) {
		t.Errorf("entryKey = %q, want %q", k, want)
	}
	if entryID(k) != 0x0102 {
		t.Errorf("entryID = %d", entryID(k))
	}
	dev, rest, ok := parseDevKey(dedupKey(bob2, "msg-1"))
	if !ok || dev != bob2 || string(rest) != "msg-1" {
		t.Errorf("parseDevKey(dedup key) = %v %q %v", dev, rest, ok)
	}
	for p, want := range map[string]string{"ab": "ac", "a\xff": "b", "\xff\xff": ""} {
		if got := string(prefixEnd([]byte(p))); got != want {
			t.Errorf("prefixEnd(%q) = %q, want %q", p, got, want)
		}
	}
	v := withServerFields([]byte{}, 5, 0, -1)
	if envTime(v) != -1 {
		t.Errorf("envTime = %d, want -1", envTime(v))
	}
}

// A send with no entries but a client message id stores its dedup record
// alone (cluster mode's seal on the sender's shard): a retry is a duplicate.
func TestAppendDedupRecordAlone(t *testing.T) {
	s, _ := newStore(t, Options{})
	ctx := context.Background()
	acc, err := s.Append(ctx, Send{Sender: alice1, ClientMsgID: "seal", Seq: 7})
	if err != nil || acc.Seq != 7 || acc.Duplicate {
		t.Fatalf("Append = %+v, %v; want seq 7", acc, err)
	}
	if got, ok, err := s.Lookup(ctx, alice1, "seal"); err != nil || !ok || got.Seq != 7 {
		t.Fatalf("Lookup = %+v, %v, %v; want seq 7", got, ok, err)
	}
	if acc, err := s.Append(ctx, Send{Sender: alice1, ClientMsgID: "seal", Seq: 9}); err != nil || !acc.Duplicate || acc.Seq != 7 {
		t.Fatalf("retry = %+v, %v; want a duplicate of seq 7", acc, err)
	}
}
