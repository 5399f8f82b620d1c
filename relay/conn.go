package relay

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// Connection states, advanced only by the reader.
const (
	stateNew    = iota // waiting for Hello
	stateHello         // waiting for Register or Auth
	stateAuthed        // serving requests
)

// maxBadFrames is how many consecutive undecodable or out-of-order frames a
// connection may send before it is closed with CloseProtocolError.
const maxBadFrames = 16

// conn is one WebSocket. The reader (run/readLoop) owns the protocol state
// and dispatches requests; writeLoop owns every write to the socket; the
// delivery loop (pump) hands inbox entries over within the window.
type conn struct {
	// static after construction
	s      *Server
	ws     *websocket.Conn
	remote string
	ctx    context.Context // canceled when the connection is closing
	cancel context.CancelFunc
	out    chan outFrame // encoded frames for writeLoop; bounded
	wakeCh chan struct{} // capacity 1: "the inbox may have changed"

	// owned by the reader
	state     int
	challenge []byte
	badFrames int
	link      *pendingLink // this connection's link code (LinkStart), if any

	// set by the reader before any handler or the pump starts, read-only after
	addr     wire.DeviceAddr
	sendOnly bool
	// reply, set only on the socketless conn of a forwarded request
	// (ServeAs, cluster.go), takes the response instead of a socket.
	reply func(*wirepb.Response)

	closeOnce   sync.Once
	closeCode   int    // written once in close, read by writeLoop after ctx.Done
	closeReason string // same

	mu       sync.Mutex
	inflight map[uint64]delivered // guarded by mu: handed over, not yet acked

	finish     chan struct{} // closed by run when every frame owed is queued: flush, close frame, exit
	writerDone chan struct{} // closed when writeLoop has exited (no more writes possible)

	handlers sync.WaitGroup
	sem      chan struct{} // bounds concurrent request handlers
	pumpDone chan struct{}
}

// delivered is what the ack path needs to know of a handed-over envelope.
type delivered struct {
	sender       string
	senderDevice uint32
	to           string
	seq          uint64
	clientMsgID  string
	typ          wirepb.EnvelopeType
	groupID      string // a group message or update
}

func newConn(s *Server, ws *websocket.Conn, remote string) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	return &conn{
		s:          s,
		ws:         ws,
		remote:     remote,
		ctx:        ctx,
		cancel:     cancel,
		out:        make(chan outFrame, s.cfg.DeliveryWindow+s.cfg.MaxInflightRequests+8),
		wakeCh:     make(chan struct{}, 1),
		inflight:   make(map[uint64]delivered),
		sem:        make(chan struct{}, s.cfg.MaxInflightRequests),
		finish:     make(chan struct{}),
		writerDone: make(chan struct{}),
	}
}

// close starts closing the connection with a close code and reason. The
// first call wins. Frames already queued are still written first.
func (c *conn) close(code int, reason string) {
	c.closeOnce.Do(func() {
		c.closeCode, c.closeReason = code, reason
		c.s.metrics.closes.WithLabelValues(strconv.Itoa(code)).Inc()
		c.cancel()
		// Unblock the reader without closing the socket: responses still
		// owed (a ✓ whose commit is in flight) are written before the close
		// frame (see run).
		_ = c.ws.SetReadDeadline(time.Now())
	})
}

// readDeadline moves the reader's deadline to t, unless the connection is
// closing: close cancels ctx and then sets the deadline to now to unblock
// the reader, so a later extension by the reader must not undo that (a
// connection would then hang on in Shutdown until its peer spoke).
func (c *conn) readDeadline(t time.Time) {
	_ = c.ws.SetReadDeadline(t)
	if c.ctx.Err() != nil {
		_ = c.ws.SetReadDeadline(time.Now())
	}
}

// closeSocketNow writes the close frame and closes, for a connection whose
// loops never started.
func (c *conn) closeSocketNow() {
	_ = c.ws.WriteControl(websocket.CloseMessage,
		websocket.FormatCloseMessage(c.closeCode, c.closeReason), time.Now().Add(time.Second))
	_ = c.ws.Close()
}

// nudge wakes the delivery loop without blocking.
func (c *conn) nudge() {
	select {
	case c.wakeCh <- struct{}{}:
	default:
	}
}

func (c *conn) run() {
	m := c.s.metrics
	m.conns.Inc()
	defer m.conns.Dec()

	go func() {
		defer close(c.writerDone)
		c.writeLoop()
	}()

	c.readLoop()
	c.close(websocket.CloseNormalClosure, "")
	c.endLink()
	// Requests already read are answered (their store work finishes even if
	// the client is gone), then the writer flushes and sends the close frame.
	c.handlers.Wait()
	if c.state == stateAuthed {
		m.authed.Dec()
		c.untrackDevice()
		c.s.presence.Unsubscribe(c)
		if !c.sendOnly {
			c.s.hub.unregister(c.addr, c)
			c.s.presence.Disconnected(c.addr.Account)
			c.s.deviceDisconnected(c.addr)
			<-c.pumpDone
		}
	}
	close(c.finish)
	<-c.writerDone
}

func (c *conn) readLoop() {
	cfg := &c.s.cfg
	c.ws.SetReadLimit(int64(4 * cfg.MaxFrameBytes))
	c.readDeadline(time.Now().Add(cfg.HandshakeTimeout))
	c.ws.SetPongHandler(func(string) error {
		if c.state == stateAuthed {
			c.readDeadline(time.Now().Add(2 * cfg.PingInterval))
		}
		return nil
	})
	for {
		typ, r, err := c.ws.NextReader()
		if err != nil {
			c.readFailed(err)
			return
		}
		if c.state == stateAuthed {
			c.readDeadline(time.Now().Add(2 * cfg.PingInterval))
		}
		if typ != websocket.BinaryMessage {
			_, _ = io.Copy(io.Discard, r)
			if !c.badFrame(0, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "text frames are not part of the protocol")) {
				return
			}
			continue
		}
		b, err := io.ReadAll(io.LimitReader(r, int64(cfg.MaxFrameBytes)+1))
		if err != nil {
			c.readFailed(err)
			return
		}
		if len(b) > cfg.MaxFrameBytes {
			if _, err := io.Copy(io.Discard, r); err != nil {
				c.readFailed(err)
				return
			}
			c.s.metrics.rejected.WithLabelValues("frame_too_large").Inc()
			if !c.badFrame(0, wire.Errorf(wirepb.ErrorCode_FRAME_TOO_LARGE,
				"frame is over the limit of %d bytes", cfg.MaxFrameBytes)) {
				return
			}
			continue
		}
		f, err := wire.DecodeClientFrame(b, 0)
		if err != nil {
			if !c.badFrame(f.GetId(), err) {
				return
			}
			continue
		}
		if !c.dispatch(f) {
			return
		}
	}
}

func (c *conn) readFailed(err error) {
	var ne net.Error
	switch {
	case errors.Is(err, websocket.ErrReadLimit):
		c.s.metrics.rejected.WithLabelValues("read_limit").Inc()
		c.s.metrics.limits.WithLabelValues(limitFrameSize).Inc()
		c.close(websocket.CloseMessageTooBig, "frame too large")
	case errors.As(err, &ne) && ne.Timeout():
		if c.state == stateAuthed {
			c.close(wire.ClosePingTimeout, "no pong")
		} else if c.link != nil {
			c.close(wire.CloseHandshakeTimeout, "link code expired")
		} else {
			c.close(wire.CloseHandshakeTimeout, "handshake took too long")
		}
	default:
		c.close(websocket.CloseNormalClosure, "")
	}
}

// badFrame answers a frame that could not be served and reports whether the
// connection stays open.
func (c *conn) badFrame(id uint64, err error) bool {
	return c.badFrameAs(id, "invalid", err)
}

// badFrameAs is badFrame for a request of a known kind (metrics).
func (c *conn) badFrameAs(id uint64, kind string, err error) bool {
	c.badFrames++
	c.respondErr(id, kind, err)
	if c.badFrames >= maxBadFrames {
		c.close(wire.CloseProtocolError, "too many bad frames")
		return false
	}
	return true
}

// dispatch serves one decoded frame. Handshake frames are served inline;
// requests after auth run concurrently, bounded by sem.
func (c *conn) dispatch(f *wirepb.ClientFrame) bool {
	switch c.state {
	case stateNew:
		h, ok := f.Body.(*wirepb.ClientFrame_Hello)
		if !ok {
			return c.badFrame(f.Id, wire.Errorf(wirepb.ErrorCode_UNEXPECTED_FRAME, "the first frame must be Hello"))
		}
		return c.hello(f.Id, h.Hello)
	case stateHello:
		switch b := f.Body.(type) {
		case *wirepb.ClientFrame_Register:
			if c.link != nil {
				return c.badFrame(f.Id, wire.Errorf(wirepb.ErrorCode_UNEXPECTED_FRAME, "a linking connection cannot register"))
			}
			return c.register(f.Id, b.Register)
		case *wirepb.ClientFrame_Auth:
			return c.auth(f.Id, b.Auth)
		case *wirepb.ClientFrame_LinkStart:
			return c.linkStart(f.Id, b.LinkStart)
		default:
			return c.badFrame(f.Id, wire.Errorf(wirepb.ErrorCode_UNEXPECTED_FRAME, "authenticate first (Register or Auth)"))
		}
	}
	switch f.Body.(type) {
	case *wirepb.ClientFrame_Hello, *wirepb.ClientFrame_Register, *wirepb.ClientFrame_Auth, *wirepb.ClientFrame_LinkStart:
		return c.badFrame(f.Id, wire.Errorf(wirepb.ErrorCode_UNEXPECTED_FRAME, "already authenticated"))
	}
	c.badFrames = 0
	select {
	case c.sem <- struct{}{}:
	case <-c.ctx.Done():
		return false
	}
	c.handlers.Add(1)
	go func() {
		defer func() {
			<-c.sem
			c.handlers.Done()
		}()
		c.serve(f)
	}()
	return true
}

// becomeDevice makes this connection its device's: tracked for removal
// and, unless send-only, the device's one receiving connection (an older
// one is closed as replaced). Called by the reader once authenticated,
// before the client is told.
func (c *conn) becomeDevice() {
	c.s.metrics.authed.Inc()
	c.trackDevice()
	// From now on the peer must answer pings (or send frames).
	c.readDeadline(time.Now().Add(2 * c.s.cfg.PingInterval))
	if c.sendOnly {
		return
	}
	// Online from now until run ends (a dead peer ends within two ping
	// intervals); counted per connection, so a replacement makes no flap.
	c.s.presence.Connected(c.addr.Account)
	c.s.deviceConnected(c.addr)
	if old := c.s.hub.register(c.addr, c); old != nil {
		old.close(wire.CloseReplaced, "replaced by a newer connection of this device")
	}
}

// startPump starts the delivery loop of a receiving connection.
func (c *conn) startPump() {
	if c.sendOnly {
		return
	}
	c.pumpDone = make(chan struct{})
	go c.pump()
}

// pump hands the inbox over in id order, at most DeliveryWindow unacked at a
// time. The inbox is the source of truth: the loop re-reads it after every
// wake-up, so a lost wake-up delays nothing past the next ack or append.
func (c *conn) pump() {
	defer close(c.pumpDone)
	window := c.s.cfg.DeliveryWindow
	var cursor uint64
	queueEmptySent := false
	for {
		c.mu.Lock()
		room := window - len(c.inflight)
		c.mu.Unlock()
		if room > 0 {
			items, err := c.s.deps.Inbox.RangeRaw(c.ctx, c.addr, cursor, room)
			if err != nil {
				if c.ctx.Err() == nil {
					c.s.log.Error("relay: inbox range failed", "device", c.addr.String(), "err", err)
					c.close(wire.CloseInternal, "storage error")
				}
				return
			}
			for _, it := range items {
				e := it.Env
				c.mu.Lock()
				c.inflight[it.ID] = delivered{sender: e.Sender, senderDevice: e.SenderDevice, to: e.To,
					seq: e.Seq, clientMsgID: e.ClientMsgId, typ: e.Type, groupID: e.GroupId}
				c.mu.Unlock()
				if !c.enqueueFrame(outFrame{b: envelopeFrame(it.Raw), envTimeMs: e.ServerTimeMs}) {
					return
				}
				c.s.metrics.delivered.Inc()
				cursor = it.ID
			}
			if len(items) < room && !queueEmptySent {
				queueEmptySent = true
				c.s.metrics.queueEmpty.Inc()
				if !c.sendEvent(&wirepb.Event{Body: &wirepb.Event_QueueEmpty{QueueEmpty: &wirepb.QueueEmpty{}}}) {
					return
				}
			}
		}
		select {
		case <-c.wakeCh:
		case <-c.ctx.Done():
			return
		}
	}
}

// writeLoop owns the socket's write side: frames, pings, and the final
// close frame.
func (c *conn) writeLoop() {
	cfg := &c.s.cfg
	ping := time.NewTicker(cfg.PingInterval)
	defer ping.Stop()
	fail := func() {
		c.close(websocket.CloseAbnormalClosure, "write failed")
		_ = c.ws.Close()
	}
	for {
		select {
		case f := <-c.out:
			if err := c.write(f.b); err != nil {
				fail()
				return
			}
			c.written(f)
		case <-ping.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(cfg.WriteTimeout)); err != nil {
				fail()
				return
			}
		case <-c.finish:
			// Everything owed is queued by now: write it, then the close frame.
			for {
				select {
				case f := <-c.out:
					if c.write(f.b) != nil {
						fail()
						return
					}
					c.written(f)
					continue
				default:
				}
				break
			}
			c.closeSocketNow()
			return
		}
	}
}

// outFrame is one encoded frame for the writer. An envelope carries its
// server time, so the writer can observe send→deliver latency.
type outFrame struct {
	b         []byte
	envTimeMs int64 // the envelope's server time (0: not an envelope)
}

// written is called after f went out on the socket.
func (c *conn) written(f outFrame) {
	if f.envTimeMs != 0 {
		c.s.metrics.sendDeliver.Observe(max(0, float64(nowMs()-f.envTimeMs)/1000))
	}
}

func (c *conn) write(b []byte) error {
	if err := c.ws.SetWriteDeadline(time.Now().Add(c.s.cfg.WriteTimeout)); err != nil {
		return err
	}
	return c.ws.WriteMessage(websocket.BinaryMessage, b)
}

// enqueue queues an encoded frame for the writer. If the queue stays full
// for WriteTimeout the client is not reading: it is disconnected as a slow
// consumer (everything it missed is still in its inbox).
func (c *conn) enqueue(b []byte) bool { return c.enqueueFrame(outFrame{b: b}) }

func (c *conn) enqueueFrame(f outFrame) bool {
	select {
	case c.out <- f:
		return true
	case <-c.writerDone:
		return false
	default:
	}
	t := time.NewTimer(c.s.cfg.WriteTimeout)
	defer t.Stop()
	select {
	case c.out <- f:
		return true
	case <-c.writerDone:
		return false
	case <-t.C:
		c.s.metrics.rejected.WithLabelValues("slow_consumer").Inc()
		c.close(wire.CloseSlowConsumer, "client did not read in time")
		return false
	}
}

// tryEnqueue queues a best-effort frame only if there is room now, and
// reports whether it did.
func (c *conn) tryEnqueue(b []byte) bool {
	select {
	case c.out <- outFrame{b: b}:
		return true
	default:
		return false
	}
}

// envelopeFrame is the ServerFrame of an Event with the encoded envelope
// env, built without decoding it again (a group body is shared by many
// devices).
func envelopeFrame(env []byte) []byte {
	n := protowire.SizeTag(1) + protowire.SizeBytes(len(env)) // Event.envelope
	b := make([]byte, 0, protowire.SizeTag(2)+protowire.SizeBytes(n))
	b = protowire.AppendTag(b, 2, protowire.BytesType) // ServerFrame.event
	b = protowire.AppendVarint(b, uint64(n))
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(len(env)))
	return append(b, env...)
}

func (c *conn) sendEvent(e *wirepb.Event) bool {
	b, err := proto.Marshal(&wirepb.ServerFrame{Body: &wirepb.ServerFrame_Event{Event: e}})
	if err != nil {
		return false
	}
	return c.enqueue(b)
}

func (c *conn) respond(r *wirepb.Response) {
	if c.reply != nil {
		c.reply(r)
		return
	}
	b, err := proto.Marshal(&wirepb.ServerFrame{Body: &wirepb.ServerFrame_Response{Response: r}})
	if err != nil {
		c.s.log.Error("relay: marshal response", "err", err)
		return
	}
	c.enqueue(b)
}

func (c *conn) respondErr(id uint64, kind string, err error) {
	we := c.s.toWire(err)
	c.s.metrics.requests.WithLabelValues(kind, we.Code.String()).Inc()
	if l := limitOf(kind, we.Code); l != "" {
		c.s.metrics.limits.WithLabelValues(l).Inc()
	}
	c.respond(&wirepb.Response{Id: id, Error: we.Proto()})
}
