package relay

// Presence and typing (issue 5; docs/protocol.md, "Presence and typing").
// Both stay off the message path (invariant 8): nothing here touches the
// inbox, every push is a non-blocking tryEnqueue that is dropped (and
// counted) when the connection's queue is full, and only the last-seen time
// and the privacy setting are stored (package presence).

import (
	"context"
	"time"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/presence"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// SetPresenceBridge makes the tracker answer and push the presence of
// accounts of other cluster nodes through b, and publish this node's
// (cluster mode; call before serving).
func (s *Server) SetPresenceBridge(b *presence.Bridge) { s.presence.SetBridge(b) }

// deviceConnected and deviceDisconnected tell the cluster's device
// registry (asynchronously) that a receiving connection of dev is here /
// ended; nothing on one node.
func (s *Server) deviceConnected(dev wire.DeviceAddr) {
	if s.deps.Cluster != nil {
		s.deps.Cluster.DeviceConnected(dev)
	}
}

func (s *Server) deviceDisconnected(dev wire.DeviceAddr) {
	if s.deps.Cluster != nil {
		s.deps.Cluster.DeviceDisconnected(dev)
	}
}

// conn is a presence.Subscriber.
var _ presence.Subscriber = (*conn)(nil)

// Viewer implements presence.Subscriber.
func (c *conn) Viewer() string { return c.addr.Account }

// Deliver implements presence.Subscriber: queue the event if there is room.
func (c *conn) Deliver(info *wirepb.PresenceInfo) bool {
	b, err := encodeEvent(&wirepb.Event{Body: &wirepb.Event_Presence{Presence: info}})
	if err != nil {
		return false
	}
	return c.tryEnqueue(b)
}

func (c *conn) getPresence(ctx context.Context, m *wirepb.GetPresence) (*wirepb.PresenceResult, error) {
	infos, err := c.s.presence.Get(ctx, c.addr.Account, m.Usernames)
	if err != nil {
		return nil, err
	}
	return &wirepb.PresenceResult{Presence: infos}, nil
}

func (c *conn) subscribePresence(ctx context.Context, m *wirepb.SubscribePresence) (*wirepb.PresenceResult, error) {
	infos, err := c.s.presence.Subscribe(ctx, c, m.Usernames)
	if err != nil {
		return nil, err
	}
	return &wirepb.PresenceResult{Presence: infos}, nil
}

func (c *conn) setPresencePrivacy(ctx context.Context, m *wirepb.SetPresencePrivacy) (*wirepb.PresencePrivacy, error) {
	if m.Visibility == wirepb.PresenceVisibility_VISIBILITY_UNSPECIFIED {
		if len(m.Allow) > 0 {
			return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: an allowlist needs visibility ALLOWLIST")
		}
		return c.s.presence.Privacy(ctx, c.addr.Account)
	}
	p, err := presence.NormalizePrivacy(m.Visibility, m.Allow)
	if err != nil {
		return nil, err
	}
	if err := c.s.presence.SetPrivacy(ctx, c.addr.Account, p); err != nil {
		return nil, err
	}
	return p, nil
}

// typing forwards a typing indicator to the other side's devices that are
// connected now. Nothing is stored; a full queue drops it.
func (c *conn) typing(ctx context.Context, m *wirepb.Typing) error {
	if (m.Peer == "") == (m.GroupId == "") {
		return wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: typing names exactly one of peer and group_id")
	}
	if d := c.s.typingLim.Take(c.addr, time.Now()); d > 0 && c.reply == nil {
		c.s.metrics.rejected.WithLabelValues("typing_rate").Inc()
		return rateLimited("typing indicators", d)
	}
	var to []wire.DeviceAddr
	if m.GroupId != "" {
		if _, err := group.ParseID(m.GroupId); err != nil {
			return err
		}
		g, err := c.memberGroup(ctx, m.GroupId)
		if err != nil {
			return err
		}
		for _, name := range g.Members {
			if name.Username == c.addr.Account {
				continue
			}
			acct, err := c.s.deps.Accounts.Account(ctx, name.Username)
			if err != nil {
				continue // a member without an account gets nothing
			}
			for _, d := range acct.Devices {
				to = append(to, wire.DeviceAddr{Account: name.Username, Device: d.Id})
			}
		}
	} else {
		if err := device.ValidateUsername(m.Peer); err != nil {
			return err
		}
		if m.Peer == c.addr.Account {
			return wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: typing to yourself")
		}
		acct, err := c.s.deps.Accounts.Account(ctx, m.Peer)
		if err != nil {
			return err
		}
		for _, d := range acct.Devices {
			to = append(to, wire.DeviceAddr{Account: m.Peer, Device: d.Id})
		}
	}
	b, err := encodeEvent(&wirepb.Event{Body: &wirepb.Event_Typing{Typing: &wirepb.TypingEvent{
		Username: c.addr.Account, DeviceId: c.addr.Device, GroupId: m.GroupId, Typing: m.Typing,
		TtlMs: uint32(c.s.cfg.TypingTTL.Milliseconds())}}})
	if err != nil {
		return err
	}
	var elsewhere []wire.DeviceAddr
	for _, d := range to {
		if other := c.s.hub.get(d); other != nil {
			if other.tryEnqueue(b) {
				c.s.metrics.typing.WithLabelValues("queued").Inc()
			} else {
				c.s.metrics.typing.WithLabelValues("dropped").Inc()
			}
		} else if c.s.deps.Cluster != nil && !c.s.deps.Cluster.ServesAccount(d.Account) {
			elsewhere = append(elsewhere, d)
		}
	}
	if len(elsewhere) > 0 {
		c.s.deps.Cluster.Deliver(ctx, elsewhere, b)
	}
	return nil
}
