package relay

import (
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
)

// Config of the gateway. Each field's zero value means the default given in
// its comment.
type Config struct {
	// MaxFrameBytes is the largest client frame answered with a typed
	// FRAME_TOO_LARGE error; frames over 4x this are cut off with close
	// code 1009. 0 = 2 MiB.
	MaxFrameBytes int
	// MaxMessageBytes is the largest single ciphertext in a Send. 0 = 256 KiB.
	MaxMessageBytes int
	// MaxCiphertexts is the most device ciphertexts in one Send. 0 = 64.
	MaxCiphertexts int
	// MaxPrekeysPerUpload is announced in Welcome (the prekey directory
	// enforces it). 0 = 100.
	MaxPrekeysPerUpload int
	// DeliveryWindow is how many envelopes may be in flight (unacked) per
	// connection. 0 = 64.
	DeliveryWindow int
	// MaxInflightRequests per connection; the reader stops reading when
	// reached. 0 = 32.
	MaxInflightRequests int
	// HandshakeTimeout bounds Hello + Register/Auth. 0 = 10s.
	HandshakeTimeout time.Duration
	// PingInterval is how often the server pings; a connection with no pong
	// or frame for 2 intervals is dead. 0 = 30s.
	PingInterval time.Duration
	// WriteTimeout bounds each socket write, and how long a response may
	// wait for room in a full send queue before the client is dropped as a
	// slow consumer. 0 = 10s.
	WriteTimeout time.Duration
	// LinkTTL is how long a link code (LinkStart) stays valid. 0 = 10 min.
	LinkTTL time.Duration
	// MaxPendingLinks bounds the link codes held at once (each also holds a
	// connection); over it LinkStart is RATE_LIMITED. 0 = 10000.
	MaxPendingLinks int
	// LinkStartRate and LinkStartBurst limit LinkStart per remote IP (per
	// /64 for IPv6). 0 = 5 per minute, burst 5.
	LinkStartRate  rate.Limit
	LinkStartBurst int
	// LinkAttemptRate and LinkAttemptBurst limit GetLink and ApproveLink
	// together per requesting device: guessing codes is an attack.
	// 0 = 10 per minute, burst 10.
	LinkAttemptRate  rate.Limit
	LinkAttemptBurst int
	// SendRate and SendBurst limit Send, GroupSend and SyncToDevice
	// together, per device: over it the request is RATE_LIMITED with
	// retry_after_ms. 0 = 50 per second, burst 200 (a burst covers sender
	// key distribution to a 200-device group); rate.Inf = no limit.
	SendRate  rate.Limit
	SendBurst int
	// RegisterRate and RegisterBurst limit Register per remote IP (per /64
	// for IPv6), failed attempts (name taken) included.
	// 0 = 10 per minute, burst 20; rate.Inf = no limit.
	RegisterRate  rate.Limit
	RegisterBurst int
	// MaxConnsPerIP bounds the open WebSocket connections per remote IP (per
	// /64 for IPv6); an upgrade over it is answered HTTP 429 with
	// Retry-After. Behind a reverse proxy every client has the proxy's
	// address: raise or disable it there. 0 = 1024; negative = no limit.
	MaxConnsPerIP int
	// ConnRetryAfter is the Retry-After of that 429 answer. 0 = 5s.
	ConnRetryAfter time.Duration
	// ConnRate and ConnBurst limit new WebSocket upgrades per remote IP (per
	// /64 for IPv6), so a client that is closed cannot come straight back
	// in a loop; over it the upgrade is answered HTTP 429 with Retry-After
	// (the bucket's wait). 0 = 50 per second, burst 500; rate.Inf = no limit.
	ConnRate  rate.Limit
	ConnBurst int
	// PresenceFlapWindow: an account that goes offline and is back within
	// this window makes no presence event. 0 = 2s; negative = no
	// coalescing.
	PresenceFlapWindow time.Duration
	// MaxPresenceSubscriptions is how many accounts one connection may
	// watch (and name in one GetPresence). 0 = 256.
	MaxPresenceSubscriptions int
	// TypingRate and TypingBurst limit typing indicators per device.
	// 0 = 2 per second, burst 6.
	TypingRate  rate.Limit
	TypingBurst int
	// TypingTTL is how long a receiver shows "typing" without a refresh
	// (sent in every TypingEvent). 0 = 6s.
	TypingTTL time.Duration
	// AllowedOrigins lists browser origins allowed to connect. Requests
	// without an Origin header (native apps) are always allowed. Empty =
	// same host only.
	AllowedOrigins []string
	// Registerer for metrics; nil = none.
	Registerer prometheus.Registerer
	// Logger; nil = slog.Default(). Ferry never logs content, keys or
	// signatures; ids are logged in short form.
	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.MaxFrameBytes, 2<<20)
	def(&c.MaxMessageBytes, 256<<10)
	def(&c.MaxCiphertexts, 64)
	def(&c.MaxPrekeysPerUpload, 100)
	def(&c.DeliveryWindow, 64)
	def(&c.MaxInflightRequests, 32)
	def(&c.MaxPendingLinks, 10000)
	def(&c.LinkStartBurst, 5)
	def(&c.LinkAttemptBurst, 10)
	def(&c.MaxPresenceSubscriptions, 256)
	def(&c.TypingBurst, 6)
	def(&c.SendBurst, 200)
	def(&c.RegisterBurst, 20)
	if c.MaxConnsPerIP == 0 {
		c.MaxConnsPerIP = 1024 // negative: no limit
	}
	def(&c.ConnBurst, 500)
	if c.ConnRate <= 0 {
		c.ConnRate = 50
	}
	if c.SendRate <= 0 {
		c.SendRate = 50
	}
	if c.RegisterRate <= 0 {
		c.RegisterRate = rate.Every(time.Minute / 10)
	}
	if c.TypingRate <= 0 {
		c.TypingRate = 2
	}
	if c.LinkStartRate <= 0 {
		c.LinkStartRate = rate.Every(time.Minute / 5)
	}
	if c.LinkAttemptRate <= 0 {
		c.LinkAttemptRate = rate.Every(time.Minute / 10)
	}
	defd := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	defd(&c.HandshakeTimeout, 10*time.Second)
	defd(&c.PingInterval, 30*time.Second)
	defd(&c.WriteTimeout, 10*time.Second)
	defd(&c.LinkTTL, 10*time.Minute)
	defd(&c.TypingTTL, 6*time.Second)
	defd(&c.ConnRetryAfter, 5*time.Second)
	if c.PresenceFlapWindow == 0 {
		c.PresenceFlapWindow = 2 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}
