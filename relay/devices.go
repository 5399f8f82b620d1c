package relay

// Device lists, linking, removal and device-to-device sync (issue 3; the
// rules are in docs/protocol.md, "Device lists" and "Linking").
//
// State kept here, all in memory and bounded:
//   - pending links (linkTable): one per linking connection, at most
//     Config.MaxPendingLinks; an entry goes when its connection closes
//     before expiry, and in any case LinkTTL after it expired (until then
//     it answers LINK_CODE_EXPIRED rather than LINK_CODE_INVALID). No
//     goroutine: expired entries are swept when links are added.
//   - rate limiters for LinkStart (per remote IP) and GetLink/ApproveLink
//     (per requesting device).
//   - every authenticated connection per device, so removing a device
//     closes all of them, send-only ones included.
//   - striped per-account locks that make "check the identity key against
//     the signed list" and "check the list against the uploaded identity
//     keys" atomic with the write that follows.

import (
	"bytes"
	"container/list"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"github.com/ferryhq/ferry/internal/ratelimit"
	"hash/maphash"
	"sync"
	"time"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Sizes of link fields.
const (
	linkCodeIDSize   = 8
	ephemeralKeySize = 32 // X25519
)

// deviceState is the relay's in-memory state for multi-device requests.
type deviceState struct {
	links     *linkTable
	startLim  *ratelimit.Keyed[string] // LinkStart per remote IP
	attemptLm *ratelimit.Keyed[string] // GetLink + ApproveLink per device

	seed    maphash.Seed
	idLocks [64]sync.Mutex // striped by account

	mu    sync.Mutex
	conns map[wire.DeviceAddr]map[*conn]struct{} // guarded by mu: authenticated connections
}

func newDeviceState(cfg *Config) *deviceState {
	return &deviceState{
		links:     newLinkTable(cfg.LinkTTL, cfg.MaxPendingLinks),
		startLim:  ratelimit.New[string](cfg.LinkStartRate, cfg.LinkStartBurst, ratelimit.DefaultMax),
		attemptLm: ratelimit.New[string](cfg.LinkAttemptRate, cfg.LinkAttemptBurst, ratelimit.DefaultMax),
		seed:      maphash.MakeSeed(),
		conns:     make(map[wire.DeviceAddr]map[*conn]struct{}),
	}
}

// lockAccount serializes identity-key checks and the writes they guard for
// one account (within this process; in cluster mode an account's shard has
// one owner).
func (d *deviceState) lockAccount(account string) func() {
	mu := &d.idLocks[maphash.String(d.seed, account)%uint64(len(d.idLocks))]
	mu.Lock()
	return mu.Unlock
}

// ---------------------------------------------------------------- connections per device

// trackDevice records c, just authenticated, as a connection of its device,
// then checks that the device still exists: a removal that committed before
// the record was made cannot have seen c, so c closes itself (4004). Runs
// on the reader.
func (c *conn) trackDevice() {
	d := c.s.dev
	d.mu.Lock()
	set := d.conns[c.addr]
	if set == nil {
		set = make(map[*conn]struct{})
		d.conns[c.addr] = set
	}
	set[c] = struct{}{}
	d.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	if _, err := c.s.deps.Accounts.Device(ctx, c.addr); errors.Is(err, device.ErrUnknownDevice) || errors.Is(err, device.ErrUnknownAccount) {
		c.close(wire.CloseDeviceRemoved, "device removed")
	}
}

// untrackDevice forgets c (when it ends).
func (c *conn) untrackDevice() {
	d := c.s.dev
	d.mu.Lock()
	if set := d.conns[c.addr]; set != nil {
		delete(set, c)
		if len(set) == 0 {
			delete(d.conns, c.addr)
		}
	}
	d.mu.Unlock()
}

// closeDevice closes every connection of addr except skip with code.
func (s *Server) closeDevice(addr wire.DeviceAddr, skip *conn, code int, reason string) {
	d := s.dev
	d.mu.Lock()
	var all []*conn
	for c := range d.conns[addr] {
		if c != skip {
			all = append(all, c)
		}
	}
	d.mu.Unlock()
	for _, c := range all {
		c.close(code, reason)
	}
}

// purgeDevice deletes what the server holds for a removed device (prekeys,
// inbox, push registration) and closes its connections but skip. The device record is gone
// already, so nothing new reaches it; a failure is logged (entries left
// behind expire with the inbox TTL).
func (s *Server) purgeDevice(ctx context.Context, addr wire.DeviceAddr, skip *conn) {
	s.closeDevice(addr, skip, wire.CloseDeviceRemoved, "device removed")
	if err := s.deps.Prekeys.DeleteDevice(ctx, addr); err != nil {
		s.log.Error("relay: delete prekeys of removed device", "device", addr.String(), "err", err)
	}
	if err := s.deps.Inbox.DeleteDevice(ctx, addr); err != nil {
		s.log.Error("relay: delete inbox of removed device", "device", addr.String(), "err", err)
	}
	if s.deps.Push != nil {
		if err := s.deps.Push.Clear(ctx, addr); err != nil {
			s.log.Error("relay: delete push registration of removed device", "device", addr.String(), "err", err)
		}
	}
	s.log.Info("relay: device removed", "device", addr.String())
}

// ---------------------------------------------------------------- device lists

func notPrimary(what string) error {
	return wire.Errorf(wirepb.ErrorCode_NOT_PRIMARY, "relay: only the primary device (1) may %s", what)
}

func (c *conn) publishDeviceList(ctx context.Context, m *wirepb.PublishDeviceList) (*wirepb.PublishDeviceListResult, error) {
	if c.addr.Device != device.PrimaryDeviceID {
		return nil, notPrimary("publish the device list")
	}
	deps := &c.s.deps
	primary := wire.DeviceAddr{Account: c.addr.Account, Device: device.PrimaryDeviceID}
	l, err := devicelist.Parse(m.GetList())
	if err != nil {
		return nil, err
	}
	unlock := c.s.dev.lockAccount(c.addr.Account)
	ik, err := deps.Prekeys.IdentityKey(ctx, primary)
	if err == nil && ik == nil {
		err = wire.Errorf(wirepb.ErrorCode_NO_KEYS, "relay: upload the primary device's identity key before publishing a device list")
	}
	// A listed device that uploaded an identity key must be listed with it.
	for _, e := range l.Devices {
		if err != nil {
			break
		}
		var k []byte
		if k, err = deps.Prekeys.IdentityKey(ctx, wire.DeviceAddr{Account: c.addr.Account, Device: e.DeviceId}); err == nil && k != nil && !bytes.Equal(k, e.IdentityKey) {
			err = wire.Errorf(wirepb.ErrorCode_DEVICE_LIST_INVALID, "relay: the list names another identity key for device %d than the one it uploaded", e.DeviceId)
		}
	}
	var removed []uint32
	if err == nil {
		removed, err = deps.Accounts.PublishDeviceList(ctx, c.addr.Account, m.List, ik)
	}
	unlock()
	if err != nil {
		return nil, err
	}
	for _, id := range removed {
		c.s.purgeDevice(ctx, wire.DeviceAddr{Account: c.addr.Account, Device: id}, nil)
	}
	return &wirepb.PublishDeviceListResult{Version: l.Version, Removed: removed}, nil
}

func (c *conn) getDeviceList(ctx context.Context, m *wirepb.GetDeviceList) (*wirepb.GetDeviceListResult, error) {
	if _, err := c.s.deps.Accounts.Account(ctx, m.Username); err != nil {
		return nil, err
	}
	sl, _, err := c.s.deps.Accounts.DeviceList(ctx, m.Username)
	if err != nil {
		return nil, err
	}
	return &wirepb.GetDeviceListResult{List: sl}, nil
}

// uploadKeys is UploadKeys with one more rule: a device named on its
// account's signed list cannot upload another identity key than the list
// names for it (IDENTITY_KEY_CHANGED).
func (c *conn) uploadKeys(ctx context.Context, up *wirepb.UploadKeys) (int, error) {
	if len(up.GetIdentityKey()) > 0 {
		unlock := c.s.dev.lockAccount(c.addr.Account)
		defer unlock()
		sl, _, err := c.s.deps.Accounts.DeviceList(ctx, c.addr.Account)
		if err != nil {
			return 0, err
		}
		if sl != nil {
			if l, err := devicelist.Parse(sl); err == nil {
				if k := devicelist.Device(l, c.addr.Device); k != nil && !bytes.Equal(k, up.IdentityKey) {
					return 0, wire.Errorf(wirepb.ErrorCode_IDENTITY_KEY_CHANGED,
						"relay: the signed device list names another identity key for this device")
				}
			}
		}
	}
	return c.s.deps.Prekeys.Upload(ctx, c.addr, up)
}

// ---------------------------------------------------------------- removal

func (c *conn) removeDevice(ctx context.Context, m *wirepb.RemoveDevice) (*wirepb.RemoveDeviceResult, error) {
	switch {
	case m.DeviceId == 0:
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: device id 0 is invalid")
	case m.DeviceId == c.addr.Device && m.DeviceId == device.PrimaryDeviceID:
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: the primary device cannot be removed")
	case m.DeviceId != c.addr.Device && c.addr.Device != device.PrimaryDeviceID:
		return nil, notPrimary("remove another device")
	}
	addr := wire.DeviceAddr{Account: c.addr.Account, Device: m.DeviceId}
	if err := c.s.deps.Accounts.RemoveDevice(ctx, addr); err != nil {
		return nil, err
	}
	// This connection, if it removed its own device, is closed by serve
	// once the response is queued.
	c.s.purgeDevice(ctx, addr, c)
	return &wirepb.RemoveDeviceResult{}, nil
}

// ---------------------------------------------------------------- sync to one device

// syncToDevice puts one ciphertext in the inbox of one other device: of the
// sender's own account (username "" or the sender's: history for a new
// device), or of another account (pairwise sender-key distribution). It has
// no conversation sequence and makes no receipt.
func (c *conn) syncToDevice(ctx context.Context, m *wirepb.SyncToDevice) (*wirepb.SendResult, error) {
	cfg := &c.s.cfg
	account := m.Username
	if account == "" {
		account = c.addr.Account
	}
	to := wire.DeviceAddr{Account: account, Device: m.DeviceId}
	switch {
	case !wire.ValidClientMsgID(m.ClientMsgId):
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: client_msg_id must be 1..64 printable ASCII bytes")
	case m.DeviceId == 0 || to == c.addr:
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: sync goes to another device")
	case len(m.Content) == 0:
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: empty ciphertext")
	case len(m.Content) > cfg.MaxMessageBytes:
		c.s.metrics.rejected.WithLabelValues("message_too_large").Inc()
		return nil, wire.Errorf(wirepb.ErrorCode_MESSAGE_TOO_LARGE, "relay: ciphertext of %d bytes is over the limit of %d", len(m.Content), cfg.MaxMessageBytes)
	case m.Type != wirepb.EnvelopeType_SIGNAL_MESSAGE && m.Type != wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE:
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: ciphertext type %v is not allowed in a sync", m.Type)
	}
	deps := &c.s.deps
	if prev, ok, err := deps.Inbox.Lookup(ctx, c.addr, m.ClientMsgId); err != nil {
		return nil, err
	} else if ok {
		return &wirepb.SendResult{Seq: prev.Seq, ServerTimeMs: prev.ServerTime.UnixMilli(), Duplicate: true}, nil
	}
	d, err := deps.Accounts.Device(ctx, to)
	if err != nil {
		return nil, err
	}
	if d.RegistrationId != m.RegistrationId {
		e := wire.Errorf(wirepb.ErrorCode_DEVICE_MISMATCH, "relay: device %s has another registration id", to)
		e.Mismatch = &wirepb.DeviceMismatch{Stale: []*wirepb.DeviceRef{to.Ref()}}
		return nil, e
	}
	acc, err := deps.Inbox.Append(ctx, inbox.Send{Sender: c.addr, ClientMsgID: m.ClientMsgId, Entries: []inbox.Entry{{
		To: to,
		Env: &wirepb.Envelope{Sender: c.addr.Account, SenderDevice: c.addr.Device, To: account,
			Type: m.Type, Content: m.Content, ClientMsgId: m.ClientMsgId},
	}}})
	if err != nil {
		return nil, err
	}
	return &wirepb.SendResult{Seq: acc.Seq, ServerTimeMs: acc.ServerTime.UnixMilli(), Duplicate: acc.Duplicate}, nil
}

// ---------------------------------------------------------------- linking

// Link states.
const (
	linkWaiting   = iota // shown on the new device, not yet approved
	linkApproving        // an ApproveLink is adding the device
	linkUsed             // approved: the code never works again
)

// pendingLink is one link code. The fields but state are immutable.
type pendingLink struct {
	code         [linkCodeIDSize]byte
	deviceKey    []byte
	regID        uint32
	identityKey  []byte
	ephemeralKey []byte
	conn         *conn // the new device's connection
	expires      time.Time

	state int           // guarded by linkTable.mu
	elem  *list.Element // guarded by linkTable.mu; nil once removed
}

// linkTable holds pending links in a map, and in a list in order of expiry
// (every link lives LinkTTL, so that is insertion order) for sweeping.
type linkTable struct {
	ttl time.Duration
	max int

	mu    sync.Mutex
	m     map[[linkCodeIDSize]byte]*pendingLink // guarded by mu
	order list.List                             // guarded by mu; of *pendingLink, oldest first
}

func newLinkTable(ttl time.Duration, max int) *linkTable {
	return &linkTable{ttl: ttl, max: max, m: make(map[[linkCodeIDSize]byte]*pendingLink)}
}

// sweep drops entries LinkTTL past their expiry. Called with mu held.
func (t *linkTable) sweep(now time.Time) {
	for el := t.order.Front(); el != nil; el = t.order.Front() {
		p := el.Value.(*pendingLink)
		if now.Before(p.expires.Add(t.ttl)) {
			return
		}
		t.removeLocked(p)
	}
}

func (t *linkTable) removeLocked(p *pendingLink) {
	if p.elem == nil {
		return
	}
	t.order.Remove(p.elem)
	p.elem = nil
	delete(t.m, p.code)
}

// add stores a new link with a fresh random code id.
func (t *linkTable) add(p *pendingLink, now time.Time) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sweep(now)
	if len(t.m) >= t.max {
		return rateLimited("pending links on this server", t.ttl/10)
	}
	for {
		if _, err := rand.Read(p.code[:]); err != nil {
			return err
		}
		if _, dup := t.m[p.code]; !dup {
			break
		}
	}
	p.expires = now.Add(t.ttl)
	p.state = linkWaiting
	p.elem = t.order.PushBack(p)
	t.m[p.code] = p
	return nil
}

// find returns the waiting link of code, or LINK_CODE_INVALID (unknown,
// used, being approved, or its device went away) or LINK_CODE_EXPIRED.
// Called with mu held.
func (t *linkTable) find(code []byte, now time.Time) (*pendingLink, error) {
	var k [linkCodeIDSize]byte
	if len(code) != len(k) {
		return nil, wire.Errorf(wirepb.ErrorCode_LINK_CODE_INVALID, "relay: a link code id is %d bytes", len(k))
	}
	copy(k[:], code)
	p := t.m[k]
	switch {
	case p == nil || p.state != linkWaiting:
		return nil, wire.Errorf(wirepb.ErrorCode_LINK_CODE_INVALID, "relay: unknown or used link code")
	case !now.Before(p.expires):
		return nil, wire.Errorf(wirepb.ErrorCode_LINK_CODE_EXPIRED, "relay: link code expired")
	case p.conn.ctx.Err() != nil:
		return nil, wire.Errorf(wirepb.ErrorCode_LINK_CODE_INVALID, "relay: the new device is no longer connected")
	}
	return p, nil
}

func (t *linkTable) get(code []byte, now time.Time) (*pendingLink, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.find(code, now)
}

// reserve marks a waiting link as being approved, so no other approval can
// use it; release or used ends that.
func (t *linkTable) reserve(code []byte, now time.Time) (*pendingLink, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	p, err := t.find(code, now)
	if err == nil {
		p.state = linkApproving
	}
	return p, err
}

// release makes a reserved link usable again (the approval failed before
// adding the device).
func (t *linkTable) release(p *pendingLink) {
	t.mu.Lock()
	if p.state == linkApproving {
		p.state = linkWaiting
	}
	t.mu.Unlock()
}

func (t *linkTable) setUsed(p *pendingLink) {
	t.mu.Lock()
	p.state = linkUsed
	t.mu.Unlock()
}

// closed is called when the link's connection ends: before expiry the code
// just goes (it is invalid now); after expiry it stays until swept, so a
// late approval hears "expired".
func (t *linkTable) closed(p *pendingLink, now time.Time) {
	t.mu.Lock()
	if now.Before(p.expires) || p.state != linkWaiting {
		t.removeLocked(p)
	}
	t.mu.Unlock()
}

// linkStart runs on the reader (handshake state); it reports whether the
// connection stays open. The connection stays in the handshake state: it
// gets the LinkApproved event there and may then Auth with the challenge of
// its Welcome. Its read deadline becomes the code's expiry.
func (c *conn) linkStart(id uint64, m *wirepb.LinkStart) bool {
	if c.link != nil {
		return c.badFrame(id, wire.Errorf(wirepb.ErrorCode_UNEXPECTED_FRAME, "relay: one link code per connection"))
	}
	switch {
	case len(m.DeviceKey) != ed25519.PublicKeySize:
		return c.badFrame(id, wire.Errorf(wirepb.ErrorCode_INVALID_KEY, "relay: device key must be %d bytes", ed25519.PublicKeySize))
	case m.RegistrationId < 1 || m.RegistrationId > device.MaxRegistrationID:
		return c.badFrame(id, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: registration id must be 1..%d", device.MaxRegistrationID))
	case !validIdentityKey(m.IdentityKey):
		return c.badFrame(id, wire.Errorf(wirepb.ErrorCode_INVALID_KEY, "relay: identity key must be 33 bytes, 0x05 and a canonical Curve25519 key"))
	case len(m.EphemeralKey) != ephemeralKeySize:
		return c.badFrame(id, wire.Errorf(wirepb.ErrorCode_INVALID_KEY, "relay: ephemeral key must be %d bytes", ephemeralKeySize))
	}
	if c.s.deps.Cluster != nil {
		if m.Account == "" {
			return c.badFrame(id, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: in a cluster, LinkStart must name the account (the node serving it keeps the code)"))
		}
		if c.redirected(id, "link_start", m.Account) {
			return false
		}
	}
	now := time.Now()
	if d := c.s.dev.startLim.Take(remoteKey(c.remote), now); d > 0 {
		c.s.metrics.rejected.WithLabelValues("link_rate").Inc()
		return c.badFrameAs(id, "link_start", rateLimited("link codes from this address", d))
	}
	p := &pendingLink{
		deviceKey:    bytes.Clone(m.DeviceKey),
		regID:        m.RegistrationId,
		identityKey:  bytes.Clone(m.IdentityKey),
		ephemeralKey: bytes.Clone(m.EphemeralKey),
		conn:         c,
	}
	if err := c.s.dev.links.add(p, now); err != nil {
		return c.badFrameAs(id, "link_start", err)
	}
	c.link = p
	c.readDeadline(p.expires)
	c.respond(&wirepb.Response{Id: id, Result: &wirepb.Response_LinkStart{LinkStart: &wirepb.LinkStartResult{
		CodeId: bytes.Clone(p.code[:]), ExpiresMs: p.expires.UnixMilli()}}})
	c.s.metrics.requests.WithLabelValues("link_start", "OK").Inc()
	return true
}

// endLink drops the connection's link code, if any, when it closes. Runs on
// the reader.
func (c *conn) endLink() {
	if c.link != nil {
		c.s.dev.links.closed(c.link, time.Now())
	}
}

func validIdentityKey(k []byte) bool {
	return len(k) == devicelist.PublicKeySize && k[0] == 0x05 && k[len(k)-1]&0x80 == 0
}

// linkAttempt checks that c is a primary device within its link attempt rate.
func (c *conn) linkAttempt(what string) error {
	if c.addr.Device != device.PrimaryDeviceID {
		return notPrimary(what)
	}
	if d := c.s.dev.attemptLm.Take(c.addr.String(), time.Now()); d > 0 {
		c.s.metrics.rejected.WithLabelValues("link_rate").Inc()
		return rateLimited("link code attempts", d)
	}
	return nil
}

func (c *conn) getLink(ctx context.Context, m *wirepb.GetLink) (*wirepb.GetLinkResult, error) {
	if err := c.linkAttempt("look up link codes"); err != nil {
		return nil, err
	}
	p, err := c.s.dev.links.get(m.CodeId, time.Now())
	if err != nil {
		return nil, err
	}
	return &wirepb.GetLinkResult{DeviceKey: p.deviceKey, RegistrationId: p.regID, IdentityKey: p.identityKey,
		EphemeralKey: p.ephemeralKey, ExpiresMs: p.expires.UnixMilli()}, nil
}

func (c *conn) approveLink(ctx context.Context, m *wirepb.ApproveLink) (*wirepb.ApproveLinkResult, error) {
	if err := c.linkAttempt("approve link codes"); err != nil {
		return nil, err
	}
	switch {
	case len(m.EphemeralKey) != ephemeralKeySize:
		return nil, wire.Errorf(wirepb.ErrorCode_INVALID_KEY, "relay: ephemeral key must be %d bytes", ephemeralKeySize)
	case len(m.Sealed) == 0:
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: no sealed link material")
	case len(m.Sealed) > c.s.cfg.MaxMessageBytes:
		return nil, wire.Errorf(wirepb.ErrorCode_MESSAGE_TOO_LARGE, "relay: sealed link material over %d bytes", c.s.cfg.MaxMessageBytes)
	}
	links := c.s.dev.links
	p, err := links.reserve(m.CodeId, time.Now())
	if err != nil {
		return nil, err
	}
	d, err := c.s.deps.Accounts.AddDevice(ctx, c.addr.Account, p.deviceKey, p.regID)
	if err != nil {
		links.release(p)
		return nil, err
	}
	addr := wire.DeviceAddr{Account: c.addr.Account, Device: d.Id}
	ok := p.conn.sendEvent(&wirepb.Event{Body: &wirepb.Event_LinkApproved{LinkApproved: &wirepb.LinkApproved{
		Username: c.addr.Account, DeviceId: d.Id, EphemeralKey: bytes.Clone(m.EphemeralKey), Sealed: bytes.Clone(m.Sealed)}}})
	links.setUsed(p)
	if !ok {
		// The new device left before it could hear of it: undo.
		if err := c.s.deps.Accounts.RemoveDevice(ctx, addr); err != nil {
			c.s.log.Error("relay: undo link of a departed device", "device", addr.String(), "err", err)
		}
		return nil, wire.Errorf(wirepb.ErrorCode_LINK_CODE_INVALID, "relay: the new device is no longer connected")
	}
	c.s.log.Info("relay: device linked", "device", addr.String())
	return &wirepb.ApproveLinkResult{DeviceId: d.Id}, nil
}
