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
// and dispatches requests. The writer and the delivery pump are goroutines
// that run only while they have work: the writer while frames (or a ping,
// or the close frame) are queued, the pump while the inbox may have entries
// and the window has room. An idle authenticated connection has only its
// reader goroutine (see docs/performance.md, issue 8).
type conn struct {
	// static after construction
	s      *Server
	ws     *websocket.Conn
	remote string
	ctx    context.Context // canceled when the connection is closing
	cancel context.CancelFunc

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
	closeCode   int    // written once in close, read by the writer after ctx.Done
	closeReason string // same

	mu       sync.Mutex
	inflight map[uint64]delivered // guarded by mu: handed over, not yet acked

	// The write side. The writer goroutine is the only one that writes to
	// the socket (apart from gorilla's own pong and close-echo replies on
	// the reader, each one complete frame in one Write, like ours).
	wmu        sync.Mutex
	wq         []outFrame    // guarded by wmu: frames for the writer, at most wcap; nil while idle
	wcap       int           // static
	writing    bool          // guarded by wmu: a writer goroutine is running
	pingDue    bool          // guarded by wmu: the writer owes a ping
	finishing  bool          // guarded by wmu: run has queued every frame owed; then the close frame
	wdone      bool          // guarded by wmu: writes are over (close frame written, or a write failed)
	wroom      chan struct{} // guarded by wmu: made by a blocked enqueuer, closed by the writer when it takes frames
	pingTimer  *time.Timer   // guarded by wmu; set by run
	writerDone chan struct{} // closed when wdone is set (no more writes possible)

	// The delivery pump, started on demand by nudge once startPump allowed it.
	pmu       sync.Mutex
	pumpOn    bool // guarded by pmu: startPump was called
	pumping   bool // guarded by pmu: a pump goroutine is running
	pumpWake  bool // guarded by pmu: nudged while pumping, look again before exiting
	pumpFreed bool // guarded by pmu: window room freed while pumping
	behind    bool // guarded by pmu: the last pass stopped at a full window, the inbox may hold more
	pumpStop  bool // guarded by pmu: run is ending, start no more pumps
	pumps     sync.WaitGroup
	// owned by the running pump (there is at most one; handed over through pmu)
	cursor         uint64
	queueEmptySent bool

	handlers sync.WaitGroup
	sem      chan struct{} // bounds concurrent request handlers
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
		wcap:       s.cfg.DeliveryWindow + s.cfg.MaxInflightRequests + 8,
		inflight:   make(map[uint64]delivered),
		sem:        make(chan struct{}, s.cfg.MaxInflightRequests),
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

// nudge tells the delivery pump that the inbox may have new entries (every
// commit that adds entries for this device calls it, through
// Server.OnAppend), starting a pump if none is running. It never blocks.
func (c *conn) nudge() {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	if c.pumping {
		c.pumpWake = true
		return
	}
	c.startPumpLocked()
}

// windowFreed tells the delivery pump that acks made room in the window.
// That is news only if the last pass stopped at a full window (behind):
// otherwise it had handed over everything in the inbox, and anything added
// since comes with a nudge. So an ack does not cost an inbox read.
func (c *conn) windowFreed() {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	if c.pumping {
		c.pumpFreed = true
		return
	}
	if c.behind {
		c.startPumpLocked()
	}
}

// startPumpLocked starts a pump if deliveries are allowed. c.pmu must be held
// and no pump running.
func (c *conn) startPumpLocked() {
	if !c.pumpOn || c.pumpStop || c.ctx.Err() != nil {
		return
	}
	c.pumping = true
	c.pumps.Add(1)
	go c.pump()
}

func (c *conn) run() {
	m := c.s.metrics
	m.conns.Inc()
	defer m.conns.Dec()

	c.wmu.Lock()
	c.pingTimer = time.AfterFunc(c.s.cfg.PingInterval, c.pingTick)
	c.wmu.Unlock()

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
			c.pmu.Lock()
			c.pumpStop = true
			c.pmu.Unlock()
			c.pumps.Wait()
		}
	}
	c.wmu.Lock()
	c.finishing = true
	c.startWriterLocked()
	c.wmu.Unlock()
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
			return aside(func() bool { return c.register(f.Id, b.Register) })
		case *wirepb.ClientFrame_Auth:
			return aside(func() bool { return c.auth(f.Id, b.Auth) })
		case *wirepb.ClientFrame_LinkStart:
			return aside(func() bool { return c.linkStart(f.Id, b.LinkStart) })
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

// aside runs a handshake step for the reader on a short-lived goroutine and
// waits for it. The steps' deep call chains (store reads, signature checks,
// registration) would otherwise grow the reader's stack, which the runtime
// halves only while less than a quarter of it is in use, and which an idle
// connection keeps for its whole life (see docs/performance.md, issue 8).
func aside(step func() bool) bool {
	done := make(chan bool, 1)
	go func() { done <- step() }()
	return <-done
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

// startPump allows deliveries on a receiving connection (after the client
// was told it is authenticated) and starts the first pass over its inbox.
func (c *conn) startPump() {
	if c.sendOnly {
		return
	}
	c.pmu.Lock()
	c.pumpOn = true
	c.pmu.Unlock()
	c.nudge()
}

// pump hands the inbox over in id order, at most DeliveryWindow unacked at a
// time, and exits when the inbox is drained or the window is full and no
// nudge came meanwhile (the next append, or an ack when the window was
// full, starts it again). The inbox is the source of truth: every pass
// re-reads it after the cursor, so no entry depends on one wake-up.
func (c *conn) pump() {
	defer c.pumps.Done()
	for {
		c.pmu.Lock()
		c.pumpWake, c.pumpFreed = false, false
		c.pmu.Unlock()
		full, ok := c.deliverPass()
		c.pmu.Lock()
		again := c.pumpWake || (full && c.pumpFreed)
		if !ok || c.pumpStop || c.ctx.Err() != nil || !again {
			c.behind = full
			c.pumping = false
			c.pmu.Unlock()
			return
		}
		c.pmu.Unlock()
	}
}

// deliverPass queues what the window has room for and reports whether it
// stopped at a full window, so the inbox may hold more (full), and whether
// the pump may go on (ok).
func (c *conn) deliverPass() (full, ok bool) {
	c.mu.Lock()
	room := c.s.cfg.DeliveryWindow - len(c.inflight)
	c.mu.Unlock()
	if room <= 0 {
		return true, true
	}
	items, err := c.s.deps.Inbox.RangeRaw(c.ctx, c.addr, c.cursor, room)
	if err != nil {
		if c.ctx.Err() == nil {
			c.s.log.Error("relay: inbox range failed", "device", c.addr.String(), "err", err)
			c.close(wire.CloseInternal, "storage error")
		}
		return false, false
	}
	for _, it := range items {
		e := it.Env
		c.mu.Lock()
		c.inflight[it.ID] = delivered{sender: e.Sender, senderDevice: e.SenderDevice, to: e.To,
			seq: e.Seq, clientMsgID: e.ClientMsgId, typ: e.Type, groupID: e.GroupId}
		c.mu.Unlock()
		if !c.enqueueFrame(outFrame{b: envelopeFrame(it.Raw), envTimeMs: e.ServerTimeMs}) {
			return false, false
		}
		c.s.metrics.delivered.Inc()
		c.cursor = it.ID
	}
	if len(items) == room {
		return true, true
	}
	if !c.queueEmptySent {
		c.queueEmptySent = true
		c.s.metrics.queueEmpty.Inc()
		if !c.sendEvent(&wirepb.Event{Body: &wirepb.Event_QueueEmpty{QueueEmpty: &wirepb.QueueEmpty{}}}) {
			return false, false
		}
	}
	return false, true
}

// startWriterLocked starts a writer unless one runs or writes are over.
// c.wmu must be held.
func (c *conn) startWriterLocked() {
	if c.writing || c.wdone {
		return
	}
	c.writing = true
	go c.writer()
}

// pingTick is the ping timer's callback: it asks the writer for a ping.
func (c *conn) pingTick() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wdone || c.finishing {
		return
	}
	c.pingDue = true
	c.startWriterLocked()
	c.pingTimer.Reset(c.s.cfg.PingInterval)
}

// writer owns the socket's write side while it runs: it takes everything
// queued at once and writes it with one Write (one syscall for a burst of
// frames), then pings and, once run is finishing and the queue is empty,
// the close frame. It exits when the queue is empty.
func (c *conn) writer() {
	var batch []outFrame
	for {
		c.wmu.Lock()
		batch, c.wq = c.wq, batch[:0]
		ping := c.pingDue
		c.pingDue = false
		if c.wroom != nil {
			close(c.wroom)
			c.wroom = nil
		}
		if len(batch) == 0 && !ping {
			c.wq = nil // an idle connection holds no queue
			if !c.finishing {
				c.writing = false
				c.wmu.Unlock()
				return
			}
			c.wmu.Unlock()
			c.closeSocketNow()
			c.writesOver()
			return
		}
		c.wmu.Unlock()
		if ping {
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(c.s.cfg.WriteTimeout)); err != nil {
				c.writeFailed()
				return
			}
		}
		if len(batch) > 0 {
			if err := c.writeFrames(batch); err != nil {
				c.writeFailed()
				return
			}
			for i := range batch {
				c.written(batch[i])
				batch[i] = outFrame{}
			}
		}
	}
}

func (c *conn) writeFailed() {
	c.close(websocket.CloseAbnormalClosure, "write failed")
	_ = c.ws.Close()
	c.writesOver()
}

// writesOver marks the write side done for good: queued frames are dropped
// (they are still in the inbox or were owed to a gone peer) and enqueuers
// get false.
func (c *conn) writesOver() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wdone, c.writing, c.wq = true, false, nil
	if c.pingTimer != nil {
		c.pingTimer.Stop()
	}
	if c.wroom != nil {
		close(c.wroom)
		c.wroom = nil
	}
	close(c.writerDone)
}

// writeBufs pools the buffers frames are encoded into for one socket write.
var writeBufs = sync.Pool{New: func() any { b := make([]byte, 0, 16<<10); return &b }}

const (
	maxWriteBytes   = 64 << 10  // one Write carries at most about this much (then the next)
	maxPooledBuffer = 256 << 10 // larger buffers are not kept
)

// writeFrames writes frames as unfragmented binary WebSocket messages,
// several per Write. It bypasses gorilla's writer (one Write per message):
// server frames are not masked and compression is off, so a frame is a
// 2-10 byte header and the payload. Each Write holds whole frames, so the
// reader's control replies (gorilla's pong and close echo, also one whole
// frame per Write) can only fall between frames.
func (c *conn) writeFrames(frames []outFrame) error {
	nc := c.ws.NetConn()
	bp := writeBufs.Get().(*[]byte)
	b := (*bp)[:0]
	flush := func() error {
		if err := nc.SetWriteDeadline(time.Now().Add(c.s.cfg.WriteTimeout)); err != nil {
			return err
		}
		_, err := nc.Write(b)
		b = b[:0]
		return err
	}
	var err error
	for _, f := range frames {
		b = appendFrameHeader(b, len(f.b))
		b = append(b, f.b...)
		if len(b) >= maxWriteBytes {
			if err = flush(); err != nil {
				break
			}
		}
	}
	if err == nil && len(b) > 0 {
		err = flush()
	}
	if cap(b) <= maxPooledBuffer {
		*bp = b[:0]
		writeBufs.Put(bp)
	}
	return err
}

// appendFrameHeader appends the header of a final, unmasked binary frame of
// n payload bytes (RFC 6455 section 5.2).
func appendFrameHeader(b []byte, n int) []byte {
	const finBinary = 0x80 | websocket.BinaryMessage
	switch {
	case n < 126:
		return append(b, finBinary, byte(n))
	case n <= 0xffff:
		return append(b, finBinary, 126, byte(n>>8), byte(n))
	default:
		return append(b, finBinary, 127, byte(n>>56), byte(n>>48), byte(n>>40), byte(n>>32),
			byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
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

// enqueue queues an encoded frame for the writer. If the queue stays full
// for WriteTimeout the client is not reading: it is disconnected as a slow
// consumer (everything it missed is still in its inbox).
func (c *conn) enqueue(b []byte) bool { return c.enqueueFrame(outFrame{b: b}) }

func (c *conn) enqueueFrame(f outFrame) bool {
	var t *time.Timer
	for {
		c.wmu.Lock()
		if c.wdone {
			c.wmu.Unlock()
			if t != nil {
				t.Stop()
			}
			return false
		}
		if len(c.wq) < c.wcap {
			c.wq = append(c.wq, f)
			c.startWriterLocked()
			c.wmu.Unlock()
			if t != nil {
				t.Stop()
			}
			return true
		}
		if c.wroom == nil {
			c.wroom = make(chan struct{})
		}
		room := c.wroom
		c.wmu.Unlock()
		if t == nil {
			t = time.NewTimer(c.s.cfg.WriteTimeout)
		}
		select {
		case <-room:
		case <-t.C:
			c.s.metrics.rejected.WithLabelValues("slow_consumer").Inc()
			c.close(wire.CloseSlowConsumer, "client did not read in time")
			return false
		}
	}
}

// tryEnqueue queues a best-effort frame only if there is room now, and
// reports whether it did.
func (c *conn) tryEnqueue(b []byte) bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wdone || len(c.wq) >= c.wcap {
		return false
	}
	c.wq = append(c.wq, outFrame{b: b})
	c.startWriterLocked()
	return true
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
