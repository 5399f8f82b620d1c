// Command ferryd is Ferry's server: one node, Pebble in --data, WebSocket
// gateway at /v1/ws, /healthz, /readyz and /metrics on the same listener.
// `ferryd cluster status --redis URL` prints a cluster's nodes, shards, owners and
// epochs (cluster.go; docs/cluster.md).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	runtimepprof "runtime/pprof"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/presence"
	"github.com/ferryhq/ferry/push"
	"github.com/ferryhq/ferry/relay"
	"github.com/ferryhq/ferry/route"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/crypto/acme"
	"golang.org/x/time/rate"
)

type config struct {
	cluster          clusterFlags
	listen, data     string
	tlsCert, tlsKey  string
	acme             acmeFlags
	insecure         bool
	logLevel         string
	maxMessageBytes  int
	maxFrameBytes    int
	window           int
	pingInterval     time.Duration
	handshakeTimeout time.Duration
	inboxTTL         time.Duration
	inboxSweep       time.Duration
	compactOnExit    bool
	inboxMaxDepth    int
	inboxMaxBytes    int64
	maxPrekeysUpload int
	maxPrekeysStored int
	prekeyLow        int
	claimRate        float64
	claimBurst       int
	shutdownTimeout  time.Duration
	maxDevices       int
	maxGroupMembers  int
	fanoutInline     int
	accountCache     int
	fanoutChunk      int
	maxFanoutJobs    int
	linkTTL          time.Duration
	linkStartRate    float64
	linkStartBurst   int
	linkAttemptRate  float64
	linkAttemptBurst int
	limits           limitFlags
	allowedOrigins   stringList
	flapWindow       time.Duration
	maxPresenceSubs  int
	typingRate       float64
	typingBurst      int
	typingTTL        time.Duration
	pprof            bool
	push             pushFlags
}

// pushFlags configure wake-up pushes (package push).
type pushFlags struct {
	window, timeout, ttl time.Duration
	queue, workers       int
	attempts             int
	allowLocal           bool
	unifiedPush          bool
	apnsKeyFile          string
	apnsKeyID, apnsTeam  string
	apnsTopic, apnsURL   string
	fcmCredentials       string
	fcmProject           string
	fcmTokenURL, fcmURL  string
	vapidPublic          string
	vapidPrivateFile     string
	vapidSubscriber      string
}

// limitFlags are the abuse limits of issue 10 (docs/security.md, "Limits").
type limitFlags struct {
	sendRate      float64
	sendBurst     int
	registerRate  float64
	registerBurst int
	connsPerIP    int
	connRate      float64
	connBurst     int
}

type stringList []string

func (s *stringList) String() string     { return fmt.Sprint(*s) }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	if code, ok := runSubcommand(os.Args[1:]); ok {
		os.Exit(code)
	}
	var c config
	fs := flag.NewFlagSet("ferryd", flag.ExitOnError)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:7600", "address to listen on")
	fs.StringVar(&c.data, "data", "./data", "directory of the Pebble database")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "TLS certificate file (PEM)")
	fs.StringVar(&c.tlsKey, "tls-key", "", "TLS key file (PEM)")
	fs.Var(&c.acme.domains, "acme-domain", "get a certificate for this host name automatically with ACME, TLS-ALPN-01 on the listener (repeatable; listen on :443)")
	fs.StringVar(&c.acme.cache, "acme-cache", "", "directory keeping ACME account key and certificates (required with --acme-domain)")
	fs.StringVar(&c.acme.email, "acme-email", "", "contact address for the ACME account (expiry notices)")
	fs.StringVar(&c.acme.directory, "acme-directory", acme.LetsEncryptURL, "ACME directory URL (a staging or local ACME server for tests)")
	fs.StringVar(&c.acme.caFile, "acme-ca-file", "", "PEM roots to trust for the ACME directory's HTTPS (a private or local ACME server; default: the system's)")
	fs.BoolVar(&c.insecure, "insecure", false, "allow plain text on a non-loopback address")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.IntVar(&c.maxMessageBytes, "max-message-bytes", 262144, "largest ciphertext per device in a send")
	fs.IntVar(&c.maxFrameBytes, "max-frame-bytes", 2<<20, "largest client frame")
	fs.IntVar(&c.window, "delivery-window", 64, "unacked envelopes in flight per connection")
	fs.DurationVar(&c.pingInterval, "ping-interval", 30*time.Second, "server ping period; 2 missed = dead peer")
	fs.DurationVar(&c.handshakeTimeout, "handshake-timeout", 10*time.Second, "time allowed for Hello and Auth")
	fs.DurationVar(&c.inboxTTL, "inbox-ttl", 30*24*time.Hour, "undelivered envelopes expire after this")
	fs.DurationVar(&c.inboxSweep, "inbox-sweep-interval", time.Minute, "how often expired envelopes are deleted")
	fs.BoolVar(&c.compactOnExit, "compact-on-exit", false,
		"after a clean stop, compact the whole store so deleted envelopes leave no bytes in its files (audits; see docs/privacy.md)")
	fs.IntVar(&c.inboxMaxDepth, "inbox-max-depth", 100000, "envelopes held per device")
	fs.Int64Var(&c.inboxMaxBytes, "inbox-max-bytes", 256<<20, "bytes held per device")
	fs.IntVar(&c.maxPrekeysUpload, "max-prekeys-per-upload", 100, "one-time prekeys per upload")
	fs.IntVar(&c.maxPrekeysStored, "max-prekeys-stored", 1000, "one-time prekeys held per device")
	fs.IntVar(&c.prekeyLow, "prekey-low-threshold", 10, "tell a device to refill below this many one-time prekeys")
	fs.Float64Var(&c.claimRate, "claim-rate", 5, "prekey bundle claims per second per requesting device")
	fs.IntVar(&c.claimBurst, "claim-burst", 20, "prekey bundle claim burst per requesting device")
	fs.IntVar(&c.maxDevices, "max-devices", device.DefaultMaxDevices, "devices per account, the primary included")
	fs.IntVar(&c.maxGroupMembers, "max-group-members", group.DefaultMaxMembers, "members per group")
	fs.IntVar(&c.accountCache, "account-cache", 100000, "account records kept in memory (negative: none)")
	fs.IntVar(&c.fanoutInline, "group-fanout-inline", 256, "recipient devices a group send writes before its ack; larger sends are queued durably and expanded after it")
	fs.IntVar(&c.fanoutChunk, "group-fanout-chunk", 256, "entries of a queued group send written per commit")
	fs.IntVar(&c.maxFanoutJobs, "max-fanout-jobs", 1024, "queued large group sends; over it they fail with a retryable UNAVAILABLE")
	fs.DurationVar(&c.linkTTL, "link-ttl", 10*time.Minute, "how long a link code stays valid")
	fs.Float64Var(&c.linkStartRate, "link-start-rate", 5, "link codes per minute per remote IP (/64 for IPv6)")
	fs.IntVar(&c.linkStartBurst, "link-start-burst", 5, "link code burst per remote IP")
	fs.Float64Var(&c.linkAttemptRate, "link-attempt-rate", 10, "link code lookups and approvals per minute per primary device")
	fs.IntVar(&c.linkAttemptBurst, "link-attempt-burst", 10, "link code lookup and approval burst per primary device")
	l := &c.limits
	fs.Float64Var(&l.sendRate, "send-rate", 50, "sends (Send, GroupSend, SyncToDevice together) per second per device (inf: no limit)")
	fs.IntVar(&l.sendBurst, "send-burst", 200, "send burst per device")
	fs.Float64Var(&l.registerRate, "register-rate", 10, "registrations per minute per remote IP, /64 for IPv6 (inf: no limit)")
	fs.IntVar(&l.registerBurst, "register-burst", 20, "registration burst per remote IP")
	fs.IntVar(&l.connsPerIP, "max-conns-per-ip", 1024, "open WebSocket connections per remote IP, /64 for IPv6; over it HTTP 429 (0: no limit; behind a proxy every client has its address)")
	fs.Float64Var(&l.connRate, "conn-rate", 50, "new WebSocket connections per second per remote IP, /64 for IPv6; over it HTTP 429 (inf: no limit)")
	fs.IntVar(&l.connBurst, "conn-burst", 500, "new connection burst per remote IP")
	fs.DurationVar(&c.shutdownTimeout, "shutdown-timeout", 15*time.Second, "how long SIGTERM waits for in-flight work")
	fs.BoolVar(&c.pprof, "pprof", false, "serve /debug/pprof/ (profiles; keep off in production listeners)")
	fs.DurationVar(&c.flapWindow, "presence-flap-window", 2*time.Second, "offline then online within this makes no presence event (0: no coalescing)")
	fs.IntVar(&c.maxPresenceSubs, "max-presence-subscriptions", 256, "accounts one connection may watch for presence")
	fs.Float64Var(&c.typingRate, "typing-rate", 2, "typing indicators per second per device")
	fs.IntVar(&c.typingBurst, "typing-burst", 6, "typing indicator burst per device")
	fs.DurationVar(&c.typingTTL, "typing-ttl", 6*time.Second, "receivers drop a typing indicator not refreshed within this")
	fs.Var(&c.allowedOrigins, "allow-origin", "browser origin allowed to connect (repeatable; * for any)")
	p := &c.push
	fs.DurationVar(&p.window, "push-window", 30*time.Second, "at most one wake-up push per offline device per this window")
	fs.IntVar(&p.queue, "push-queue", 4096, "wake-ups waiting for a push worker; beyond it they are dropped (counted)")
	fs.IntVar(&p.workers, "push-workers", 4, "goroutines sending pushes")
	fs.IntVar(&p.attempts, "push-attempts", 4, "attempts per push on 429, 5xx or network errors (with backoff, honouring Retry-After)")
	fs.DurationVar(&p.timeout, "push-timeout", 10*time.Second, "time allowed for one push attempt")
	fs.DurationVar(&p.ttl, "push-ttl", 24*time.Hour, "how long a provider keeps an undelivered wake-up")
	fs.BoolVar(&p.allowLocal, "push-allow-local-endpoints", false, "accept http:// and private/loopback Web Push and UnifiedPush endpoints (tests, one-network setups)")
	fs.BoolVar(&p.unifiedPush, "unifiedpush", true, "send UnifiedPush wake-ups (needs no credentials)")
	fs.StringVar(&p.apnsKeyFile, "apns-key", "", "APNs auth key file (.p8); enables APNs with --apns-key-id, --apns-team-id, --apns-topic")
	fs.StringVar(&p.apnsKeyID, "apns-key-id", "", "APNs key id (kid)")
	fs.StringVar(&p.apnsTeam, "apns-team-id", "", "Apple developer team id (iss)")
	fs.StringVar(&p.apnsTopic, "apns-topic", "", "the iOS app's bundle id (apns-topic)")
	fs.StringVar(&p.apnsURL, "apns-endpoint", push.APNsProduction, "APNs base URL (sandbox: "+push.APNsSandbox+")")
	fs.StringVar(&p.fcmCredentials, "fcm-credentials", "", "FCM service account JSON key file; enables FCM")
	fs.StringVar(&p.fcmProject, "fcm-project", "", "Firebase project id (default: the key file's project_id)")
	fs.StringVar(&p.fcmTokenURL, "fcm-token-url", "", "OAuth2 token endpoint (default: the key file's token_uri)")
	fs.StringVar(&p.fcmURL, "fcm-endpoint", push.FCMEndpoint, "FCM HTTP v1 API base URL")
	fs.StringVar(&p.vapidPublic, "webpush-vapid-public", "", "VAPID public key (base64url); enables Web Push with --webpush-vapid-private")
	fs.StringVar(&p.vapidPrivateFile, "webpush-vapid-private", "", "file holding the VAPID private key (base64url)")
	fs.StringVar(&p.vapidSubscriber, "webpush-subscriber", "", "VAPID contact: an e-mail address or https URL")
	c.cluster.register(fs)
	_ = fs.Parse(os.Args[1:])

	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "ferryd:", err)
		os.Exit(1)
	}
}

func run(c config) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return fmt.Errorf("bad --log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)

	certs, err := transport(c)
	if err != nil {
		return err
	}

	db, err := store.Open(c.data, store.Options{})
	if err != nil {
		log.Error("ferryd: cannot open the store; refusing to serve", "data", c.data, "err", err)
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		store.Collector(db))
	fatal := make(chan error, 1) // the inbox's OnFatal: storage failed, exit

	var cn *clusterNode
	if c.cluster.redis != "" {
		if cn, err = joinCluster(c.cluster, c.listen, certs != nil, db, reg, log); err != nil {
			db.Close()
			return err
		}
	}

	var srv *relay.Server
	ib, err := inbox.New(db, inbox.Options{
		TTL: c.inboxTTL, SweepInterval: c.inboxSweep, MaxDepth: c.inboxMaxDepth, MaxBytes: c.inboxMaxBytes,
		FanoutInline: c.fanoutInline, FanoutChunk: c.fanoutChunk, MaxFanoutJobs: c.maxFanoutJobs,
		OnAppend: func(devs []wire.DeviceAddr) { srv.OnAppend(devs) },
		OnFatal: func(err error) {
			select {
			case fatal <- err:
			default:
			}
		},
		Registerer: reg, Logger: log,
	})
	if err != nil {
		db.Close()
		return err
	}
	localAccounts := device.New(db, device.Options{MaxDevices: c.maxDevices, CacheSize: c.accountCache})
	var accounts relay.Accounts = localAccounts
	groupOpts := group.Options{MaxMembers: c.maxGroupMembers}
	if cn != nil {
		accounts = cn.router.Accounts(localAccounts)
		groupOpts.AcceptID = cn.router.AcceptGroupID
	}
	providers, err := pushProviders(c.push)
	if err != nil {
		ib.Close()
		db.Close()
		return err
	}
	pushStore := push.NewStore(db)
	var pusher relay.Push
	var disp *push.Dispatcher
	if len(providers) > 0 {
		disp = push.NewDispatcher(push.Config{
			Window: c.push.window, QueueSize: c.push.queue, Workers: c.push.workers,
			MaxAttempts: c.push.attempts, Timeout: c.push.timeout,
			AllowLocalEndpoints: c.push.allowLocal,
			Online:              func(d wire.DeviceAddr) bool { return srv.Online(d) },
			Registerer:          reg, Logger: log,
		}, pushStore, providers)
		pusher = disp
		kinds := make([]string, 0, len(providers))
		for k := range providers {
			kinds = append(kinds, push.KindName(k))
		}
		sort.Strings(kinds)
		log.Info("ferryd: push wake-ups", "kinds", strings.Join(kinds, ","), "window", c.push.window.String())
	}
	prekeys := keys.New(db, keys.Options{MaxPerUpload: c.maxPrekeysUpload, MaxStored: c.maxPrekeysStored,
		LowThreshold: c.prekeyLow, ClaimRate: rate.Limit(c.claimRate), ClaimBurst: c.claimBurst})
	groups := group.New(db, accounts, groupOpts)
	presenceStore := presence.NewStore(db)
	srv = relay.New(relay.Config{
		MaxFrameBytes: c.maxFrameBytes, MaxMessageBytes: c.maxMessageBytes, DeliveryWindow: c.window,
		MaxPrekeysPerUpload: c.maxPrekeysUpload,
		PingInterval:        c.pingInterval, HandshakeTimeout: c.handshakeTimeout,
		AllowedOrigins: c.allowedOrigins, Registerer: reg, Logger: log,
		LinkTTL:       c.linkTTL,
		LinkStartRate: perMinute(c.linkStartRate), LinkStartBurst: c.linkStartBurst,
		LinkAttemptRate: perMinute(c.linkAttemptRate), LinkAttemptBurst: c.linkAttemptBurst,
		PresenceFlapWindow: flapWindow(c.flapWindow), MaxPresenceSubscriptions: c.maxPresenceSubs,
		TypingRate: rate.Limit(c.typingRate), TypingBurst: c.typingBurst, TypingTTL: c.typingTTL,
		SendRate: perSecond(c.limits.sendRate), SendBurst: c.limits.sendBurst,
		RegisterRate: perMinute(c.limits.registerRate), RegisterBurst: c.limits.registerBurst,
		MaxConnsPerIP: connsPerIP(c.limits.connsPerIP),
		ConnRate:      perSecond(c.limits.connRate), ConnBurst: c.limits.connBurst,
	}, deps(cn, relay.Deps{
		Accounts: localAccounts,
		Prekeys:  prekeys,
		Inbox:    wrapInbox(ib, c.data),
		Groups:   groups,
		Push:     pusher,
		Presence: presenceStore,
	}))
	if cn != nil {
		cn.router.SetShardData(newShardData(cn, localAccounts, prekeys, ib, groups, pushStore, presenceStore))
	}
	var superseded <-chan error
	if cn != nil {
		cn.router.SetRelay(srv)
		wctx, wcancel := context.WithCancel(context.Background())
		defer wcancel()
		go cn.watchShards(wctx, srv, log)
		superseded = cn.done
	}

	mux := http.NewServeMux()
	mux.Handle("/v1/", srv.Handler())
	if cn != nil {
		mux.Handle(route.Path, cn.router.Handler())
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !srv.Ready() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	if c.pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}

	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		ib.Close()
		db.Close()
		return err
	}
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	hs.TLSConfig = certs
	go func() {
		if certs != nil {
			errc <- hs.ServeTLS(ln, c.tlsCert, c.tlsKey)
		} else {
			errc <- hs.Serve(ln)
		}
	}()
	scheme := "ws"
	if certs != nil {
		scheme = "wss"
	}
	log.Info("ferryd: serving", "addr", ln.Addr().String(), "url", scheme+"://"+ln.Addr().String(), "data", c.data)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sig:
		log.Info("ferryd: stopping", "signal", s.String())
	case err := <-errc:
		log.Error("ferryd: listener failed", "err", err)
	case err := <-superseded:
		// Another process runs as this node (or the membership failed for
		// good): this one must not serve its shards any more.
		log.Error("ferryd: cluster membership ended; stopping", "err", err)
		cn.done <- err // leave() reads it again
	case err := <-fatal:
		// A WAL write or fsync failed: Pebble holds a batch it could not
		// make durable, so this process must not go on (docs/decisions.md,
		// issue 10). Tell clients to reconnect, answer what is in flight
		// (with UNAVAILABLE), and exit without closing the store: a
		// restart replays the WAL, which holds only what was synced.
		log.Error("ferryd: storage failed; exiting so a supervisor restarts the node", "err", err)
		ctx, cancel := context.WithTimeout(context.Background(), min(c.shutdownTimeout, 5*time.Second))
		defer cancel()
		_ = srv.Shutdown(ctx)
		_ = hs.Shutdown(ctx)
		return fmt.Errorf("storage failed: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.shutdownTimeout)
	defer cancel()
	// Stop accepting and tell clients to come back later; in-flight commits
	// are answered before the store closes.
	if err := srv.Shutdown(ctx); err != nil {
		// Handlers may still read the store: closing it under them would
		// panic. Every commit is already synced, so exiting loses nothing.
		log.Error("ferryd: connections still busy at the shutdown deadline; exiting without closing the store", "err", err)
		// What they are stuck on, for the operator (stacks only: no data).
		_ = runtimepprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
		return fmt.Errorf("shutdown: %w", err)
	}
	_ = hs.Shutdown(ctx)
	if cn != nil {
		if err := cn.leave(); err != nil {
			log.Warn("ferryd: leaving the cluster", "err", err)
		}
	}
	if disp != nil {
		disp.Stop() // queued wake-ups are dropped: they cost only a push
	}
	if err := ib.Close(); err != nil {
		log.Error("ferryd: inbox close", "err", err)
	}
	if err := db.Close(); err != nil {
		return fmt.Errorf("close database: %w", err)
	}
	if c.compactOnExit {
		if err := store.Compact(c.data); err != nil {
			return err
		}
		log.Info("ferryd: store compacted")
	}
	log.Info("ferryd: stopped")
	return nil
}

// pushProviders builds a provider for each push kind the flags configure.
func pushProviders(p pushFlags) (map[wirepb.PushKind]push.Provider, error) {
	out := make(map[wirepb.PushKind]push.Provider)
	endpoints := push.EndpointClient(p.allowLocal)
	if p.unifiedPush {
		out[wirepb.PushKind_UNIFIEDPUSH] = &push.UnifiedPush{Client: endpoints, TTL: p.ttl}
	}
	if p.apnsKeyFile != "" {
		b, err := os.ReadFile(p.apnsKeyFile)
		if err != nil {
			return nil, fmt.Errorf("--apns-key: %w", err)
		}
		key, err := push.ParseAPNsKey(b)
		if err != nil {
			return nil, fmt.Errorf("--apns-key: %w", err)
		}
		if p.apnsKeyID == "" || p.apnsTeam == "" || p.apnsTopic == "" {
			return nil, errors.New("--apns-key needs --apns-key-id, --apns-team-id and --apns-topic")
		}
		out[wirepb.PushKind_APNS] = &push.APNs{Key: key, KeyID: p.apnsKeyID, TeamID: p.apnsTeam,
			Topic: p.apnsTopic, Endpoint: strings.TrimRight(p.apnsURL, "/"), TTL: p.ttl}
	}
	if p.fcmCredentials != "" {
		b, err := os.ReadFile(p.fcmCredentials)
		if err != nil {
			return nil, fmt.Errorf("--fcm-credentials: %w", err)
		}
		f := &push.FCM{CredentialsJSON: b, ProjectID: p.fcmProject, TokenURL: p.fcmTokenURL,
			Endpoint: strings.TrimRight(p.fcmURL, "/"), TTL: p.ttl}
		if err := f.Check(); err != nil {
			return nil, fmt.Errorf("--fcm-credentials: %w", err)
		}
		out[wirepb.PushKind_FCM] = f
	}
	if p.vapidPublic != "" || p.vapidPrivateFile != "" {
		if p.vapidPublic == "" || p.vapidPrivateFile == "" || p.vapidSubscriber == "" {
			return nil, errors.New("web push needs --webpush-vapid-public, --webpush-vapid-private and --webpush-subscriber")
		}
		b, err := os.ReadFile(p.vapidPrivateFile)
		if err != nil {
			return nil, fmt.Errorf("--webpush-vapid-private: %w", err)
		}
		w := &push.WebPush{VAPIDPublicKey: p.vapidPublic, VAPIDPrivateKey: strings.TrimSpace(string(b)),
			Subscriber: p.vapidSubscriber, Client: endpoints, TTL: p.ttl}
		if err := w.Check(); err != nil {
			return nil, fmt.Errorf("web push: %w", err)
		}
		out[wirepb.PushKind_WEBPUSH] = w
	}
	return out, nil
}

// flapWindow maps the flag (0: off) to relay.Config (negative: off).
func flapWindow(d time.Duration) time.Duration {
	if d <= 0 {
		return -1
	}
	return d
}

// perMinute converts a per-minute rate flag (0 or less: the default).
func perMinute(n float64) rate.Limit {
	if n <= 0 {
		return 0
	}
	return perSecond(n / 60)
}

// perSecond is a flag's rate; "inf" is rate.Inf (no limit).
func perSecond(n float64) rate.Limit {
	if math.IsInf(n, 1) {
		return rate.Inf
	}
	return rate.Limit(n)
}

// connsPerIP maps the flag (0: no limit) to relay.Config (negative: none).
func connsPerIP(n int) int {
	if n <= 0 {
		return -1
	}
	return n
}

func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
