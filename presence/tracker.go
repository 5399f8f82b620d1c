package presence

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
)

// Subscriber is one connection that watches accounts.
type Subscriber interface {
	// Viewer is the subscriber's account (privacy is decided per account).
	Viewer() string
	// Deliver queues an event without blocking and reports whether it was
	// queued (false: dropped, e.g. a full queue). It is called with the
	// tracker's lock held, so it must not call back into the tracker.
	Deliver(*wirepb.PresenceInfo) bool
}

// Options of a Tracker. Each zero value means the default in its comment.
type Options struct {
	// FlapWindow: an account that goes offline and comes back within it
	// produces no event (the offline event waits this long). 0 = 2s;
	// negative = no coalescing (every change is pushed at once).
	FlapWindow time.Duration
	// MaxSubscriptions is the most accounts one subscriber may watch, and
	// the most one GetPresence may name. 0 = 256.
	MaxSubscriptions int
	// Now is the clock; nil = time.Now.
	Now func() time.Time
	// Registerer for metrics; nil = none.
	Registerer prometheus.Registerer
	// Logger; nil = slog.Default().
	Logger *slog.Logger
}

// DefaultFlapWindow is Options.FlapWindow's default.
const DefaultFlapWindow = 2 * time.Second

// Tracker is the in-memory presence state of one node. Safe for concurrent use.
//
// An account is online while it has at least one live receiving connection
// (the relay counts a connection from authentication until it ends; a dead
// peer ends within two ping intervals). When the count drops to zero the
// time is the account's last seen: stored best-effort right away, and
// pushed to subscribers after FlapWindow unless the account is back by
// then, in which case nobody hears of it.
type Tracker struct {
	// static after construction
	be      Backend
	o       Options
	log     *slog.Logger
	metrics *metrics

	privMu sync.Mutex // serializes privacy loads into the cache with privacy writes

	mu     sync.Mutex
	accts  map[string]*account            // guarded by mu
	subs   map[Subscriber]map[string]bool // guarded by mu: what each subscriber watches
	closed bool                           // guarded by mu
	bridge *Bridge                        // guarded by mu: accounts of other nodes (cluster mode); nil: none
}

// account is what the tracker holds of one account, while it is online,
// waiting for its offline event, being saved, or watched.
type account struct {
	conns    int
	lastSeen time.Time // when conns last dropped to 0 (zero: not since start)
	pending  *time.Timer
	gen      uint64 // tells a stale timer from the current one
	saving   int    // last-seen writes in flight
	watchers map[Subscriber]struct{}
	privacy  *wirepb.PresencePrivacy // loaded while watched
	// remote: the account's truth is on another node (bridge.go); rec is
	// its last known record there, nil = unknown.
	remote bool
	rec    *Record
}

type metrics struct {
	transitions *prometheus.CounterVec // online / offline, as pushed (after coalescing)
	coalesced   prometheus.Counter
	events      prometheus.Counter
	dropped     prometheus.Counter
	subs        prometheus.Gauge
}

// NewTracker makes a tracker over be (nil: memory only).
func NewTracker(be Backend, o Options) *Tracker {
	if be == nil {
		be = NewMemBackend()
	}
	if o.FlapWindow == 0 {
		o.FlapWindow = DefaultFlapWindow
	}
	if o.MaxSubscriptions <= 0 {
		o.MaxSubscriptions = 256
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	t := &Tracker{be: be, o: o, log: o.Logger, accts: map[string]*account{}, subs: map[Subscriber]map[string]bool{}}
	if t.log == nil {
		t.log = slog.Default()
	}
	m := &metrics{
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_presence_transitions_total",
			Help: "Presence changes pushed to subscribers (after coalescing), by new state."}, []string{"state"}),
		coalesced: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_presence_flaps_coalesced_total",
			Help: "Offline-then-online flaps within the flap window that produced no event."}),
		events: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_presence_events_total",
			Help: "Presence events queued to subscribed connections."}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_presence_events_dropped_total",
			Help: "Presence events dropped because a connection's queue was full."}),
		subs: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ferry_presence_subscriptions",
			Help: "Presence subscriptions held (subscriber, account pairs)."}),
	}
	if o.Registerer != nil {
		o.Registerer.MustRegister(m.transitions, m.coalesced, m.events, m.dropped, m.subs)
	}
	t.metrics = m
	return t
}

// MaxSubscriptions is the per-subscriber bound in force.
func (t *Tracker) MaxSubscriptions() int { return t.o.MaxSubscriptions }

// Close stops pending timers; later calls change nothing.
func (t *Tracker) Close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	for _, a := range t.accts {
		if a.pending != nil {
			a.pending.Stop()
			a.pending = nil
		}
	}
}

func (t *Tracker) get(name string) *account {
	a := t.accts[name]
	if a == nil {
		a = &account{}
		t.accts[name] = a
	}
	return a
}

// gc forgets an account that nothing needs any more. Holds mu.
func (t *Tracker) gc(name string, a *account) {
	if a.conns == 0 && a.pending == nil && a.saving == 0 && len(a.watchers) == 0 {
		delete(t.accts, name)
	}
}

// Connected records a new live receiving connection of name.
func (t *Tracker) Connected(name string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	a := t.get(name)
	a.conns++
	if a.conns != 1 {
		return
	}
	if a.pending != nil {
		// Back within the window: the offline was never announced.
		a.pending.Stop()
		a.pending = nil
		a.gen++
		t.metrics.coalesced.Inc()
		return
	}
	t.push(name, a, &wirepb.PresenceInfo{Username: name, State: wirepb.PresenceState_ONLINE})
}

// SetBridge makes b the source of presence of accounts this node does not
// keep, and the sink of changes of those it does (cluster mode). Call it
// before the tracker serves.
func (t *Tracker) SetBridge(b *Bridge) {
	t.mu.Lock()
	t.bridge = b
	t.mu.Unlock()
	b.attach(t)
}

func (t *Tracker) getBridge() *Bridge {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.bridge
}

// Disconnected records that a receiving connection of name ended.
func (t *Tracker) Disconnected(name string) {
	now := t.o.Now()
	t.mu.Lock()
	a := t.accts[name]
	if a == nil || a.conns == 0 {
		t.mu.Unlock()
		return
	}
	a.conns--
	if a.conns > 0 {
		t.mu.Unlock()
		return
	}
	a.lastSeen = now
	a.saving++
	if t.o.FlapWindow < 0 || t.closed {
		t.push(name, a, offline(name, now))
	} else {
		a.gen++
		gen := a.gen
		a.pending = time.AfterFunc(t.o.FlapWindow, func() { t.flapWindowEnded(name, gen) })
	}
	t.mu.Unlock()

	// Best-effort: a failure only loses this last-seen time.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	err := t.be.SetLastSeen(ctx, name, now)
	cancel()
	if err != nil {
		t.log.Warn("presence: store last seen", "err", err)
	}
	t.mu.Lock()
	a.saving--
	t.gc(name, a)
	t.mu.Unlock()
}

func (t *Tracker) flapWindowEnded(name string, gen uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	a := t.accts[name]
	if a == nil || a.gen != gen || a.pending == nil || t.closed {
		return
	}
	a.pending = nil
	if a.conns == 0 {
		t.push(name, a, offline(name, a.lastSeen))
	}
	t.gc(name, a)
}

func offline(name string, at time.Time) *wirepb.PresenceInfo {
	return &wirepb.PresenceInfo{Username: name, State: wirepb.PresenceState_OFFLINE, LastSeenMs: at.UnixMilli()}
}

// push hands info to every watcher allowed to see it. Holds mu, so events
// of one account reach each subscriber in the order they happened.
func (t *Tracker) push(name string, a *account, info *wirepb.PresenceInfo) {
	t.metrics.transitions.WithLabelValues(info.State.String()).Inc()
	if t.bridge != nil {
		t.bridge.publish(info)
	}
	for s := range a.watchers {
		if !Visible(a.privacy, name, s.Viewer()) {
			continue
		}
		if s.Deliver(info) {
			t.metrics.events.Inc()
		} else {
			t.metrics.dropped.Inc()
		}
	}
}

// state is name's presence as its own account would see it. Holds mu.
// stored is the last-seen time read from the backend (zero if none).
func (t *Tracker) state(name string, stored time.Time) *wirepb.PresenceInfo {
	a := t.accts[name]
	if a != nil && (a.conns > 0 || a.pending != nil) {
		return &wirepb.PresenceInfo{Username: name, State: wirepb.PresenceState_ONLINE}
	}
	seen := stored
	if a != nil && a.lastSeen.After(seen) {
		seen = a.lastSeen
	}
	if seen.IsZero() {
		return &wirepb.PresenceInfo{Username: name}
	}
	return offline(name, seen)
}

func unknown(name string) *wirepb.PresenceInfo { return &wirepb.PresenceInfo{Username: name} }

// lookups is what answering about some accounts needs from the backend.
type lookups struct {
	seen map[string]time.Time
	priv map[string]*wirepb.PresencePrivacy
	// remote names (their truth is on another node) and their records
	// there (missing: unknown).
	remote map[string]bool
	rec    map[string]*Record
}

// remote reads the records of names this node does not keep (cluster
// mode), from Redis through the bridge: no lock is held, so a slow Redis
// delays only this request. It never fails (Redis down: unknown).
func (t *Tracker) remote(ctx context.Context, names []string) lookups {
	l := lookups{seen: make(map[string]time.Time, len(names)), priv: make(map[string]*wirepb.PresencePrivacy, len(names))}
	if b := t.getBridge(); b != nil {
		var remote []string
		for _, n := range names {
			if !b.local(n) {
				remote = append(remote, n)
			}
		}
		if len(remote) > 0 {
			l.remote = make(map[string]bool, len(remote))
			for _, n := range remote {
				l.remote[n] = true
			}
			l.rec = b.records(ctx, remote) // Redis down: all unknown, no error
		}
	}
	return l
}

// load reads last seen and privacy of the local accounts of names (dedup'd,
// validated) into l (from remote).
func (t *Tracker) load(ctx context.Context, names []string, l lookups) (lookups, error) {
	for _, n := range names {
		if l.remote[n] {
			continue
		}
		p, err := t.be.Privacy(ctx, n)
		if err != nil {
			return l, err
		}
		l.priv[n] = p
		ts, ok, err := t.be.LastSeen(ctx, n)
		if err != nil {
			return l, err
		}
		if ok {
			l.seen[n] = ts
		}
	}
	return l, nil
}

// names validates and deduplicates a request's account list.
func (t *Tracker) names(in []string) ([]string, error) {
	if len(in) > 4*t.o.MaxSubscriptions {
		return nil, ErrTooManySubscriptions.Newf("presence: %d accounts named, at most %d", len(in), t.o.MaxSubscriptions)
	}
	seen := make(map[string]bool, len(in))
	out := make([]string, 0, len(in))
	for _, n := range in {
		if err := device.ValidateUsername(n); err != nil {
			return nil, err
		}
		if !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	if len(out) > t.o.MaxSubscriptions {
		return nil, ErrTooManySubscriptions.Newf("presence: %d accounts named, at most %d", len(out), t.o.MaxSubscriptions)
	}
	return out, nil
}

// answer is the presence of names as viewer may see it. Holds mu.
func (t *Tracker) answer(viewer string, names []string, l lookups) []*wirepb.PresenceInfo {
	out := make([]*wirepb.PresenceInfo, len(names))
	for i, n := range names {
		if l.remote[n] {
			r := l.rec[n]
			if a := t.accts[n]; a != nil && a.remote {
				r = newer(a.rec, r)
			}
			out[i] = r.view(n, viewer)
			continue
		}
		p := l.priv[n]
		if a := t.accts[n]; a != nil && a.privacy != nil {
			p = a.privacy // newer than what was read, if a write raced
		}
		if !Visible(p, n, viewer) {
			out[i] = unknown(n)
			continue
		}
		out[i] = t.state(n, l.seen[n])
	}
	return out
}

// Get answers the presence of names as viewer may see it, without subscribing.
func (t *Tracker) Get(ctx context.Context, viewer string, names []string) ([]*wirepb.PresenceInfo, error) {
	names, err := t.names(names)
	if err != nil {
		return nil, err
	}
	l, err := t.load(ctx, names, t.remote(ctx, names))
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.answer(viewer, names, l), nil
}

// Subscribe replaces what s watches with names and answers their current
// presence. Changes are then pushed to s until Unsubscribe.
func (t *Tracker) Subscribe(ctx context.Context, s Subscriber, names []string) ([]*wirepb.PresenceInfo, error) {
	names, err := t.names(names)
	if err != nil {
		return nil, err
	}
	rl := t.remote(ctx, names) // before privMu: Redis may be slow
	t.privMu.Lock()
	defer t.privMu.Unlock()
	l, err := t.load(ctx, names, rl)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	want := make(map[string]bool, len(names))
	for _, n := range names {
		want[n] = true
	}
	for n := range t.subs[s] {
		if !want[n] {
			t.unwatch(s, n)
		}
	}
	cur := t.subs[s]
	if cur == nil {
		cur = make(map[string]bool, len(names))
		t.subs[s] = cur
	}
	for _, n := range names {
		if cur[n] {
			continue
		}
		cur[n] = true
		a := t.get(n)
		if l.remote[n] && !a.remote && len(a.watchers) == 0 && a.conns == 0 {
			a.remote = true
			if t.bridge != nil {
				t.bridge.watch(n)
			}
		}
		if a.remote {
			a.rec = newer(a.rec, l.rec[n])
		}
		if a.privacy == nil {
			a.privacy = l.priv[n] // privMu: no write can have raced this read
		}
		if a.watchers == nil {
			a.watchers = make(map[Subscriber]struct{})
		}
		a.watchers[s] = struct{}{}
		t.metrics.subs.Inc()
	}
	if len(cur) == 0 {
		delete(t.subs, s)
	}
	return t.answer(s.Viewer(), names, l), nil
}

// unwatch removes one subscription. Holds mu.
func (t *Tracker) unwatch(s Subscriber, name string) {
	delete(t.subs[s], name)
	if a := t.accts[name]; a != nil {
		delete(a.watchers, s)
		if len(a.watchers) == 0 {
			a.privacy = nil
			if a.remote {
				a.remote, a.rec = false, nil
				if t.bridge != nil {
					t.bridge.unwatch(name)
				}
			}
		}
		t.gc(name, a)
	}
	t.metrics.subs.Dec()
}

// Unsubscribe drops every subscription of s (its connection ended).
func (t *Tracker) Unsubscribe(s Subscriber) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for n := range t.subs[s] {
		t.unwatch(s, n)
	}
	delete(t.subs, s)
}

// Privacy returns name's setting.
func (t *Tracker) Privacy(ctx context.Context, name string) (*wirepb.PresencePrivacy, error) {
	return t.be.Privacy(ctx, name)
}

// SetPrivacy stores name's new setting and tells watchers whose view
// changed: those who lose sight get PRESENCE_UNKNOWN, those who gain it the
// current state.
func (t *Tracker) SetPrivacy(ctx context.Context, name string, p *wirepb.PresencePrivacy) error {
	t.privMu.Lock()
	defer t.privMu.Unlock()
	if err := t.be.SetPrivacy(ctx, name, p); err != nil {
		return err
	}
	stored, ok, err := t.be.LastSeen(ctx, name)
	if err != nil || !ok {
		stored = time.Time{}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.bridge != nil {
		t.bridge.publish(t.state(name, stored)) // the record carries the new setting
	}
	a := t.accts[name]
	if a == nil || len(a.watchers) == 0 {
		return nil
	}
	old := a.privacy
	a.privacy = p
	cur := t.state(name, stored)
	for s := range a.watchers {
		was, is := Visible(old, name, s.Viewer()), Visible(p, name, s.Viewer())
		var info *wirepb.PresenceInfo
		switch {
		case was && !is:
			info = unknown(name)
		case !was && is:
			info = cur
		default:
			continue
		}
		if s.Deliver(info) {
			t.metrics.events.Inc()
		} else {
			t.metrics.dropped.Inc()
		}
	}
	return nil
}
