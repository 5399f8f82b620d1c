package relay

import (
	"context"
	"errors"
	"sort"
	"time"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/push"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// requestTimeout bounds the store work of one request. Store calls do not
// use the connection's context: a commit that started is finished and
// answered even if the client goes away (a retry is deduplicated).
const requestTimeout = 30 * time.Second

// toWire turns any error into the client-facing form. Store errors carry
// their wire code; anything else is INTERNAL and is logged, not shown.
func (s *Server) toWire(err error) *wire.Error {
	var we *wire.Error
	if errors.As(err, &we) {
		out := *we
		switch we.Code {
		case wirepb.ErrorCode_INTERNAL, wirepb.ErrorCode_UNAVAILABLE:
			// The wrapped text may name files or storage internals: log it,
			// show only the error's own message.
			s.log.Warn("relay: request failed", "code", we.Code.String(), "err", err)
		default:
			out.Message = err.Error()
		}
		return &out
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return wire.Errorf(wirepb.ErrorCode_UNAVAILABLE, "request timed out")
	}
	s.log.Error("relay: internal error", "err", err)
	return wire.Errorf(wirepb.ErrorCode_INTERNAL, "internal error")
}

func (c *conn) hello(id uint64, h *wirepb.Hello) bool {
	if h.MinVersion > wire.Version || h.MaxVersion < wire.Version || h.MinVersion > h.MaxVersion {
		c.respondErr(id, "hello", wire.Errorf(wirepb.ErrorCode_UNSUPPORTED_VERSION,
			"server speaks protocol version %d", wire.Version))
		c.close(wire.CloseUnsupportedVersion, "unsupported protocol version")
		return false
	}
	c.state = stateHello
	c.challenge = newChallenge()
	cfg := &c.s.cfg
	c.respond(&wirepb.Response{Id: id, Result: &wirepb.Response_Welcome{Welcome: &wirepb.Welcome{
		Version:      wire.Version,
		Challenge:    c.challenge,
		ServerTimeMs: nowMs(),
		Limits: &wirepb.Limits{
			MaxFrameBytes:            uint32(cfg.MaxFrameBytes),
			MaxMessageBytes:          uint32(cfg.MaxMessageBytes),
			MaxPrekeysPerUpload:      uint32(cfg.MaxPrekeysPerUpload),
			DeliveryWindow:           uint32(cfg.DeliveryWindow),
			PingIntervalMs:           uint32(cfg.PingInterval.Milliseconds()),
			MaxPresenceSubscriptions: uint32(c.s.presence.MaxSubscriptions()),
		},
	}}})
	c.s.metrics.requests.WithLabelValues("hello", "OK").Inc()
	return true
}

func (c *conn) register(id uint64, r *wirepb.Register) bool {
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	if d := c.s.regLim.Take(remoteKey(c.remote), time.Now()); d > 0 {
		c.s.metrics.rejected.WithLabelValues("register_rate").Inc()
		return c.badFrameAs(id, "register", rateLimited("registrations from this address", d))
	}
	if err := device.ValidateUsername(r.Username); err != nil {
		return c.badFrame(id, err) // the client may pick another name
	}
	if c.redirected(id, "register", r.Username) {
		return false
	}
	if err := device.VerifyRegister(c.challenge, r.Username, r.DeviceKey, r.Signature); err != nil {
		c.respondErr(id, "register", err)
		c.close(wire.CloseAuthFailed, "bad registration signature")
		return false
	}
	d, err := c.s.deps.Accounts.Register(ctx, r.Username, r.DeviceKey, r.RegistrationId)
	if err != nil {
		return c.badFrame(id, err)
	}
	c.addr = wire.DeviceAddr{Account: r.Username, Device: d.Id}
	c.state = stateAuthed
	c.challenge = nil
	c.becomeDevice()
	c.respond(&wirepb.Response{Id: id, Result: &wirepb.Response_Register{Register: &wirepb.RegisterResult{DeviceId: d.Id}}})
	c.s.metrics.requests.WithLabelValues("register", "OK").Inc()
	c.s.log.Info("relay: registered", "device", c.addr.String())
	c.startPump()
	return true
}

func (c *conn) auth(id uint64, a *wirepb.Auth) bool {
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	addr := wire.DeviceAddr{Account: a.Username, Device: a.DeviceId}
	if device.ValidateUsername(a.Username) == nil && c.redirected(id, "auth", a.Username) {
		return false
	}
	d, err := c.s.deps.Accounts.Device(ctx, addr)
	if err == nil {
		err = device.VerifyAuth(d, c.challenge, addr, a.Signature)
	} else if errors.Is(err, device.ErrUnknownAccount) || errors.Is(err, device.ErrUnknownDevice) {
		err = wire.Errorf(wirepb.ErrorCode_AUTH_FAILED, "relay: unknown device")
	}
	if err != nil {
		c.respondErr(id, "auth", err)
		c.close(wire.CloseAuthFailed, "authentication failed")
		return false
	}
	n, _, err := c.s.deps.Prekeys.Count(ctx, addr)
	if err != nil {
		c.respondErr(id, "auth", err)
		c.close(wire.CloseInternal, "storage error")
		return false
	}
	c.addr, c.sendOnly = addr, a.SendOnly
	c.state = stateAuthed
	c.challenge = nil
	// The device's connection is registered before the client hears "ok",
	// so a client that connects again right after cannot be replaced by
	// this older connection.
	c.becomeDevice()
	c.respond(&wirepb.Response{Id: id, Result: &wirepb.Response_Auth{Auth: &wirepb.AuthResult{OneTimePrekeys: uint32(n)}}})
	c.s.metrics.requests.WithLabelValues("auth", "OK").Inc()
	// PrekeysLow goes before any envelope, so its place in the stream is fixed.
	if n < c.s.deps.Prekeys.LowThreshold() && !c.sendOnly {
		c.sendEvent(&wirepb.Event{Body: &wirepb.Event_PrekeysLow{PrekeysLow: &wirepb.PrekeysLow{OneTimePrekeys: uint32(n)}}})
	}
	c.startPump()
	return true
}

// serve answers one request of an authenticated connection.
func (c *conn) serve(f *wirepb.ClientFrame) {
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	var (
		kind string
		res  *wirepb.Response
		err  error
	)
	if k := sendKind(f); k != "" && c.reply == nil { // a forwarded send was limited on its sender's node
		if err := c.takeSend(); err != nil {
			c.respondErr(f.Id, k, err)
			return
		}
	}
	if c.reply == nil && c.s.deps.Cluster != nil {
		// Cluster mode: a request about another shard's account or group
		// runs on that shard's owner.
		if fres, handled, ferr := c.s.deps.Cluster.Forward(ctx, c.addr, f); handled {
			if ferr != nil {
				c.respondErr(f.Id, "forward", ferr)
				return
			}
			fres.Id = f.Id
			c.s.metrics.requests.WithLabelValues("forward", "OK").Inc()
			c.respond(fres)
			return
		}
	}
	switch b := f.Body.(type) {
	case *wirepb.ClientFrame_UploadKeys:
		kind = "upload_keys"
		var n int
		if n, err = c.uploadKeys(ctx, b.UploadKeys); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_UploadKeys{UploadKeys: &wirepb.UploadKeysResult{OneTimePrekeys: uint32(n)}}}
		}
	case *wirepb.ClientFrame_KeyStatus:
		kind = "key_status"
		n, signed, e := c.s.deps.Prekeys.Count(ctx, c.addr)
		if err = e; err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_KeyStatus{KeyStatus: &wirepb.KeyStatusResult{OneTimePrekeys: uint32(n), HasSignedPrekey: signed}}}
		}
	case *wirepb.ClientFrame_ClaimBundles:
		kind = "claim_bundles"
		var r *wirepb.ClaimBundlesResult
		if r, err = c.claim(ctx, b.ClaimBundles); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_ClaimBundles{ClaimBundles: r}}
		}
	case *wirepb.ClientFrame_Send:
		kind = "send"
		start := time.Now()
		var r *wirepb.SendResult
		if r, err = c.send(ctx, b.Send); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_Send{Send: r}}
			defer func() { c.s.metrics.sendAck.Observe(time.Since(start).Seconds()) }()
		}
	case *wirepb.ClientFrame_Ack:
		kind = "ack"
		var r *wirepb.AckResult
		if r, err = c.ack(ctx, b.Ack); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_Ack{Ack: r}}
		} else if wire.CodeOf(err) != wirepb.ErrorCode_BAD_REQUEST {
			// The acked ids stay in flight and the window would shrink for
			// good: end the connection; the client reconnects and gets
			// everything unacked again.
			defer c.close(wire.CloseInternal, "ack failed")
		}
	case *wirepb.ClientFrame_PublishDeviceList:
		kind = "publish_device_list"
		var r *wirepb.PublishDeviceListResult
		if r, err = c.publishDeviceList(ctx, b.PublishDeviceList); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_PublishDeviceList{PublishDeviceList: r}}
		}
	case *wirepb.ClientFrame_GetDeviceList:
		kind = "get_device_list"
		var r *wirepb.GetDeviceListResult
		if r, err = c.getDeviceList(ctx, b.GetDeviceList); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_GetDeviceList{GetDeviceList: r}}
		}
	case *wirepb.ClientFrame_GetLink:
		kind = "get_link"
		var r *wirepb.GetLinkResult
		if r, err = c.getLink(ctx, b.GetLink); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_GetLink{GetLink: r}}
		}
	case *wirepb.ClientFrame_ApproveLink:
		kind = "approve_link"
		var r *wirepb.ApproveLinkResult
		if r, err = c.approveLink(ctx, b.ApproveLink); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_ApproveLink{ApproveLink: r}}
		}
	case *wirepb.ClientFrame_RemoveDevice:
		kind = "remove_device"
		var r *wirepb.RemoveDeviceResult
		if r, err = c.removeDevice(ctx, b.RemoveDevice); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_RemoveDevice{RemoveDevice: r}}
			if b.RemoveDevice.DeviceId == c.addr.Device {
				defer c.close(wire.CloseDeviceRemoved, "device removed") // after the response is queued
			}
		}
	case *wirepb.ClientFrame_SyncToDevice:
		kind = "sync_to_device"
		var r *wirepb.SendResult
		if r, err = c.syncToDevice(ctx, b.SyncToDevice); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_SyncToDevice{SyncToDevice: r}}
		}
	case *wirepb.ClientFrame_GroupCreate:
		kind = "group_create"
		var r *wirepb.GroupInfo
		if r, err = c.groupCreate(ctx, b.GroupCreate); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_Group{Group: r}}
		}
	case *wirepb.ClientFrame_GroupChange:
		kind = "group_change"
		var r *wirepb.GroupInfo
		if r, err = c.groupChange(ctx, b.GroupChange); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_Group{Group: r}}
		}
	case *wirepb.ClientFrame_GetGroup:
		kind = "get_group"
		var r *wirepb.GroupInfo
		if r, err = c.getGroup(ctx, b.GetGroup); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_Group{Group: r}}
		}
	case *wirepb.ClientFrame_ListGroups:
		kind = "list_groups"
		var r *wirepb.ListGroupsResult
		if r, err = c.listGroups(ctx, b.ListGroups); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_ListGroups{ListGroups: r}}
		}
	case *wirepb.ClientFrame_GroupSend:
		kind = "group_send"
		start := time.Now()
		var r *wirepb.SendResult
		if r, err = c.groupSend(ctx, b.GroupSend); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_GroupSend{GroupSend: r}}
			defer func() { c.s.metrics.groupSendAck.Observe(time.Since(start).Seconds()) }()
		}
	case *wirepb.ClientFrame_MarkRead:
		kind = "mark_read"
		if err = c.markRead(ctx, b.MarkRead); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_MarkRead{MarkRead: &wirepb.MarkReadResult{}}}
		}
	case *wirepb.ClientFrame_SetPush:
		kind = "set_push"
		if err = c.setPush(ctx, b.SetPush); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_SetPush{SetPush: &wirepb.SetPushResult{}}}
		}
	case *wirepb.ClientFrame_ClearPush:
		kind = "clear_push"
		if err = c.clearPush(ctx); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_ClearPush{ClearPush: &wirepb.ClearPushResult{}}}
		}
	case *wirepb.ClientFrame_GetPresence:
		kind = "get_presence"
		var r *wirepb.PresenceResult
		if r, err = c.getPresence(ctx, b.GetPresence); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_Presence{Presence: r}}
		}
	case *wirepb.ClientFrame_SubscribePresence:
		kind = "subscribe_presence"
		var r *wirepb.PresenceResult
		if r, err = c.subscribePresence(ctx, b.SubscribePresence); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_Presence{Presence: r}}
		}
	case *wirepb.ClientFrame_SetPresencePrivacy:
		kind = "set_presence_privacy"
		var r *wirepb.PresencePrivacy
		if r, err = c.setPresencePrivacy(ctx, b.SetPresencePrivacy); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_PresencePrivacy{PresencePrivacy: r}}
		}
	case *wirepb.ClientFrame_Typing:
		kind = "typing"
		if err = c.typing(ctx, b.Typing); err == nil {
			res = &wirepb.Response{Result: &wirepb.Response_Typing{Typing: &wirepb.TypingResult{}}}
		}
	default:
		kind, err = "unknown", wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "unknown request")
	}
	if err != nil {
		c.respondErr(f.Id, kind, err)
		return
	}
	res.Id = f.Id
	c.s.metrics.requests.WithLabelValues(kind, "OK").Inc()
	c.respond(res)
}

func (c *conn) claim(ctx context.Context, r *wirepb.ClaimBundles) (*wirepb.ClaimBundlesResult, error) {
	acct, err := c.s.deps.Accounts.Account(ctx, r.Username)
	if err != nil {
		return nil, err
	}
	regs := make(map[uint32]uint32, len(acct.Devices))
	for _, d := range acct.Devices {
		regs[d.Id] = d.RegistrationId
	}
	ids := r.DeviceIds
	if len(ids) == 0 {
		for _, d := range acct.Devices {
			ids = append(ids, d.Id)
		}
	}
	for _, id := range ids {
		if _, ok := regs[id]; !ok {
			return nil, wire.Errorf(wirepb.ErrorCode_UNKNOWN_DEVICE, "relay: %s has no device %d", r.Username, id)
		}
	}
	bundles, err := c.s.deps.Prekeys.Claim(ctx, c.addr, r.Username, ids)
	if err != nil {
		return nil, err
	}
	low := c.s.deps.Prekeys.LowThreshold()
	for _, b := range bundles {
		b.RegistrationId = regs[b.DeviceId]
		// Tell the claimed device to refill if it is running low: an event
		// if it is connected, else a wake-up push (it gets PrekeysLow at Auth).
		dev := wire.DeviceAddr{Account: r.Username, Device: b.DeviceId}
		other := c.s.hub.get(dev)
		if other == nil && c.s.deps.Push == nil {
			continue
		}
		n, _, err := c.s.deps.Prekeys.Count(ctx, dev)
		if err != nil || n >= low {
			continue
		}
		if other == nil {
			c.s.deps.Push.Wake(dev, push.ReasonPrekeys)
			continue
		}
		if fb, err := encodeEvent(&wirepb.Event{Body: &wirepb.Event_PrekeysLow{PrekeysLow: &wirepb.PrekeysLow{OneTimePrekeys: uint32(n)}}}); err == nil {
			_ = other.tryEnqueue(fb)
		}
	}
	return &wirepb.ClaimBundlesResult{Bundles: bundles}, nil
}

// conversationKey names a 1:1 conversation independently of direction.
func conversationKey(a, b string) string {
	if b < a {
		a, b = b, a
	}
	return "d:" + a + ":" + b
}

// send is the message path: validate, dedup, check the device sets, then
// one synced commit of every envelope before ✓ (invariants 1, 4, 5, 6).
func (c *conn) send(ctx context.Context, m *wirepb.Send) (*wirepb.SendResult, error) {
	cfg := &c.s.cfg
	if !wire.ValidClientMsgID(m.ClientMsgId) {
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: client_msg_id must be 1..64 printable ASCII bytes")
	}
	if err := device.ValidateUsername(m.To); err != nil {
		return nil, err
	}
	if len(m.Ciphertexts) == 0 {
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: a send needs at least one ciphertext")
	}
	if len(m.Ciphertexts) > cfg.MaxCiphertexts {
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: more than %d ciphertexts", cfg.MaxCiphertexts)
	}
	for _, ct := range m.Ciphertexts {
		if len(ct.Content) == 0 {
			return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: empty ciphertext for %s.%d", ct.Username, ct.DeviceId)
		}
		if len(ct.Content) > cfg.MaxMessageBytes {
			c.s.metrics.rejected.WithLabelValues("message_too_large").Inc()
			return nil, wire.Errorf(wirepb.ErrorCode_MESSAGE_TOO_LARGE, "relay: ciphertext of %d bytes is over the limit of %d", len(ct.Content), cfg.MaxMessageBytes)
		}
		if ct.Type != wirepb.EnvelopeType_SIGNAL_MESSAGE && ct.Type != wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE {
			return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: ciphertext type %v is not allowed in a 1:1 send", ct.Type)
		}
	}
	if prev, ok, err := c.s.deps.Inbox.Lookup(ctx, c.addr, m.ClientMsgId); err != nil {
		return nil, err
	} else if ok {
		return &wirepb.SendResult{Seq: prev.Seq, ServerTimeMs: prev.ServerTime.UnixMilli(), Duplicate: true}, nil
	}
	to, err := c.s.deps.Accounts.Account(ctx, m.To)
	if err != nil {
		return nil, err
	}
	self := to
	if m.To != c.addr.Account {
		if self, err = c.s.deps.Accounts.Account(ctx, c.addr.Account); err != nil {
			return nil, err
		}
	}
	if err := checkDevices(c.addr, to, self, m.Ciphertexts); err != nil {
		c.s.metrics.rejected.WithLabelValues("device_mismatch").Inc()
		return nil, err
	}
	entries := make([]inbox.Entry, len(m.Ciphertexts))
	for i, ct := range m.Ciphertexts {
		entries[i] = inbox.Entry{
			To: wire.DeviceAddr{Account: ct.Username, Device: ct.DeviceId},
			Env: &wirepb.Envelope{Sender: c.addr.Account, SenderDevice: c.addr.Device, To: m.To,
				Type: ct.Type, Content: ct.Content, ClientMsgId: m.ClientMsgId},
		}
	}
	acc, err := c.s.deps.Inbox.Append(ctx, inbox.Send{Sender: c.addr, ClientMsgID: m.ClientMsgId,
		Conversation: conversationKey(c.addr.Account, m.To), Entries: entries})
	if err != nil {
		return nil, err
	}
	return &wirepb.SendResult{Seq: acc.Seq, ServerTimeMs: acc.ServerTime.UnixMilli(), Duplicate: acc.Duplicate}, nil
}

// checkDevices compares a send's ciphertexts with the devices that must get
// one: every device of the recipient and every other device of the sender.
// Any difference rejects the whole send (invariant 6).
func checkDevices(sender wire.DeviceAddr, to, self *storepb.Account, cts []*wirepb.DeviceCiphertext) error {
	want := make(map[wire.DeviceAddr]uint32) // device -> registration id
	for _, acct := range []*storepb.Account{to, self} {
		for _, d := range acct.Devices {
			a := wire.DeviceAddr{Account: acct.Username, Device: d.Id}
			if a != sender {
				want[a] = d.RegistrationId
			}
		}
	}
	mm := &wirepb.DeviceMismatch{}
	seen := make(map[wire.DeviceAddr]bool, len(cts))
	for _, ct := range cts {
		a := wire.DeviceAddr{Account: ct.Username, Device: ct.DeviceId}
		if seen[a] {
			return wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: two ciphertexts for %s", a)
		}
		seen[a] = true
		reg, ok := want[a]
		switch {
		case !ok:
			mm.Extra = append(mm.Extra, a.Ref())
		case reg != ct.RegistrationId:
			mm.Stale = append(mm.Stale, a.Ref())
		}
	}
	for a := range want {
		if !seen[a] {
			mm.Missing = append(mm.Missing, a.Ref())
		}
	}
	if len(mm.Missing)+len(mm.Extra)+len(mm.Stale) == 0 {
		if len(want) == 0 {
			return wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: no device to deliver to")
		}
		return nil
	}
	for _, l := range [][]*wirepb.DeviceRef{mm.Missing, mm.Extra, mm.Stale} {
		sort.Slice(l, func(i, j int) bool {
			if l[i].Username != l[j].Username {
				return l[i].Username < l[j].Username
			}
			return l[i].DeviceId < l[j].DeviceId
		})
	}
	e := wire.Errorf(wirepb.ErrorCode_DEVICE_MISMATCH, "relay: device set mismatch: %d missing, %d extra, %d stale",
		len(mm.Missing), len(mm.Extra), len(mm.Stale))
	e.Mismatch = mm
	return e
}

// ack deletes acked envelopes and, in the same batch, leaves every device
// of each message's sender a DELIVERED marker ("delivered up to seq N" from
// this device, per conversation; see docs/protocol.md, "Receipts"). Each
// acked message's markers go under its own id, so only messages the ack
// actually deletes count; the inbox keeps one pending marker per (sender
// device, conversation, reader device), the highest. Receipts, group
// updates, sync copies of own sends and device-to-device syncs get none.
func (c *conn) ack(ctx context.Context, a *wirepb.Ack) (*wirepb.AckResult, error) {
	if len(a.EnvelopeIds) == 0 {
		return &wirepb.AckResult{}, nil
	}
	if len(a.EnvelopeIds) > 4*c.s.cfg.DeliveryWindow {
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: at most %d ids per ack", 4*c.s.cfg.DeliveryWindow)
	}
	follow := make(map[uint64][]inbox.Entry)
	senders := make(map[string][]*storepb.Device)
	for _, id := range a.EnvelopeIds {
		c.mu.Lock()
		d, ok := c.inflight[id]
		c.mu.Unlock()
		if !ok {
			env, err := c.s.deps.Inbox.Get(ctx, c.addr, id)
			if errors.Is(err, inbox.ErrNotFound) {
				continue
			}
			if err != nil {
				return nil, err
			}
			d = delivered{sender: env.Sender, senderDevice: env.SenderDevice, to: env.To, seq: env.Seq,
				clientMsgID: env.ClientMsgId, typ: env.Type, groupID: env.GroupId}
		}
		if !receiptable(d, c.addr.Account) {
			continue
		}
		devs, ok := senders[d.sender]
		if !ok && c.s.deps.Cluster != nil && !c.s.deps.Cluster.ServesAccount(d.sender) {
			// Cluster mode, a sender on another node: one marker for the
			// account (device 0), which its owner addresses to each of its
			// devices (route), instead of a read of its account from here.
			devs, ok = allDevices, true
			senders[d.sender] = devs
		}
		if !ok {
			acct, err := c.s.deps.Accounts.Account(ctx, d.sender)
			if err == nil {
				devs = acct.Devices
			} else if !errors.Is(err, device.ErrUnknownAccount) {
				return nil, err
			}
			senders[d.sender] = devs
		}
		conv := groupConversation(d.groupID)
		r := &wirepb.Receipt{Kind: wirepb.ReceiptKind_DELIVERED, Username: c.addr.Account,
			DeviceId: c.addr.Device, GroupId: d.groupID, Seq: d.seq}
		if d.groupID == "" {
			conv = conversationKey(d.sender, d.to)
			r.To = d.to
		}
		env := &wirepb.Envelope{Sender: c.addr.Account, SenderDevice: c.addr.Device, To: r.To,
			Type: wirepb.EnvelopeType_RECEIPT, Receipt: r}
		key := markerKey(wirepb.ReceiptKind_DELIVERED, conv, c.addr.String())
		for _, dv := range devs {
			follow[id] = append(follow[id], inbox.Entry{To: wire.DeviceAddr{Account: d.sender, Device: dv.Id}, Env: env, Coalesce: key})
		}
	}
	deleted, err := c.s.deps.Inbox.Ack(ctx, c.addr, a.EnvelopeIds, follow)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	for _, id := range a.EnvelopeIds {
		delete(c.inflight, id)
	}
	c.mu.Unlock()
	c.windowFreed()
	c.s.metrics.acked.Add(float64(len(deleted)))
	for _, id := range deleted {
		c.s.metrics.receipts.Add(float64(len(follow[id])))
	}
	return &wirepb.AckResult{Deleted: uint32(len(deleted))}, nil
}

// allDevices stands for "every device of the account" in a receipt marker
// for an account served by another node (device 0 is no device's id).
var allDevices = []*storepb.Device{{Id: 0}}

// receiptable reports whether acking d makes a DELIVERED marker for its
// sender: a 1:1 or group message from another account, with a seq.
func receiptable(d delivered, self string) bool {
	switch d.typ {
	case wirepb.EnvelopeType_SIGNAL_MESSAGE, wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE, wirepb.EnvelopeType_SENDER_KEY_MESSAGE:
	default:
		return false // receipts and group updates
	}
	return d.sender != "" && d.sender != self && d.seq > 0 // not sync copies or device-to-device syncs
}

// markerKey is the coalescing key of a receipt marker: its kind, the
// conversation ("d:a:b" or "g:" + group id) and the reader (a device for
// DELIVERED, an account for READ). Usernames and group ids never contain '|'.
func markerKey(kind wirepb.ReceiptKind, conv, reader string) string {
	return kind.String() + "|" + conv + "|" + reader
}

// markRead leaves READ markers ("read up to seq N" by this account, marked
// on this device) for the other side of a conversation and for this
// account's other devices: 1:1, every device of the peer; group, every
// device of every other member. One pending marker per (device,
// conversation, reader account) is kept, the highest.
func (c *conn) markRead(ctx context.Context, m *wirepb.MarkRead) error {
	if (m.Peer == "") == (m.GroupId == "") {
		return wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: mark_read names exactly one of peer and group_id")
	}
	if m.Seq == 0 {
		return wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: mark_read needs a seq")
	}
	r := &wirepb.Receipt{Kind: wirepb.ReceiptKind_READ, Username: c.addr.Account, DeviceId: c.addr.Device,
		To: m.Peer, GroupId: m.GroupId, Seq: m.Seq}
	var conv string
	var to []wire.DeviceAddr
	if m.GroupId != "" {
		if _, err := group.ParseID(m.GroupId); err != nil {
			return err
		}
		g, err := c.memberGroup(ctx, m.GroupId)
		if err != nil {
			return err
		}
		info, err := c.s.groupInfo(ctx, g)
		if err != nil {
			return err
		}
		conv = groupConversation(m.GroupId)
		to = memberDevices(info) // the other members' and this account's devices
	} else {
		if err := device.ValidateUsername(m.Peer); err != nil {
			return err
		}
		conv = conversationKey(c.addr.Account, m.Peer)
		for _, name := range []string{m.Peer, c.addr.Account} {
			acct, err := c.s.deps.Accounts.Account(ctx, name)
			if err != nil {
				return err
			}
			for _, d := range acct.Devices {
				to = append(to, wire.DeviceAddr{Account: name, Device: d.Id})
			}
		}
	}
	env := &wirepb.Envelope{Sender: c.addr.Account, SenderDevice: c.addr.Device, To: m.Peer,
		Type: wirepb.EnvelopeType_RECEIPT, Receipt: r}
	key := markerKey(wirepb.ReceiptKind_READ, conv, c.addr.Account)
	seen := make(map[wire.DeviceAddr]bool, len(to))
	var es []inbox.Entry
	for _, d := range to {
		if d == c.addr || seen[d] {
			continue
		}
		seen[d] = true
		es = append(es, inbox.Entry{To: d, Env: env, Coalesce: key})
	}
	n, err := c.s.deps.Inbox.AppendMarkers(ctx, es)
	if err != nil {
		return err
	}
	c.s.metrics.receipts.Add(float64(n))
	return nil
}

func encodeEvent(e *wirepb.Event) ([]byte, error) {
	return wire.Encode(&wirepb.ServerFrame{Body: &wirepb.ServerFrame_Event{Event: e}})
}
