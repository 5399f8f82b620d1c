// Command ferryd is Ferry's server: one node, Pebble in --data, WebSocket
// gateway at /v1/ws, /healthz, /readyz and /metrics on the same listener.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/presence"
	"github.com/ferryhq/ferry/relay"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/time/rate"
)

type config struct {
	listen, data     string
	tlsCert, tlsKey  string
	insecure         bool
	logLevel         string
	maxMessageBytes  int
	maxFrameBytes    int
	window           int
	pingInterval     time.Duration
	handshakeTimeout time.Duration
	inboxTTL         time.Duration
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
	linkTTL          time.Duration
	linkStartRate    float64
	linkStartBurst   int
	linkAttemptRate  float64
	linkAttemptBurst int
	allowedOrigins   stringList
	flapWindow       time.Duration
	maxPresenceSubs  int
	typingRate       float64
	typingBurst      int
	typingTTL        time.Duration
	pprof            bool
}

type stringList []string

func (s *stringList) String() string     { return fmt.Sprint(*s) }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	var c config
	fs := flag.NewFlagSet("ferryd", flag.ExitOnError)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:7600", "address to listen on")
	fs.StringVar(&c.data, "data", "./data", "directory of the Pebble database")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "TLS certificate file (PEM)")
	fs.StringVar(&c.tlsKey, "tls-key", "", "TLS key file (PEM)")
	fs.BoolVar(&c.insecure, "insecure", false, "allow plain text on a non-loopback address")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.IntVar(&c.maxMessageBytes, "max-message-bytes", 262144, "largest ciphertext per device in a send")
	fs.IntVar(&c.maxFrameBytes, "max-frame-bytes", 2<<20, "largest client frame")
	fs.IntVar(&c.window, "delivery-window", 64, "unacked envelopes in flight per connection")
	fs.DurationVar(&c.pingInterval, "ping-interval", 30*time.Second, "server ping period; 2 missed = dead peer")
	fs.DurationVar(&c.handshakeTimeout, "handshake-timeout", 10*time.Second, "time allowed for Hello and Auth")
	fs.DurationVar(&c.inboxTTL, "inbox-ttl", 30*24*time.Hour, "undelivered envelopes expire after this")
	fs.IntVar(&c.inboxMaxDepth, "inbox-max-depth", 100000, "envelopes held per device")
	fs.Int64Var(&c.inboxMaxBytes, "inbox-max-bytes", 256<<20, "bytes held per device")
	fs.IntVar(&c.maxPrekeysUpload, "max-prekeys-per-upload", 100, "one-time prekeys per upload")
	fs.IntVar(&c.maxPrekeysStored, "max-prekeys-stored", 1000, "one-time prekeys held per device")
	fs.IntVar(&c.prekeyLow, "prekey-low-threshold", 10, "tell a device to refill below this many one-time prekeys")
	fs.Float64Var(&c.claimRate, "claim-rate", 5, "prekey bundle claims per second per requesting device")
	fs.IntVar(&c.claimBurst, "claim-burst", 20, "prekey bundle claim burst per requesting device")
	fs.IntVar(&c.maxDevices, "max-devices", device.DefaultMaxDevices, "devices per account, the primary included")
	fs.IntVar(&c.maxGroupMembers, "max-group-members", group.DefaultMaxMembers, "members per group")
	fs.DurationVar(&c.linkTTL, "link-ttl", 10*time.Minute, "how long a link code stays valid")
	fs.Float64Var(&c.linkStartRate, "link-start-rate", 5, "link codes per minute per remote IP (/64 for IPv6)")
	fs.IntVar(&c.linkStartBurst, "link-start-burst", 5, "link code burst per remote IP")
	fs.Float64Var(&c.linkAttemptRate, "link-attempt-rate", 10, "link code lookups and approvals per minute per primary device")
	fs.IntVar(&c.linkAttemptBurst, "link-attempt-burst", 10, "link code lookup and approval burst per primary device")
	fs.DurationVar(&c.shutdownTimeout, "shutdown-timeout", 15*time.Second, "how long SIGTERM waits for in-flight work")
	fs.BoolVar(&c.pprof, "pprof", false, "serve /debug/pprof/ (profiles; keep off in production listeners)")
	fs.DurationVar(&c.flapWindow, "presence-flap-window", 2*time.Second, "offline then online within this makes no presence event (0: no coalescing)")
	fs.IntVar(&c.maxPresenceSubs, "max-presence-subscriptions", 256, "accounts one connection may watch for presence")
	fs.Float64Var(&c.typingRate, "typing-rate", 2, "typing indicators per second per device")
	fs.IntVar(&c.typingBurst, "typing-burst", 6, "typing indicator burst per device")
	fs.DurationVar(&c.typingTTL, "typing-ttl", 6*time.Second, "receivers drop a typing indicator not refreshed within this")
	fs.Var(&c.allowedOrigins, "allow-origin", "browser origin allowed to connect (repeatable; * for any)")
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

	if (c.tlsCert == "") != (c.tlsKey == "") {
		return errors.New("--tls-cert and --tls-key go together")
	}
	if c.tlsCert == "" && !c.insecure && !isLoopback(c.listen) {
		return fmt.Errorf("refusing plain text on non-loopback address %s: give --tls-cert/--tls-key or --insecure", c.listen)
	}

	db, err := store.Open(c.data, store.Options{})
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	var srv *relay.Server
	ib, err := inbox.New(db, inbox.Options{
		TTL: c.inboxTTL, MaxDepth: c.inboxMaxDepth, MaxBytes: c.inboxMaxBytes,
		OnAppend:   func(devs []wire.DeviceAddr) { srv.OnAppend(devs) },
		Registerer: reg, Logger: log,
	})
	if err != nil {
		db.Close()
		return err
	}
	accounts := device.New(db, device.Options{MaxDevices: c.maxDevices})
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
	}, relay.Deps{
		Accounts: accounts,
		Prekeys: keys.New(db, keys.Options{MaxPerUpload: c.maxPrekeysUpload, MaxStored: c.maxPrekeysStored,
			LowThreshold: c.prekeyLow, ClaimRate: rate.Limit(c.claimRate), ClaimBurst: c.claimBurst}),
		Inbox:    ib,
		Groups:   group.New(db, accounts, group.Options{MaxMembers: c.maxGroupMembers}),
		Presence: presence.NewStore(db),
	})

	mux := http.NewServeMux()
	mux.Handle("/v1/", srv.Handler())
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
	go func() {
		if c.tlsCert != "" {
			errc <- hs.ServeTLS(ln, c.tlsCert, c.tlsKey)
		} else {
			errc <- hs.Serve(ln)
		}
	}()
	scheme := "ws"
	if c.tlsCert != "" {
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
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.shutdownTimeout)
	defer cancel()
	// Stop accepting and tell clients to come back later; in-flight commits
	// are answered before the store closes.
	if err := srv.Shutdown(ctx); err != nil {
		// Handlers may still read the store: closing it under them would
		// panic. Every commit is already synced, so exiting loses nothing.
		log.Error("ferryd: connections still busy at the shutdown deadline; exiting without closing the store", "err", err)
		return fmt.Errorf("shutdown: %w", err)
	}
	_ = hs.Shutdown(ctx)
	if err := ib.Close(); err != nil {
		log.Error("ferryd: inbox close", "err", err)
	}
	if err := db.Close(); err != nil {
		return fmt.Errorf("close database: %w", err)
	}
	log.Info("ferryd: stopped")
	return nil
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
	return rate.Limit(n / 60)
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
