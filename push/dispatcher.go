package push

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
)

// Registrations is the part of Store the dispatcher uses.
type Registrations interface {
	Get(ctx context.Context, dev wire.DeviceAddr) (*wirepb.PushRegistration, error)
	Put(ctx context.Context, dev wire.DeviceAddr, reg *wirepb.PushRegistration) error
	Delete(ctx context.Context, dev wire.DeviceAddr) error
	DeleteIf(ctx context.Context, dev wire.DeviceAddr, reg *wirepb.PushRegistration) (bool, error)
}

var _ Registrations = (*Store)(nil)

// Config of a Dispatcher. Each field's zero value means the default in its
// comment.
type Config struct {
	// Window: at most one push per device per Window. 0 = 30s.
	Window time.Duration
	// QueueSize bounds the wake-ups waiting for a worker; when full, a
	// wake-up is dropped and counted. 0 = 4096.
	QueueSize int
	// Workers is the number of goroutines sending pushes. 0 = 4.
	Workers int
	// MaxAttempts per push, the first included, on 429/5xx/transport
	// errors. 0 = 4.
	MaxAttempts int
	// RetryMin and RetryMax bound the backoff between attempts (doubling,
	// with jitter; a longer Retry-After is honoured up to RetryMax).
	// 0 = 1s and 1 min.
	RetryMin, RetryMax time.Duration
	// Timeout bounds each attempt. 0 = 10s.
	Timeout time.Duration
	// AllowLocalEndpoints accepts http:// and non-public endpoint hosts
	// (tests, one-network self-hosting). Off in production: endpoints are
	// chosen by devices.
	AllowLocalEndpoints bool
	// Online reports whether the device has a live receiving connection on
	// this node; a device that connected since its wake-up was queued is
	// not pushed. nil = never.
	Online func(wire.DeviceAddr) bool
	// Registerer for metrics; nil = none.
	Registerer prometheus.Registerer
	// Logger; nil = slog.Default(). Tokens and endpoints are never logged.
	Logger *slog.Logger
	// Now is the clock; nil = time.Now.
	Now func() time.Time
}

func (c *Config) setDefaults() {
	if c.Window <= 0 {
		c.Window = 30 * time.Second
	}
	if c.QueueSize <= 0 {
		c.QueueSize = 4096
	}
	if c.Workers <= 0 {
		c.Workers = 4
	}
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = 4
	}
	if c.RetryMin <= 0 {
		c.RetryMin = time.Second
	}
	if c.RetryMax <= 0 {
		c.RetryMax = time.Minute
	}
	if c.Timeout <= 0 {
		c.Timeout = 10 * time.Second
	}
	if c.Online == nil {
		c.Online = func(wire.DeviceAddr) bool { return false }
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

type job struct {
	dev     wire.DeviceAddr
	reason  Reason
	attempt int // attempts made so far
}

// Dispatcher turns wake-ups into pushes off the caller's path: Wake never
// blocks and does no I/O; a fixed set of workers reads the registration and
// calls the provider. Create with NewDispatcher, stop with Stop.
type Dispatcher struct {
	// static after construction
	cfg       Config
	regs      Registrations
	providers map[wirepb.PushKind]Provider
	m         *metrics
	queue     chan job
	ctx       context.Context // cancelled by Stop: aborts in-flight attempts
	cancel    context.CancelFunc
	wg        sync.WaitGroup // workers and the janitor

	mu   sync.Mutex
	last map[wire.DeviceAddr]time.Time // guarded by mu: when each device was last pushed (within Window)
}

// NewDispatcher starts cfg.Workers workers sending through providers (a
// kind without a provider is refused at registration).
func NewDispatcher(cfg Config, regs Registrations, providers map[wirepb.PushKind]Provider) *Dispatcher {
	cfg.setDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	d := &Dispatcher{
		cfg: cfg, regs: regs, providers: providers,
		m:     newMetrics(cfg.Registerer),
		queue: make(chan job, cfg.QueueSize),
		ctx:   ctx, cancel: cancel,
		last: make(map[wire.DeviceAddr]time.Time),
	}
	for k := range providers {
		// Exported at 0 from the start, so a rate() alert sees the series
		// before the first push.
		d.m.sent.WithLabelValues(KindName(k))
	}
	d.wg.Add(cfg.Workers + 1)
	for range cfg.Workers {
		go d.worker()
	}
	go d.janitor()
	return d
}

// Stop ends the workers, aborting pushes in flight and dropping queued
// ones (they cost only a wake-up), and waits for them.
func (d *Dispatcher) Stop() {
	d.cancel()
	d.wg.Wait()
}

// Supports reports whether a provider for kind is configured.
func (d *Dispatcher) Supports(kind wirepb.PushKind) bool { return d.providers[kind] != nil }

// Set checks and stores dev's registration, replacing any earlier one.
func (d *Dispatcher) Set(ctx context.Context, dev wire.DeviceAddr, reg *wirepb.PushRegistration) error {
	n, err := Normalize(reg, d.cfg.AllowLocalEndpoints)
	if err != nil {
		return err
	}
	if !d.Supports(n.Kind) {
		return ErrUnsupported.Newf("push: this server does not send %s pushes", kindName(n.Kind))
	}
	return d.regs.Put(ctx, dev, n)
}

// Clear removes dev's registration; none is not an error. Call it when a
// device is removed.
func (d *Dispatcher) Clear(ctx context.Context, dev wire.DeviceAddr) error {
	return d.regs.Delete(ctx, dev)
}

// Wake asks for a push to dev, which the caller found not connected. It
// never blocks and does no I/O: the inbox committer calls it. A device
// pushed within the window is skipped (coalesced); a full queue drops the
// wake-up (counted).
func (d *Dispatcher) Wake(dev wire.DeviceAddr, r Reason) {
	if d.ctx.Err() != nil {
		return
	}
	now := d.cfg.Now()
	d.mu.Lock()
	if t, ok := d.last[dev]; ok && now.Sub(t) < d.cfg.Window {
		d.mu.Unlock()
		d.m.coalesced.Inc()
		return
	}
	d.last[dev] = now
	d.mu.Unlock()
	select {
	case d.queue <- job{dev: dev, reason: r}:
		d.m.queued.Inc()
	default:
		d.m.dropped.Inc()
		d.mu.Lock()
		if d.last[dev] == now {
			delete(d.last, dev) // the next wake-up may try again
		}
		d.mu.Unlock()
	}
}

// janitor forgets devices whose window has passed, so the coalescing map
// holds only devices pushed within the last window.
func (d *Dispatcher) janitor() {
	defer d.wg.Done()
	t := time.NewTicker(d.cfg.Window)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
			now := d.cfg.Now()
			d.mu.Lock()
			for dev, at := range d.last {
				if now.Sub(at) >= d.cfg.Window {
					delete(d.last, dev)
				}
			}
			d.mu.Unlock()
		}
	}
}

func (d *Dispatcher) worker() {
	defer d.wg.Done()
	for {
		select {
		case <-d.ctx.Done():
			return
		case j := <-d.queue:
			d.m.queued.Dec()
			d.handle(j)
		}
	}
}

// handle makes one attempt of j; a retryable failure schedules the next.
func (d *Dispatcher) handle(j job) {
	log := d.cfg.Logger
	if d.cfg.Online(j.dev) {
		d.m.skipped.WithLabelValues("online").Inc()
		return
	}
	ctx, cancel := context.WithTimeout(d.ctx, d.cfg.Timeout)
	defer cancel()
	reg, err := d.regs.Get(ctx, j.dev)
	if errors.Is(err, ErrNotFound) {
		d.m.skipped.WithLabelValues("no_registration").Inc()
		return
	}
	if err != nil {
		log.Warn("push: registration lookup failed", "device", j.dev.String(), "err", err)
		d.m.failed.WithLabelValues("none", "storage").Inc()
		return
	}
	kind := kindName(reg.Kind)
	p := d.providers[reg.Kind]
	if p == nil {
		d.m.failed.WithLabelValues(kind, "no_provider").Inc()
		return
	}
	start := time.Now()
	err = p.Push(ctx, reg, j.reason)
	d.m.latency.WithLabelValues(kind).Observe(time.Since(start).Seconds())
	j.attempt++
	if err == nil {
		d.m.sent.WithLabelValues(kind).Inc()
		log.Debug("push: sent", "device", j.dev.String(), "kind", kind, "reason", j.reason.String(), "attempt", j.attempt)
		return
	}
	var se *StatusError
	if !errors.As(err, &se) {
		se = &StatusError{Kind: reg.Kind, Status: -1}
		if d.ctx.Err() == nil && ctx.Err() != nil {
			se.Status = 0 // a timeout: retry
		}
	}
	label := se.label()
	if se.Status == -1 {
		label = "error"
	}
	d.m.failed.WithLabelValues(kind, label).Inc()
	switch {
	case errors.Is(err, ErrInvalidToken):
		removed, derr := d.regs.DeleteIf(context.WithoutCancel(ctx), j.dev, reg)
		if derr != nil {
			log.Warn("push: removing an invalid registration failed", "device", j.dev.String(), "err", derr)
		} else if removed {
			d.m.removed.WithLabelValues(kind).Inc()
			log.Info("push: registration removed: the provider says it is invalid", "device", j.dev.String(), "kind", kind, "status", se.Status, "reason", se.Reason)
		}
	case se.Status >= 0 && se.Retryable() && j.attempt < d.cfg.MaxAttempts && d.ctx.Err() == nil:
		delay := d.backoff(j.attempt, se.RetryAfter)
		log.Debug("push: retrying", "device", j.dev.String(), "kind", kind, "status", se.Status, "in", delay)
		d.retryLater(j, delay)
	default:
		if d.ctx.Err() == nil {
			log.Warn("push: failed", "device", j.dev.String(), "kind", kind, "attempts", j.attempt, "status", se.Status, "reason", se.Reason)
		}
	}
}

// backoff is the delay before attempt n+1: RetryMin·2^(n-1) with ±25%
// jitter, at least the provider's Retry-After, at most RetryMax.
func (d *Dispatcher) backoff(n int, after time.Duration) time.Duration {
	b := d.cfg.RetryMin << min(n-1, 20)
	b = b - b/4 + time.Duration(rand.Int64N(int64(b/2)+1))
	b = max(b, after)
	return min(b, d.cfg.RetryMax)
}

// retryLater puts j back on the queue after delay, without holding a
// worker; a full queue or a stop drops it.
func (d *Dispatcher) retryLater(j job, delay time.Duration) {
	d.m.retries.Inc()
	time.AfterFunc(delay, func() {
		if d.ctx.Err() != nil {
			return
		}
		select {
		case d.queue <- j:
			d.m.queued.Inc()
		default:
			d.m.dropped.Inc()
		}
	})
}

type metrics struct {
	sent      *prometheus.CounterVec
	failed    *prometheus.CounterVec
	removed   *prometheus.CounterVec
	skipped   *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	coalesced prometheus.Counter
	dropped   prometheus.Counter
	retries   prometheus.Counter
	queued    prometheus.Gauge
}

func newMetrics(r prometheus.Registerer) *metrics {
	m := &metrics{
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_push_sent_total",
			Help: "Pushes the provider accepted, by kind."}, []string{"kind"}),
		failed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_push_failed_total",
			Help: "Failed push attempts, by kind and reason (invalid_token, rate_limited, server_error, transport, auth, rejected, no_provider, storage, error)."}, []string{"kind", "reason"}),
		removed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_push_tokens_removed_total",
			Help: "Registrations removed because the provider reported them invalid, by kind."}, []string{"kind"}),
		skipped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_push_skipped_total",
			Help: "Wake-ups not pushed: the device had connected (online) or has no registration."}, []string{"reason"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "ferry_push_attempt_seconds",
			Help: "Time of one push attempt, by kind.", Buckets: prometheus.ExponentialBuckets(0.005, 2.5, 10)}, []string{"kind"}),
		coalesced: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_push_coalesced_total",
			Help: "Wake-ups merged into a push already sent to the device within the window."}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_push_dropped_total",
			Help: "Wake-ups dropped because the push queue was full."}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_push_retries_total",
			Help: "Push attempts scheduled again after a 429, 5xx or transport error."}),
		queued: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ferry_push_queue_depth",
			Help: "Wake-ups waiting for a push worker."}),
	}
	if r != nil {
		r.MustRegister(m.sent, m.failed, m.removed, m.skipped, m.latency, m.coalesced, m.dropped, m.retries, m.queued)
	}
	return m
}
