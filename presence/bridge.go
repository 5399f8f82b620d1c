package presence

// Presence across cluster nodes over Redis (docs/cluster.md, "Presence and
// the registry across nodes"). An account's truth is on the node that owns
// its shard (its sockets land there); that node's Tracker hands every
// change it pushes (after coalescing) and every privacy change to the
// Bridge, which writes the account's Record to a Redis key with a TTL and
// publishes it on its shard's channel. A node with local subscribers of an
// account of another node subscribes to that shard's channel (refcounted)
// and hands what arrives to its Tracker, which applies the privacy rule
// (Visible) for each of its local viewers. Get and the first answer of
// Subscribe read the keys.
//
// Best-effort and off the message path (invariant 8): nothing here is
// called by a send; the tracker only queues (publish, watch, unwatch never
// block or do I/O); a full queue drops a change; Redis down means remote
// presence is unknown, never an error.

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/proto"
)

// Record is an account's presence as its owner node publishes it: the
// state and what a viewer's node needs to apply the privacy rule.
type Record struct {
	Username   string   `json:"u"`
	Online     bool     `json:"on,omitempty"`
	LastSeenMs int64    `json:"ls,omitempty"` // 0: never seen (unknown when offline)
	Visibility int32    `json:"v,omitempty"`  // wirepb.PresenceVisibility
	Allow      []string `json:"a,omitempty"`  // sorted (NormalizePrivacy)
	// At is the owner's clock (Unix ns) when the change happened; a node
	// keeps the newest record it saw of each account.
	At int64 `json:"at"`
}

// view is r as viewer may see it (nil: unknown).
func (r *Record) view(name, viewer string) *wirepb.PresenceInfo {
	if r == nil {
		return unknown(name)
	}
	p := &wirepb.PresencePrivacy{Visibility: wirepb.PresenceVisibility(r.Visibility), Allow: r.Allow}
	if !Visible(p, name, viewer) {
		return unknown(name)
	}
	switch {
	case r.Online:
		return &wirepb.PresenceInfo{Username: name, State: wirepb.PresenceState_ONLINE}
	case r.LastSeenMs > 0:
		return offline(name, time.UnixMilli(r.LastSeenMs))
	}
	return unknown(name)
}

// newer returns the more recent of two records (nil is older than any).
func newer(a, b *Record) *Record {
	if a == nil || (b != nil && b.At >= a.At) {
		return b
	}
	return a
}

// BridgeConfig configures a Bridge. Each zero value means the default in
// its comment.
type BridgeConfig struct {
	Redis redis.UniversalClient // required
	// Prefix of the keys and channels ("ferry:", the cluster's).
	Prefix string
	// Shard maps an account to its shard (the channel it is published on).
	Shard func(username string) uint32
	// Local reports whether this node keeps username's presence now (it
	// serves the account's shard).
	Local func(username string) bool
	// Backend is this node's presence store: the privacy setting of the
	// local accounts whose records are published.
	Backend Backend
	// TTL of an online record, refreshed every TTL/3 while the account is
	// online here, so a dead node's accounts turn unknown (30s). Remote
	// records that are watched are re-read every TTL/2.
	TTL time.Duration
	// OfflineTTL of an offline (last seen) record (7 days).
	OfflineTTL time.Duration
	// MaxPending is the most accounts with a change waiting to be
	// published (4096); a change beyond it is dropped and counted.
	MaxPending int
	// Timeout of one Redis round trip (2s).
	Timeout    time.Duration
	Now        func() time.Time
	Log        *slog.Logger
	Registerer prometheus.Registerer
}

// ErrBridgeConfig: a BridgeConfig misses a required field.
var ErrBridgeConfig = errors.New("presence: bridge config")

// Bridge carries presence between the Trackers of cluster nodes over Redis.
// Run it (it owns its goroutines) and attach it with Tracker.SetBridge.
type Bridge struct {
	// static after construction
	cfg  BridgeConfig
	log  *slog.Logger
	m    *bridgeMetrics
	tr   atomic.Pointer[Tracker]
	wake chan struct{} // publisher: changes queued
	sub  chan struct{} // subscriber: watched shards changed, or a refetch is due

	mu      sync.Mutex
	queue   []string                       // guarded by mu: accounts in pend, in order
	pend    map[string]*Record             // guarded by mu: latest unpublished change per account
	watched map[uint32]map[string]struct{} // guarded by mu: remote accounts watched here, by shard
	refetch map[uint32]bool                // guarded by mu: shards to re-read (just (re)subscribed)
}

type bridgeMetrics struct {
	published prometheus.Counter
	dropped   prometheus.Counter
	received  prometheus.Counter
	errors    *prometheus.CounterVec
	channels  prometheus.Gauge
}

// NewBridge makes a bridge; it does nothing until Run.
func NewBridge(cfg BridgeConfig) (*Bridge, error) {
	if cfg.Redis == nil || cfg.Shard == nil || cfg.Local == nil || cfg.Backend == nil {
		return nil, ErrBridgeConfig
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "ferry:"
	}
	if cfg.TTL <= 0 {
		cfg.TTL = 30 * time.Second
	}
	if cfg.OfflineTTL <= 0 {
		cfg.OfflineTTL = 7 * 24 * time.Hour
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = 4096
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	m := &bridgeMetrics{
		published: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_presence_bridge_published_total",
			Help: "Presence records of local accounts published to other nodes."}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_presence_bridge_dropped_total",
			Help: "Presence changes not published because the queue was full."}),
		received: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_presence_bridge_received_total",
			Help: "Presence records of other nodes' accounts received."}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_presence_bridge_errors_total",
			Help: "Failed Redis operations of the presence bridge, by operation."}, []string{"op"}),
		channels: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ferry_presence_bridge_channels",
			Help: "Shard presence channels this node is subscribed to."}),
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(m.published, m.dropped, m.received, m.errors, m.channels)
	}
	return &Bridge{cfg: cfg, log: cfg.Log, m: m, wake: make(chan struct{}, 1), sub: make(chan struct{}, 1),
		pend: map[string]*Record{}, watched: map[uint32]map[string]struct{}{}, refetch: map[uint32]bool{}}, nil
}

func (b *Bridge) attach(t *Tracker) { b.tr.Store(t) }

func (b *Bridge) local(name string) bool { return b.cfg.Local(name) }

func (b *Bridge) key(name string) string { return b.cfg.Prefix + "presence:" + name }

func (b *Bridge) channel(shard uint32) string {
	return b.cfg.Prefix + "presence:s" + strconv.FormatUint(uint64(shard), 10)
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// publish queues a change of a local account (info as its own account
// sees it). Called with the tracker's lock held: it never blocks.
func (b *Bridge) publish(info *wirepb.PresenceInfo) {
	r := &Record{Username: info.Username, At: b.cfg.Now().UnixNano()}
	switch info.State {
	case wirepb.PresenceState_ONLINE:
		r.Online = true
	case wirepb.PresenceState_OFFLINE:
		r.LastSeenMs = info.LastSeenMs
	}
	b.mu.Lock()
	if _, ok := b.pend[r.Username]; !ok {
		if len(b.pend) >= b.cfg.MaxPending {
			b.mu.Unlock()
			b.m.dropped.Inc()
			return
		}
		b.queue = append(b.queue, r.Username)
	}
	b.pend[r.Username] = r
	b.mu.Unlock()
	signal(b.wake)
}

// watch and unwatch: the tracker gained its first or lost its last local
// watcher of remote account name. Called with the tracker's lock held.
func (b *Bridge) watch(name string) {
	s := b.cfg.Shard(name)
	b.mu.Lock()
	if b.watched[s] == nil {
		b.watched[s] = map[string]struct{}{}
	}
	b.watched[s][name] = struct{}{}
	// Read it again once watched: an event that arrived between the
	// tracker's first read and now was not applied.
	b.refetch[s] = true
	b.mu.Unlock()
	signal(b.sub)
}

func (b *Bridge) unwatch(name string) {
	s := b.cfg.Shard(name)
	b.mu.Lock()
	delete(b.watched[s], name)
	if len(b.watched[s]) == 0 {
		delete(b.watched, s)
	}
	b.mu.Unlock()
	signal(b.sub)
}

// redisChunk bounds one pipeline.
const redisChunk = 512

// records reads the published records of names (missing or unreadable:
// absent, which is unknown). It never fails: Redis down is "unknown".
func (b *Bridge) records(ctx context.Context, names []string) map[string]*Record {
	out := make(map[string]*Record, len(names))
	ctx, cancel := context.WithTimeout(ctx, b.cfg.Timeout)
	defer cancel()
	for len(names) > 0 {
		chunk := names[:min(len(names), redisChunk)]
		names = names[len(chunk):]
		cmds := make([]*redis.StringCmd, len(chunk))
		_, err := b.cfg.Redis.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, n := range chunk {
				cmds[i] = p.Get(ctx, b.key(n))
			}
			return nil
		})
		if err != nil && !errors.Is(err, redis.Nil) {
			b.m.errors.WithLabelValues("read").Inc()
			return out
		}
		for i, n := range chunk {
			if r := decodeRecord([]byte(cmds[i].Val())); r != nil && r.Username == n {
				out[n] = r
			}
		}
	}
	return out
}

func decodeRecord(v []byte) *Record {
	if len(v) == 0 {
		return nil
	}
	r := &Record{}
	if err := json.Unmarshal(v, r); err != nil || device.ValidateUsername(r.Username) != nil {
		return nil
	}
	return r
}

// Run runs the bridge until ctx ends; it returns when all its goroutines
// have stopped.
func (b *Bridge) Run(ctx context.Context) {
	ps := b.cfg.Redis.Subscribe(ctx)
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); b.publisher(ctx) }()
	go func() { defer wg.Done(); b.subscriber(ctx, ps) }()
	go func() { defer wg.Done(); b.receiver(ctx, ps) }()
	<-ctx.Done()
	_ = ps.Close() // unblocks the receiver
	wg.Wait()
}

// ---------------------------------------------------------------- owner side

// publisher writes and publishes queued changes, and refreshes the records
// of the accounts online here every TTL/3 (re-creating them if Redis came
// back empty, and republishing them after an outage).
func (b *Bridge) publisher(ctx context.Context) {
	tick := time.NewTicker(b.cfg.TTL / 3)
	defer tick.Stop()
	online := map[string]*Record{} // the accounts online here, as last published
	failed := false                // a write failed since the last full republish
	for {
		select {
		case <-ctx.Done():
			return
		case <-b.wake:
			if err := b.flush(ctx, online); err != nil {
				failed = true
			}
		case <-tick.C:
			for n := range online {
				if !b.local(n) {
					delete(online, n) // its shard moved: the new owner publishes it
				}
			}
			recs := make([]*Record, 0, len(online))
			for _, r := range online {
				recs = append(recs, r)
			}
			if err := b.write(ctx, recs, failed); err != nil {
				failed = true
			} else {
				failed = false
			}
		}
	}
}

// flush publishes what is queued, in chunks.
func (b *Bridge) flush(ctx context.Context, online map[string]*Record) error {
	var errs error
	for {
		b.mu.Lock()
		n := min(len(b.queue), redisChunk)
		recs := make([]*Record, 0, n)
		for _, name := range b.queue[:n] {
			recs = append(recs, b.pend[name])
			delete(b.pend, name)
		}
		b.queue = b.queue[n:]
		if len(b.queue) == 0 {
			b.queue = nil // let the array go
		}
		b.mu.Unlock()
		if n == 0 {
			return errs
		}
		out := recs[:0]
		for _, r := range recs {
			if !b.local(r.Username) {
				continue // no longer ours: the new owner's record wins
			}
			p, err := b.cfg.Backend.Privacy(ctx, r.Username)
			if err != nil {
				b.m.errors.WithLabelValues("privacy").Inc()
				continue // without the setting nothing may be published
			}
			r.Visibility, r.Allow = int32(p.GetVisibility()), p.GetAllow()
			if r.Online {
				online[r.Username] = r
			} else {
				delete(online, r.Username)
			}
			out = append(out, r)
		}
		errs = errors.Join(errs, b.write(ctx, out, true))
	}
}

// write stores recs (and publishes them if announce) in one pipeline.
func (b *Bridge) write(ctx context.Context, recs []*Record, announce bool) error {
	if len(recs) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, b.cfg.Timeout)
	defer cancel()
	for len(recs) > 0 {
		chunk := recs[:min(len(recs), redisChunk)]
		recs = recs[len(chunk):]
		_, err := b.cfg.Redis.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, r := range chunk {
				v, err := json.Marshal(r)
				if err != nil {
					return err
				}
				ttl := b.cfg.OfflineTTL
				if r.Online {
					ttl = b.cfg.TTL
				}
				p.Set(ctx, b.key(r.Username), v, ttl)
				if announce {
					p.Publish(ctx, b.channel(b.cfg.Shard(r.Username)), v)
				}
			}
			return nil
		})
		if err != nil {
			b.m.errors.WithLabelValues("write").Inc()
			return err
		}
		if announce {
			b.m.published.Add(float64(len(chunk)))
		}
	}
	return nil
}

// ---------------------------------------------------------------- viewer side

// subscriber keeps the subscriptions equal to the watched shards, re-reads
// the records of a shard after its (re)subscription, and re-reads every
// watched record every TTL/2 (a record that expired, its owner gone, turns
// unknown).
func (b *Bridge) subscriber(ctx context.Context, ps *redis.PubSub) {
	tick := time.NewTicker(b.cfg.TTL / 2)
	defer tick.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	subscribed := map[uint32]bool{}
	for {
		poll := false
		select {
		case <-ctx.Done():
			return
		case <-b.sub:
		case <-retry.C:
		case <-tick.C:
			poll = true
		}
		b.mu.Lock()
		var add, drop []string
		for s := range b.watched {
			if !subscribed[s] {
				add = append(add, b.channel(s))
				subscribed[s] = true
			}
		}
		for s := range subscribed {
			if b.watched[s] == nil {
				drop = append(drop, b.channel(s))
				delete(subscribed, s)
			}
		}
		var names []string
		for s := range b.refetch {
			for n := range b.watched[s] {
				names = append(names, n)
			}
		}
		clear(b.refetch)
		if poll {
			names = names[:0]
			for _, ns := range b.watched {
				for n := range ns {
					names = append(names, n)
				}
			}
		}
		b.mu.Unlock()
		b.m.channels.Set(float64(len(subscribed)))
		// go-redis records the channels even when the command fails and
		// subscribes to them again on its next connection.
		if len(add) > 0 {
			if err := subscribeCtx(ctx, b.cfg.Timeout, func(ctx context.Context) error { return ps.Subscribe(ctx, add...) }); err != nil {
				b.m.errors.WithLabelValues("subscribe").Inc()
			}
		}
		if len(drop) > 0 {
			if err := subscribeCtx(ctx, b.cfg.Timeout, func(ctx context.Context) error { return ps.Unsubscribe(ctx, drop...) }); err != nil {
				b.m.errors.WithLabelValues("subscribe").Inc()
			}
		}
		if len(names) > 0 {
			b.apply(ctx, names, poll)
		}
	}
}

func subscribeCtx(ctx context.Context, d time.Duration, fn func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return fn(ctx)
}

// apply reads names' records and hands them to the tracker; missing ones
// become unknown when expire (a periodic poll), else are left as they are.
func (b *Bridge) apply(ctx context.Context, names []string, expire bool) {
	t := b.tr.Load()
	if t == nil {
		return
	}
	recs := b.records(ctx, names)
	if expire && len(recs) == 0 && len(names) > 0 && !b.reachable(ctx) {
		return // an outage: the receiver already made them unknown
	}
	for _, n := range names {
		r, ok := recs[n]
		if !ok && !expire {
			continue
		}
		t.applyRemote(n, r, !ok)
	}
}

func (b *Bridge) reachable(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.Timeout)
	defer cancel()
	return b.cfg.Redis.Ping(ctx).Err() == nil
}

// receiver reads the subscribed channels. When the connection fails,
// every remote account turns unknown; when go-redis has reconnected and
// subscribed again, the shard's records are re-read.
func (b *Bridge) receiver(ctx context.Context, ps *redis.PubSub) {
	down := false
	for ctx.Err() == nil {
		msg, err := ps.ReceiveTimeout(ctx, max(b.cfg.TTL/3, time.Second))
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				_ = ps.Ping(ctx) // a dead connection fails the next receive
				continue
			}
			b.m.errors.WithLabelValues("receive").Inc()
			if !down {
				down = true
				b.log.Warn("presence: bridge lost Redis; remote presence is unknown until it is back", "err", err)
				if t := b.tr.Load(); t != nil {
					t.remoteUnknown()
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(500 * time.Millisecond):
			}
			continue
		}
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind != "subscribe" {
				continue
			}
			if down {
				down = false
				b.log.Info("presence: bridge reconnected to Redis")
			}
			if s, ok := b.shardOf(m.Channel); ok {
				b.mu.Lock()
				b.refetch[s] = true
				b.mu.Unlock()
				signal(b.sub)
			}
		case *redis.Message:
			r := decodeRecord([]byte(m.Payload))
			if r == nil {
				continue
			}
			b.m.received.Inc()
			if t := b.tr.Load(); t != nil {
				t.applyRemote(r.Username, r, false)
			}
		}
	}
}

func (b *Bridge) shardOf(channel string) (uint32, bool) {
	p := b.cfg.Prefix + "presence:s"
	if len(channel) <= len(p) || channel[:len(p)] != p {
		return 0, false
	}
	s, err := strconv.ParseUint(channel[len(p):], 10, 32)
	return uint32(s), err == nil
}

// ---------------------------------------------------------------- tracker side

// applyRemote sets the record of remote account name (r nil: unknown) and
// tells each watcher whose view changed. An older record than the one held
// is ignored unless force.
func (t *Tracker) applyRemote(name string, r *Record, force bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	a := t.accts[name]
	if a == nil || !a.remote {
		return
	}
	if !force && newer(a.rec, r) != r {
		return
	}
	old := a.rec
	a.rec = r
	for s := range a.watchers {
		was, is := old.view(name, s.Viewer()), r.view(name, s.Viewer())
		if proto.Equal(was, is) {
			continue
		}
		if s.Deliver(is) {
			t.metrics.events.Inc()
		} else {
			t.metrics.dropped.Inc()
		}
	}
}

// remoteUnknown makes every remote account unknown (Redis is gone).
func (t *Tracker) remoteUnknown() {
	t.mu.Lock()
	var names []string
	for n, a := range t.accts {
		if a.remote && a.rec != nil {
			names = append(names, n)
		}
	}
	t.mu.Unlock()
	for _, n := range names {
		t.applyRemote(n, nil, true)
	}
}
