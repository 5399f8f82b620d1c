package relay

// Groups (issue 4; the rules are in docs/protocol.md, "Groups").
//
// The group store keeps membership; this file adds what needs the other
// stores: GroupInfo device lists (derived from the accounts each time, never
// stored), GROUP_UPDATE envelopes after every change, and GroupSend, which
// checks the sender's view of the membership and stores the sender-key
// ciphertext once for every other member device (inbox.AppendGroup).
//
// State kept here: striped per-group read-write locks. A change holds its
// group's lock exclusively while its membership write and GROUP_UPDATE
// commit (one batch); a send holds it shared from the view check
// until its commit. So every inbox sees a group's messages and updates in
// the order of the membership they were checked against, and a send
// checked against version v is never stored after the update to v+1
// (within one process; in cluster mode a group needs one owner).

import (
	"bytes"
	"context"
	"hash/maphash"
	"sync"

	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// groupLocks are the striped per-group locks.
type groupLocks struct {
	seed  maphash.Seed
	locks [64]sync.RWMutex
}

func newGroupLocks() *groupLocks { return &groupLocks{seed: maphash.MakeSeed()} }

func (l *groupLocks) get(id string) *sync.RWMutex {
	return &l.locks[maphash.String(l.seed, id)%uint64(len(l.locks))]
}

// groupConversation is the sequence counter of a group's messages.
func groupConversation(id string) string { return "g:" + id }

// groupInfo is g in the wire form with every member's current devices and
// registration ids (ascending device id, as the account keeps them).
func (s *Server) groupInfo(ctx context.Context, g *storepb.Group) (*wirepb.GroupInfo, error) {
	info := group.Info(g)
	for _, m := range info.Members {
		acct, err := s.deps.Accounts.Account(ctx, m.Username)
		if wire.CodeOf(err) == wirepb.ErrorCode_UNKNOWN_ACCOUNT {
			continue // accounts are never deleted today; a member without one has no devices
		}
		if err != nil {
			return nil, err
		}
		for _, d := range acct.Devices {
			m.Devices = append(m.Devices, &wirepb.GroupDevice{DeviceId: d.Id, RegistrationId: d.RegistrationId})
		}
	}
	return info, nil
}

// memberDevices returns every device of info's members.
func memberDevices(info *wirepb.GroupInfo) []wire.DeviceAddr {
	var out []wire.DeviceAddr
	for _, m := range info.Members {
		for _, d := range m.Devices {
			out = append(out, wire.DeviceAddr{Account: m.Username, Device: d.DeviceId})
		}
	}
	return out
}

// announce stores a GROUP_UPDATE with info for every device of its members
// and of the removed accounts (so they learn they are out), in one synced
// commit together with also (the membership change itself, so a crash
// cannot keep the change and lose its notice). It skips quotas: a
// membership change must reach everyone.
func (c *conn) announce(ctx context.Context, info *wirepb.GroupInfo, removed []string, also []store.Write) error {
	to := memberDevices(info)
	for _, name := range removed {
		acct, err := c.s.deps.Accounts.Account(ctx, name)
		if wire.CodeOf(err) == wirepb.ErrorCode_UNKNOWN_ACCOUNT {
			continue
		}
		if err != nil {
			return err
		}
		for _, d := range acct.Devices {
			to = append(to, wire.DeviceAddr{Account: name, Device: d.Id})
		}
	}
	if len(to) == 0 && len(also) == 0 {
		return nil
	}
	_, err := c.s.deps.Inbox.AppendGroup(ctx, inbox.GroupAppend{
		Sender: c.addr,
		Env: &wirepb.Envelope{Sender: c.addr.Account, SenderDevice: c.addr.Device, GroupId: info.GroupId,
			Type: wirepb.EnvelopeType_GROUP_UPDATE, Group: info},
		Recipients: to,
		NoQuota:    true,
		Order:      groupConversation(info.GroupId), // not ahead of messages queued before it
		Also:       also,
	})
	if err == nil {
		c.s.metrics.groupUpdates.Add(float64(len(to)))
	}
	return err
}

// announcer is the group store's commit for a change: the membership
// writes go into the GROUP_UPDATE's batch. It keeps the GroupInfo it
// announced in *info.
func (c *conn) announcer(info **wirepb.GroupInfo) group.CommitFunc {
	return func(ctx context.Context, g *storepb.Group, removed []string, writes []store.Write) error {
		i, err := c.s.groupInfo(ctx, g)
		if err != nil {
			return err
		}
		*info = i
		return c.announce(ctx, i, removed, writes)
	}
}

func (c *conn) groupCreate(ctx context.Context, m *wirepb.GroupCreate) (*wirepb.GroupInfo, error) {
	// No lock: nobody can send to or change the group before its id is
	// announced, which is this commit.
	var info *wirepb.GroupInfo
	g, err := c.s.deps.Groups.CreateWith(ctx, c.addr.Account, m.Name, m.Members, c.announcer(&info))
	if err != nil {
		return nil, err
	}
	c.s.log.Info("relay: group created", "group", group.FormatID(g.Id)[:8], "members", len(g.Members))
	return info, nil
}

// groupChange applies a change and announces the membership after it, in
// one commit. If the change was a no-op (a retry of a change that was
// made), the current membership is announced again: a client that did not
// get the first answer cannot tell, and the notice costs little.
func (c *conn) groupChange(ctx context.Context, m *wirepb.GroupChange) (*wirepb.GroupInfo, error) {
	if _, err := group.ParseID(m.GroupId); err != nil {
		return nil, err
	}
	mu := c.s.groups.get(m.GroupId)
	mu.Lock()
	defer mu.Unlock()
	var info *wirepb.GroupInfo
	ch, err := c.s.deps.Groups.ChangeWith(ctx, c.addr.Account, m.GroupId, m.Op, m.Members, c.announcer(&info))
	if err != nil {
		return nil, err
	}
	if !ch.Changed {
		if info, err = c.s.groupInfo(ctx, ch.Group); err != nil {
			return nil, err
		}
		if err := c.announce(ctx, info, nil, nil); err != nil {
			return nil, err
		}
		return info, nil
	}
	c.s.log.Info("relay: group changed", "group", m.GroupId[:8], "op", m.Op.String(), "version", ch.Group.Version)
	return info, nil
}

// memberGroup returns group id if the requester is a member, else
// UNKNOWN_GROUP (a group is not revealed to non-members).
func (c *conn) memberGroup(ctx context.Context, id string) (*storepb.Group, error) {
	g, err := c.s.deps.Groups.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	if group.Member(g, c.addr.Account) == nil {
		return nil, wire.Errorf(wirepb.ErrorCode_UNKNOWN_GROUP, "relay: no such group")
	}
	return g, nil
}

func (c *conn) getGroup(ctx context.Context, m *wirepb.GetGroup) (*wirepb.GroupInfo, error) {
	g, err := c.memberGroup(ctx, m.GroupId)
	if err != nil {
		return nil, err
	}
	return c.s.groupInfo(ctx, g)
}

func (c *conn) listGroups(ctx context.Context, _ *wirepb.ListGroups) (*wirepb.ListGroupsResult, error) {
	gs, err := c.s.deps.Groups.ListFor(ctx, c.addr.Account)
	if err != nil {
		return nil, err
	}
	r := &wirepb.ListGroupsResult{}
	for _, g := range gs {
		info, err := c.s.groupInfo(ctx, g)
		if err != nil {
			return nil, err
		}
		r.Groups = append(r.Groups, info)
	}
	return r, nil
}

// groupSend stores one sender-key ciphertext for every member device but
// the sending one, after checking that the sender encrypted for the current
// membership and device set (GROUP_STALE with the current GroupInfo if not).
func (c *conn) groupSend(ctx context.Context, m *wirepb.GroupSend) (*wirepb.SendResult, error) {
	cfg := &c.s.cfg
	switch {
	case !wire.ValidClientMsgID(m.ClientMsgId):
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: client_msg_id must be 1..64 printable ASCII bytes")
	case m.Type != wirepb.EnvelopeType_SENDER_KEY_MESSAGE:
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: a group send carries a SENDER_KEY_MESSAGE, not %v", m.Type)
	case len(m.Content) == 0:
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: empty ciphertext")
	case len(m.Content) > cfg.MaxMessageBytes:
		c.s.metrics.rejected.WithLabelValues("message_too_large").Inc()
		return nil, wire.Errorf(wirepb.ErrorCode_MESSAGE_TOO_LARGE, "relay: ciphertext of %d bytes is over the limit of %d", len(m.Content), cfg.MaxMessageBytes)
	}
	if _, err := group.ParseID(m.GroupId); err != nil {
		return nil, err
	}
	deps := &c.s.deps
	if prev, ok, err := deps.Inbox.Lookup(ctx, c.addr, m.ClientMsgId); err != nil {
		return nil, err
	} else if ok {
		return &wirepb.SendResult{Seq: prev.Seq, ServerTimeMs: prev.ServerTime.UnixMilli(), Duplicate: true}, nil
	}
	mu := c.s.groups.get(m.GroupId)
	mu.RLock()
	defer mu.RUnlock()
	g, err := c.memberGroup(ctx, m.GroupId)
	if err != nil {
		return nil, err
	}
	info, err := c.s.groupInfo(ctx, g)
	if err != nil {
		return nil, err
	}
	if m.MembershipVersion != info.Version || !bytes.Equal(m.ViewHash, wire.GroupViewHash(info, c.addr)) {
		c.s.metrics.rejected.WithLabelValues("group_stale").Inc()
		e := wire.Errorf(wirepb.ErrorCode_GROUP_STALE, "relay: the group is at version %d; its device set may have changed too", info.Version)
		e.Group = info
		return nil, e
	}
	var to []wire.DeviceAddr
	for _, d := range memberDevices(info) {
		if d != c.addr {
			to = append(to, d)
		}
	}
	acc, err := deps.Inbox.AppendGroup(ctx, inbox.GroupAppend{
		Sender: c.addr, ClientMsgID: m.ClientMsgId, Conversation: groupConversation(m.GroupId),
		Env: &wirepb.Envelope{Sender: c.addr.Account, SenderDevice: c.addr.Device, GroupId: m.GroupId,
			Type: m.Type, ClientMsgId: m.ClientMsgId},
		Body:       m.Content,
		Recipients: to,
	})
	if err != nil {
		return nil, err
	}
	if !acc.Duplicate {
		c.s.metrics.groupFanout.Observe(float64(len(to)))
	}
	return &wirepb.SendResult{Seq: acc.Seq, ServerTimeMs: acc.ServerTime.UnixMilli(), Duplicate: acc.Duplicate}, nil
}
