// Package relay is Ferry's WebSocket gateway: handshake and device auth,
// one reader and one writer goroutine per connection, delivery of inbox
// entries with a bounded in-flight window, and the send path that keeps the
// design invariants (persist before ✓, device-set check, dedup, sequence).
package relay

import (
	"context"
	"crypto/rand"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferryhq/ferry/internal/ratelimit"
	"github.com/ferryhq/ferry/presence"
	"github.com/ferryhq/ferry/push"
	"github.com/ferryhq/ferry/wire"
	"github.com/gorilla/websocket"
)

// Server is the gateway. Create with New, mount Handler, stop with Shutdown.
type Server struct {
	// static after construction
	cfg      Config
	deps     Deps
	hub      *hub
	dev      *deviceState // device lists, linking, connections per device
	groups   *groupLocks  // per-group locks (groups.go)
	presence *presence.Tracker
	// typing indicators per device
	typingLim *ratelimit.Keyed[wire.DeviceAddr]
	sendLim   *ratelimit.Keyed[wire.DeviceAddr] // Send + GroupSend + SyncToDevice per device
	regLim    *ratelimit.Keyed[string]          // Register per remote IP
	ipConns   *ipConns                          // open connections per remote IP
	connLim   *ratelimit.Keyed[string]          // new connections per remote IP
	metrics   *metrics
	upgrader  websocket.Upgrader
	log       *slog.Logger // ids only, never content, keys or signatures

	draining atomic.Bool

	mu    sync.Mutex
	conns map[*conn]struct{} // guarded by mu: every open connection
	wg    sync.WaitGroup     // one per open connection
}

// New makes a gateway over the given stores.
func New(cfg Config, deps Deps) *Server {
	cfg.setDefaults()
	s := &Server{
		cfg:     cfg,
		deps:    deps,
		hub:     newHub(),
		dev:     newDeviceState(&cfg),
		groups:  newGroupLocks(),
		metrics: newMetrics(cfg.Registerer),
		presence: presence.NewTracker(deps.Presence, presence.Options{FlapWindow: cfg.PresenceFlapWindow,
			MaxSubscriptions: cfg.MaxPresenceSubscriptions, Registerer: cfg.Registerer, Logger: cfg.Logger}),
		typingLim: ratelimit.New[wire.DeviceAddr](cfg.TypingRate, cfg.TypingBurst, ratelimit.DefaultMax),
		sendLim:   ratelimit.New[wire.DeviceAddr](cfg.SendRate, cfg.SendBurst, ratelimit.DefaultMax),
		regLim:    ratelimit.New[string](cfg.RegisterRate, cfg.RegisterBurst, ratelimit.DefaultMax),
		ipConns:   newIPConns(cfg.MaxConnsPerIP),
		connLim:   ratelimit.New[string](cfg.ConnRate, cfg.ConnBurst, ratelimit.DefaultMax),
		conns:     make(map[*conn]struct{}),
		log:       cfg.Logger,
	}
	s.upgrader = websocket.Upgrader{
		ReadBufferSize:  1024,
		WriteBufferSize: 1024,
		// Write buffers are pooled between writes instead of held per
		// connection: idle sockets are the common case.
		WriteBufferPool: &sync.Pool{},
		CheckOrigin:     s.checkOrigin,
	}
	return s
}

// OnAppend is the inbox's commit hook: it wakes the delivery loops of the
// devices that got new entries, and asks for a push to each of them that
// has no receiving connection here (Deps.Push, which neither blocks nor
// does I/O: this runs on the committer). Wire it into inbox.Options.OnAppend.
func (s *Server) OnAppend(devs []wire.DeviceAddr) {
	for _, d := range devs {
		if c := s.hub.get(d); c != nil {
			c.nudge()
		} else if s.deps.Push != nil {
			s.deps.Push.Wake(d, push.ReasonMessage)
		}
	}
}

// Online reports whether dev has a live receiving connection on this node
// (push.Config.Online).
func (s *Server) Online(dev wire.DeviceAddr) bool { return s.hub.get(dev) != nil }

// Handler serves the WebSocket endpoint at wire.Path.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(wire.Path, s.serveWS)
	return mux
}

// Ready reports whether the server accepts new connections.
func (s *Server) Ready() bool { return !s.draining.Load() }

func (s *Server) checkOrigin(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true // native clients send none
	}
	for _, o := range s.cfg.AllowedOrigins {
		if o == "*" || strings.EqualFold(o, origin) {
			return true
		}
	}
	u, err := url.Parse(origin)
	return err == nil && strings.EqualFold(u.Host, r.Host)
}

func (s *Server) serveWS(w http.ResponseWriter, r *http.Request) {
	if s.draining.Load() {
		w.Header().Set("Retry-After", "1")
		http.Error(w, "server is shutting down", http.StatusServiceUnavailable)
		return
	}
	ipKey := remoteKey(r.RemoteAddr)
	if d := s.connLim.Take(ipKey, time.Now()); d > 0 {
		s.refuseTooMany(w, limitConnRate, d)
		return
	}
	if !s.ipConns.acquire(ipKey) {
		s.refuseTooMany(w, limitConnsPerIP, s.cfg.ConnRetryAfter)
		return
	}
	ws, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		s.ipConns.release(ipKey)
		s.metrics.rejected.WithLabelValues("upgrade").Inc()
		return // the upgrader already answered
	}
	c := newConn(s, ws, r.RemoteAddr)
	s.mu.Lock()
	if s.draining.Load() {
		s.mu.Unlock()
		s.ipConns.release(ipKey)
		c.close(wire.CloseServerShutdown, "server is shutting down")
		c.closeSocketNow()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	// The handler returns at once, so net/http lets go of its request and
	// buffers (about 10 KiB per connection) and of its deep stack; the
	// connection lives on in its reader goroutine, owned by s.wg.
	go func() {
		defer func() {
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			s.ipConns.release(ipKey)
			s.wg.Done()
		}()
		c.run()
	}()
}

// Shutdown stops accepting connections, tells every client to reconnect
// (close code 4100), and waits until in-flight requests — including commits
// whose ✓ is owed — are answered, or ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	s.draining.Store(true)
	s.mu.Lock()
	all := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		all = append(all, c)
	}
	s.mu.Unlock()
	for _, c := range all {
		c.close(wire.CloseServerShutdown, "server is restarting; reconnect with jitter")
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		s.presence.Close()
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func newChallenge() []byte {
	b := make([]byte, wire.ChallengeSize)
	if _, err := rand.Read(b); err != nil {
		panic("relay: no randomness: " + err.Error())
	}
	return b
}

func nowMs() int64 { return time.Now().UnixMilli() }
