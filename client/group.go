package client

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// ErrUnknownGroup: no group of that name or id on this device.
var ErrUnknownGroup = errors.New("client: no such group here")

// isGroupID reports whether s looks like a server group id.
func isGroupID(s string) bool {
	if len(s) != 32 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

// resolveGroup finds a group by name or id: locally first, then among the
// groups the server says this account is in.
func (c *Client) resolveGroup(ctx context.Context, conn *Conn, nameOrID string) (*wirepb.GroupInfo, error) {
	if g, err := c.localGroup(ctx, nameOrID); err != nil || g != nil {
		return g, err
	}
	r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ListGroups{ListGroups: &wirepb.ListGroups{}}})
	if err != nil {
		return nil, fmt.Errorf("client: list groups: %w", err)
	}
	for _, g := range r.GetListGroups().GetGroups() {
		if err := c.st.SaveGroup(ctx, g); err != nil {
			return nil, err
		}
	}
	if g, err := c.localGroup(ctx, nameOrID); err != nil || g != nil {
		return g, err
	}
	return nil, fmt.Errorf("%w: %q", ErrUnknownGroup, nameOrID)
}

func (c *Client) localGroup(ctx context.Context, nameOrID string) (*wirepb.GroupInfo, error) {
	if isGroupID(nameOrID) {
		g, ok, err := c.st.Group(ctx, nameOrID)
		if err != nil || ok {
			return g, err
		}
	}
	g, ok, err := c.st.GroupByName(ctx, nameOrID)
	if err != nil || !ok {
		return nil, err
	}
	return g, nil
}

// GroupName is the display name of a group id known here ("" if unknown).
func (c *Client) GroupName(ctx context.Context, id string) string {
	g, ok, err := c.st.Group(ctx, id)
	if err != nil || !ok {
		return ""
	}
	return g.Name
}

// CreateGroup creates a group with this account as its first admin.
func (c *Client) CreateGroup(ctx context.Context, name string, members []string) (*wirepb.GroupInfo, error) {
	conn, err := c.connect(ctx, true)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GroupCreate{GroupCreate: &wirepb.GroupCreate{Name: name, Members: members}}})
	if err != nil {
		return nil, fmt.Errorf("client: create group: %w", err)
	}
	g := r.GetGroup()
	return g, c.st.SaveGroup(ctx, g)
}

// ChangeGroup adds, removes, promotes or demotes members, or leaves.
func (c *Client) ChangeGroup(ctx context.Context, nameOrID string, op wirepb.GroupChange_Op, members []string) (*wirepb.GroupInfo, error) {
	conn, err := c.connect(ctx, true)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	g, err := c.resolveGroup(ctx, conn, nameOrID)
	if err != nil {
		return nil, err
	}
	r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GroupChange{GroupChange: &wirepb.GroupChange{
		GroupId: g.GroupId, Op: op, Members: members}}})
	if err != nil {
		return nil, fmt.Errorf("client: change group %s: %w", g.Name, err)
	}
	ng := r.GetGroup()
	if op == wirepb.GroupChange_LEAVE {
		return ng, c.st.DeleteGroup(ctx, g.GroupId)
	}
	return ng, c.st.SaveGroup(ctx, ng)
}

// GroupInfo fetches a group's current membership from the server.
func (c *Client) GroupInfo(ctx context.Context, nameOrID string) (*wirepb.GroupInfo, error) {
	conn, err := c.connect(ctx, true)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return c.fetchGroup(ctx, conn, nameOrID)
}

func (c *Client) fetchGroup(ctx context.Context, conn *Conn, nameOrID string) (*wirepb.GroupInfo, error) {
	g, err := c.resolveGroup(ctx, conn, nameOrID)
	if err != nil {
		return nil, err
	}
	r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GetGroup{GetGroup: &wirepb.GetGroup{GroupId: g.GroupId}}})
	if err != nil {
		return nil, fmt.Errorf("client: group %s: %w", g.Name, err)
	}
	g = r.GetGroup()
	return g, c.st.SaveGroup(ctx, g)
}

// SendGroup sends text to every other device of every member: one
// sender-key ciphertext, after making sure every member device holds this
// device's current sender key. Retries (stale membership, network) reuse
// one client message id.
func (c *Client) SendGroup(ctx context.Context, nameOrID, text string) (Sent, error) {
	if c.username == "" {
		return Sent{}, ErrNotRegistered
	}
	id := NewMessageID()
	conn, err := c.connect(ctx, true)
	if err != nil {
		return Sent{}, err
	}
	defer func() { conn.Close() }()
	g, err := c.fetchGroup(ctx, conn, nameOrID)
	if err != nil {
		return Sent{}, err
	}
	me := wire.DeviceAddr{Account: c.username, Device: c.deviceID}
	bo := c.opts.Backoff
	for rounds := 0; ; rounds++ {
		if err := c.distributeSenderKey(ctx, conn, g); err != nil {
			return Sent{}, err
		}
		ct, err := c.dev.GroupEncrypt(ctx, g.GroupId, &wirepb.Content{Text: text, SentTimeMs: time.Now().UnixMilli()})
		if err != nil {
			return Sent{}, err
		}
		r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GroupSend{GroupSend: &wirepb.GroupSend{
			ClientMsgId: id, GroupId: g.GroupId, MembershipVersion: g.Version, ViewHash: wire.GroupViewHash(g, me),
			Type: wirepb.EnvelopeType_SENDER_KEY_MESSAGE, Content: ct}}})
		if err == nil {
			res := r.GetGroupSend()
			s := Sent{To: g.Name, Seq: res.Seq, ServerTime: time.UnixMilli(res.ServerTimeMs), ClientMsgID: id, Duplicate: res.Duplicate}
			_, err = c.st.AddOutgoing(ctx, localstore.Message{Group: g.GroupId, Outgoing: true, Sender: c.username,
				SenderDevice: c.deviceID, Seq: s.Seq, ServerTime: s.ServerTime, Text: text, ClientMsgID: id})
			return s, err
		}
		var we *wire.Error
		if errors.As(err, &we) && we.Code == wirepb.ErrorCode_GROUP_STALE && we.Group != nil && rounds < maxMismatchRounds {
			g = we.Group
			if err := c.st.SaveGroup(ctx, g); err != nil {
				return Sent{}, err
			}
			continue
		}
		if ctx.Err() != nil || !retryable(err) || rounds >= maxMismatchRounds {
			return Sent{}, err
		}
		if errors.Is(err, ErrClosed) || conn.Err() != nil {
			conn.Close()
			if conn, err = c.connect(ctx, true); err != nil {
				return Sent{}, err
			}
		}
		if bo.Wait(ctx) != nil {
			return Sent{}, ctx.Err()
		}
	}
}

// distributeSenderKey sends this device's sender key for g, pairwise, to
// every member device that does not have it yet. If a device that had it is
// no longer in the group, the key is rotated first and sent to everyone
// again, so a removed member cannot read what comes next.
func (c *Client) distributeSenderKey(ctx context.Context, conn *Conn, g *wirepb.GroupInfo) error {
	want := map[string]wire.DeviceAddr{}
	for _, m := range g.Members {
		for _, d := range m.Devices {
			a := wire.DeviceAddr{Account: m.Username, Device: d.DeviceId}
			if a.Account == c.username && a.Device == c.deviceID {
				continue
			}
			want[a.String()] = a
		}
	}
	had, err := c.st.Distributed(ctx, g.GroupId) // g is saved by the caller (fetchGroup, GROUP_STALE)
	if err != nil {
		return err
	}
	for _, h := range had {
		if _, ok := want[h]; !ok {
			if err := c.dev.RotateSenderKey(ctx, g.GroupId); err != nil {
				return err
			}
			had = nil
			break
		}
	}
	// Always make sure this device has a sender key for g (first use, or
	// just rotated): GroupEncrypt does not create one.
	skdm, err := c.dev.SenderKeyDistribution(ctx, g.GroupId)
	if err != nil {
		return err
	}
	var todo []wire.DeviceAddr
	for k, a := range want {
		if !slices.Contains(had, k) {
			todo = append(todo, a)
		}
	}
	if len(todo) == 0 {
		return nil
	}
	content := &wirepb.Content{SenderKey: &wirepb.SenderKeyDistribution{GroupId: g.GroupId, Message: skdm}, SentTimeMs: time.Now().UnixMilli()}
	var done []string
	for _, a := range todo {
		has, err := c.dev.HasSession(ctx, a.Account, a.Device)
		if err != nil {
			return err
		}
		if !has {
			if err := c.claim(ctx, conn, a.Account, []uint32{a.Device}); err != nil {
				return err
			}
		}
		ct, err := c.dev.Encrypt(ctx, a.Account, a.Device, content)
		if err != nil {
			return fmt.Errorf("client: sender key for %s: %w", a, err)
		}
		user := a.Account
		if user == c.username {
			user = ""
		}
		if _, err := doPaced(ctx, conn, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_SyncToDevice{SyncToDevice: &wirepb.SyncToDevice{
			Username: user, ClientMsgId: NewMessageID(), DeviceId: a.Device, RegistrationId: ct.RegistrationId,
			Type: ct.Type, Content: ct.Content}}}); err != nil {
			return fmt.Errorf("client: sender key to %s: %w", a, err)
		}
		done = append(done, a.String())
	}
	return c.st.MarkDistributed(ctx, g.GroupId, done)
}

// GroupHistory is the local history of a group.
func (c *Client) GroupHistory(ctx context.Context, nameOrID string) ([]localstore.Message, error) {
	g, err := c.localGroup(ctx, nameOrID)
	if err != nil {
		return nil, err
	}
	if g == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownGroup, nameOrID)
	}
	return c.st.History(ctx, "", g.GroupId)
}

// MarkRead tells the other side (and this account's other devices) that
// the conversation with peer, or the group, is read up to its newest
// message here. It returns that seq (0: nothing to mark).
func (c *Client) MarkRead(ctx context.Context, nameOrPeer string, group bool) (uint64, error) {
	conn, err := c.connect(ctx, true)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	m := &wirepb.MarkRead{Peer: nameOrPeer}
	var h []localstore.Message
	if group {
		g, err := c.resolveGroup(ctx, conn, nameOrPeer)
		if err != nil {
			return 0, err
		}
		m = &wirepb.MarkRead{GroupId: g.GroupId}
		h, err = c.st.History(ctx, "", g.GroupId)
		if err != nil {
			return 0, err
		}
	} else if h, err = c.st.History(ctx, nameOrPeer, ""); err != nil {
		return 0, err
	}
	for _, x := range h {
		m.Seq = max(m.Seq, x.Seq)
	}
	if m.Seq == 0 {
		return 0, nil
	}
	if _, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_MarkRead{MarkRead: m}}); err != nil {
		return 0, fmt.Errorf("client: mark read: %w", err)
	}
	return m.Seq, nil
}

// HasGroup reports whether a group of that name or id is known here.
func (c *Client) HasGroup(ctx context.Context, nameOrID string) bool {
	g, err := c.localGroup(ctx, nameOrID)
	return err == nil && g != nil
}
