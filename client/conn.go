// Package client is Ferry's Go client SDK: the protocol connection (Conn),
// and a device (Client) that keeps its keys, Signal sessions and history in a
// local store, sends with retries under one client message id, and
// receives, decrypts and acks. The CLI, the tests and the bench tool use it;
// native apps can bind it.
package client

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/proto"
)

// Errors of the connection.
var (
	// ErrClosed is returned for requests on a closed connection; the
	// *CloseError from Conn.Err says why it closed.
	ErrClosed = errors.New("client: connection closed")
)

// CloseError is how the server (or the network) ended a connection.
type CloseError struct {
	Code   int    // WebSocket close code; 1006 when the connection just broke
	Reason string // server's reason text
}

func (e *CloseError) Error() string {
	return fmt.Sprintf("client: connection closed (%d %s)", e.Code, e.Reason)
}

// Reconnect reports whether reconnecting may help (see wire.CloseReconnects).
func (e *CloseError) Reconnect() bool { return wire.CloseReconnects(e.Code) }

// eventBuffer is how many events a Conn holds for its reader. It must
// exceed the server's delivery window, so that events never block the
// responses of requests made while handling them.
const eventBuffer = 1024

// DialError is a failed WebSocket dial.
type DialError struct {
	URL        string
	StatusCode int           // HTTP status of a refused upgrade; 0 if there was no answer
	RetryAfter time.Duration // the refusal's Retry-After (429: too many connections from this address; 503: draining), if any
	Err        error
}

func (e *DialError) Error() string {
	if e.StatusCode != 0 {
		return fmt.Sprintf("client: dial %s: HTTP %d: %v", e.URL, e.StatusCode, e.Err)
	}
	return fmt.Sprintf("client: dial %s: %v", e.URL, e.Err)
}

func (e *DialError) Unwrap() error { return e.Err }

// Temporary reports whether dialing again later may work: no answer (network,
// refused connection, timeout) or a server-side HTTP error (5xx: draining,
// restarting, overloaded). TLS and other client-side problems are final.
func (e *DialError) Temporary() bool {
	if e.StatusCode != 0 {
		return e.StatusCode >= 500 || e.StatusCode == 429
	}
	var ne net.Error
	return errors.As(e.Err, &ne) || errors.Is(e.Err, io.EOF) || errors.Is(e.Err, io.ErrUnexpectedEOF)
}

// DialOptions tunes Dial. The zero value is fine.
type DialOptions struct {
	ClientName string        // sent in Hello
	Timeout    time.Duration // for the dial and Hello; 0 = 10s
	Header     http.Header   // extra upgrade headers (tests)
}

// Conn is one protocol connection. Requests may be issued concurrently.
type Conn struct {
	ws      *websocket.Conn
	welcome *wirepb.Welcome

	nextID atomic.Uint64
	wmu    sync.Mutex // serializes writes

	mu      sync.Mutex
	pending map[uint64]chan *wirepb.Response // guarded by mu
	err     error                            // guarded by mu: why the connection ended

	events chan *wirepb.Event
	done   chan struct{}
	once   sync.Once
}

// ServerURL turns "ws://host:port" (or http/https) into the endpoint URL.
func ServerURL(server string) (string, error) {
	u, err := url.Parse(server)
	if err != nil || u.Host == "" {
		return "", fmt.Errorf("client: bad server URL %q (want ws://host:port or wss://host)", server)
	}
	switch u.Scheme {
	case "ws", "wss":
	case "http":
		u.Scheme = "ws"
	case "https":
		u.Scheme = "wss"
	default:
		return "", fmt.Errorf("client: bad server URL scheme %q (want ws or wss)", u.Scheme)
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = wire.Path
	}
	return u.String(), nil
}

// Dial connects and exchanges Hello/Welcome.
func Dial(ctx context.Context, server string, o DialOptions) (*Conn, error) {
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	if o.ClientName == "" {
		o.ClientName = "ferry-go"
	}
	u, err := ServerURL(server)
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	d := websocket.Dialer{HandshakeTimeout: o.Timeout, ReadBufferSize: 4096, WriteBufferSize: 4096}
	ws, resp, err := d.DialContext(dctx, u, o.Header)
	if err != nil {
		de := &DialError{URL: u, Err: err}
		if resp != nil {
			de.StatusCode = resp.StatusCode
			if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && secs > 0 {
				de.RetryAfter = time.Duration(secs) * time.Second
			}
		}
		return nil, de
	}
	c := &Conn{
		ws:      ws,
		pending: make(map[uint64]chan *wirepb.Response),
		events:  make(chan *wirepb.Event, eventBuffer),
		done:    make(chan struct{}),
	}
	ws.SetReadLimit(64 << 20)
	go c.readLoop()
	r, err := c.Do(dctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{
		MinVersion: wire.Version, MaxVersion: wire.Version, Client: o.ClientName}}})
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("client: hello: %w", err)
	}
	c.welcome = r.GetWelcome()
	if c.welcome == nil || len(c.welcome.Challenge) != wire.ChallengeSize {
		c.Close()
		return nil, errors.New("client: server sent no valid Welcome")
	}
	if w := c.welcome.GetLimits().GetDeliveryWindow(); int(w) > eventBuffer-64 {
		c.Close()
		return nil, fmt.Errorf("client: server delivery window %d is over what this client buffers (%d)", w, eventBuffer-64)
	}
	c.extendDeadline()
	return c, nil
}

// Welcome is the server's handshake answer (limits, challenge).
func (c *Conn) Welcome() *wirepb.Welcome { return c.welcome }

// Register creates an account and its primary device; the connection is
// then authenticated as it.
func (c *Conn) Register(ctx context.Context, username string, key ed25519.PrivateKey, registrationID uint32) (uint32, error) {
	sig := ed25519.Sign(key, wire.RegisterMessage(c.welcome.Challenge, username))
	r, err := c.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Register{Register: &wirepb.Register{
		Username: username, DeviceKey: key.Public().(ed25519.PublicKey), RegistrationId: registrationID, Signature: sig}}})
	if err != nil {
		return 0, err
	}
	return r.GetRegister().GetDeviceId(), nil
}

// Auth authenticates as an existing device.
func (c *Conn) Auth(ctx context.Context, username string, deviceID uint32, key ed25519.PrivateKey, sendOnly bool) (*wirepb.AuthResult, error) {
	sig := ed25519.Sign(key, wire.AuthMessage(c.welcome.Challenge, username, deviceID))
	r, err := c.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Auth{Auth: &wirepb.Auth{
		Username: username, DeviceId: deviceID, Signature: sig, SendOnly: sendOnly}}})
	if err != nil {
		return nil, err
	}
	return r.GetAuth(), nil
}

// Do sends a request and waits for its response. An error response comes
// back as a *wire.Error.
func (c *Conn) Do(ctx context.Context, f *wirepb.ClientFrame) (*wirepb.Response, error) {
	id := c.nextID.Add(1)
	f.Id = id
	ch := make(chan *wirepb.Response, 1)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: %w", ErrClosed, c.err)
	}
	c.pending[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}()
	b, err := proto.Marshal(f)
	if err != nil {
		return nil, err
	}
	if err := c.write(b); err != nil {
		return nil, err
	}
	select {
	case r := <-ch:
		if r.Error != nil {
			return nil, wire.FromProto(r.Error)
		}
		return r, nil
	case <-c.done:
		// A response that arrived just before the close still counts.
		select {
		case r := <-ch:
			if r.Error != nil {
				return nil, wire.FromProto(r.Error)
			}
			return r, nil
		default:
		}
		return nil, fmt.Errorf("%w: %w", ErrClosed, c.Err())
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (c *Conn) write(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if err := c.ws.WriteMessage(websocket.BinaryMessage, b); err != nil {
		c.fail(&CloseError{Code: websocket.CloseAbnormalClosure, Reason: err.Error()})
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return nil
}

// Events delivers server events (envelopes, queue-empty, prekeys-low) in
// order. It is closed when the connection ends.
func (c *Conn) Events() <-chan *wirepb.Event { return c.events }

// Done is closed when the connection has ended; Err then says why.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err is nil while open, then the *CloseError (or other error) that ended it.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close ends the connection politely.
func (c *Conn) Close() error {
	c.wmu.Lock()
	_ = c.ws.WriteControl(websocket.CloseMessage,
		websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	c.wmu.Unlock()
	c.fail(&CloseError{Code: websocket.CloseNormalClosure, Reason: "closed by client"})
	return nil
}

func (c *Conn) fail(err error) {
	c.once.Do(func() {
		c.mu.Lock()
		c.err = err
		c.mu.Unlock()
		_ = c.ws.Close()
		close(c.done)
	})
}

// extendDeadline keeps the read side alive while the server pings.
func (c *Conn) extendDeadline() {
	iv := 30 * time.Second
	if c.welcome != nil && c.welcome.Limits != nil && c.welcome.Limits.PingIntervalMs > 0 {
		iv = time.Duration(c.welcome.Limits.PingIntervalMs) * time.Millisecond
	}
	_ = c.ws.SetReadDeadline(time.Now().Add(2*iv + 10*time.Second))
}

func (c *Conn) readLoop() {
	defer close(c.events)
	c.ws.SetPingHandler(func(data string) error {
		c.extendDeadline()
		c.wmu.Lock()
		defer c.wmu.Unlock()
		return c.ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(10*time.Second))
	})
	for {
		_, b, err := c.ws.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				c.fail(&CloseError{Code: ce.Code, Reason: ce.Text})
			} else {
				c.fail(&CloseError{Code: websocket.CloseAbnormalClosure, Reason: err.Error()})
			}
			return
		}
		if c.welcome != nil {
			c.extendDeadline()
		}
		f, err := wire.DecodeServerFrame(b, 0)
		if err != nil {
			c.fail(&CloseError{Code: websocket.CloseProtocolError, Reason: "undecodable server frame"})
			return
		}
		switch body := f.Body.(type) {
		case *wirepb.ServerFrame_Response:
			c.mu.Lock()
			ch := c.pending[body.Response.Id]
			c.mu.Unlock()
			if ch != nil {
				ch <- body.Response
			}
		case *wirepb.ServerFrame_Event:
			if body.Event.GetPrekeysLow() != nil || body.Event.GetPresence() != nil || body.Event.GetTyping() != nil {
				// Hints and ephemeral state; never worth stalling responses for.
				select {
				case c.events <- body.Event:
				default:
				}
				continue
			}
			// Envelopes are bounded by the server's delivery window, which
			// the buffer exceeds (Dial checks), so this does not block the
			// responses a handler of these events may be waiting for.
			select {
			case c.events <- body.Event:
			case <-c.done:
				return
			}
		}
	}
}

// MaxRedirects bounds the WRONG_NODE redirects one DialAs follows.
const MaxRedirects = 4

// Redirect returns the node a WRONG_NODE error points to ("" if err is not
// one): in cluster mode a device's socket lives on the node that serves its
// account, and any other node answers Register and Auth with that node's
// URL.
func Redirect(err error) string {
	var we *wire.Error
	if errors.As(err, &we) && we.Code == wirepb.ErrorCode_WRONG_NODE {
		return we.Redirect
	}
	return ""
}

// DialAs dials server and runs hello (Register or Auth) on the connection,
// following cluster redirects (at most MaxRedirects). It returns the
// connection and the URL of the node it is connected to.
func DialAs(ctx context.Context, server string, o DialOptions, hello func(*Conn) error) (*Conn, string, error) {
	for hops := 0; ; hops++ {
		conn, err := Dial(ctx, server, o)
		if err != nil {
			return nil, server, err
		}
		err = hello(conn)
		if err == nil {
			return conn, server, nil
		}
		conn.Close()
		next := Redirect(err)
		if next == "" || hops >= MaxRedirects {
			return nil, server, err
		}
		server = next
	}
}
