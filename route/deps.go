package route

import (
	"context"
	"encoding/hex"
	"maps"
	"sort"
	"sync"
	"time"

	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/relay"
	"github.com/ferryhq/ferry/route/routepb"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Locals are this node's own stores (and relay, for forwarded requests):
// what calls from other nodes are served from, and what the routed stores
// use for the shards this node owns.
type Locals struct {
	Accounts relay.Accounts
	Prekeys  relay.Prekeys
	Inbox    relay.Inbox
	Groups   relay.Groups
}

// Deps returns the relay's stores in cluster mode: each call goes to the
// owner of the shard it is about, and local ones run under the shard's
// fence.
func (r *Router) Deps(l Locals) (relay.Accounts, relay.Prekeys, relay.Inbox, relay.Groups) {
	r.locals = l
	return &accounts{r, l.Accounts}, &prekeys{r, l.Prekeys}, &routedInbox{r, l.Inbox}, &groups{r, l.Groups}
}

// Accounts returns the routed form of the local account store alone (the
// group store needs it before Deps can be called).
func (r *Router) Accounts(local relay.Accounts) relay.Accounts { return &accounts{r, local} }

// AcceptGroupID is group.Options.AcceptID for cluster mode: a group lives
// on its creator's shard, so creating one is local.
func (r *Router) AcceptGroupID(creator string, id [group.IDSize]byte) bool {
	return r.smap.Group(id) == r.smap.Account(creator)
}

// guarded runs fn, a local store call for shard, under Router.guard.
func guarded[T any](r *Router, shard cluster.ShardID, fn func() (T, error)) (v T, err error) {
	err = r.guard(shard, func() (err error) {
		v, err = fn()
		return err
	})
	return v, err
}

// ---------------------------------------------------------------- accounts

type accounts struct {
	r     *Router
	local relay.Accounts
}

func (a *accounts) Register(ctx context.Context, username string, signingKey []byte, registrationID uint32) (*storepb.Device, error) {
	return guarded(a.r, a.r.Account(username), func() (*storepb.Device, error) { return a.local.Register(ctx, username, signingKey, registrationID) })
}

// Account reads any account, from its owner.
func (a *accounts) Account(ctx context.Context, username string) (*storepb.Account, error) {
	shard := a.r.Account(username)
	if a.r.Local(shard) {
		return guarded(a.r, shard, func() (*storepb.Account, error) { return a.local.Account(ctx, username) })
	}
	rep, err := a.r.call(ctx, "account", &routepb.Call{Shard: uint32(shard),
		Body: &routepb.Call_Account{Account: &routepb.AccountCall{Username: username}}})
	if err != nil {
		return nil, err
	}
	acct := rep.GetAccount()
	if acct == nil {
		return nil, unavailable(ErrCall, "route: account reply without an account")
	}
	return acct, nil
}

func (a *accounts) Device(ctx context.Context, addr wire.DeviceAddr) (*storepb.Device, error) {
	return guarded(a.r, a.r.Account(addr.Account), func() (*storepb.Device, error) { return a.local.Device(ctx, addr) })
}

func (a *accounts) AddDevice(ctx context.Context, username string, signingKey []byte, registrationID uint32) (*storepb.Device, error) {
	return guarded(a.r, a.r.Account(username), func() (*storepb.Device, error) { return a.local.AddDevice(ctx, username, signingKey, registrationID) })
}

func (a *accounts) RemoveDevice(ctx context.Context, addr wire.DeviceAddr) error {
	return a.r.guard(a.r.Account(addr.Account), func() error { return a.local.RemoveDevice(ctx, addr) })
}

// DeviceList is served on the account's owner (GetDeviceList is forwarded
// there by the relay).
func (a *accounts) DeviceList(ctx context.Context, username string) (l *wirepb.SignedDeviceList, v uint64, err error) {
	err = a.r.guard(a.r.Account(username), func() (err error) {
		l, v, err = a.local.DeviceList(ctx, username)
		return err
	})
	return l, v, err
}

func (a *accounts) PublishDeviceList(ctx context.Context, username string, signed *wirepb.SignedDeviceList, primaryIdentity []byte) ([]uint32, error) {
	return guarded(a.r, a.r.Account(username), func() ([]uint32, error) { return a.local.PublishDeviceList(ctx, username, signed, primaryIdentity) })
}

// ---------------------------------------------------------------- prekeys

// prekeys are always the local device's or, for claims, served on the
// claimed account's owner (ClaimBundles is forwarded there).
type prekeys struct {
	r     *Router
	local relay.Prekeys
}

func (p *prekeys) Upload(ctx context.Context, dev wire.DeviceAddr, up *wirepb.UploadKeys) (int, error) {
	return guarded(p.r, p.r.Account(dev.Account), func() (int, error) { return p.local.Upload(ctx, dev, up) })
}

func (p *prekeys) Claim(ctx context.Context, requester wire.DeviceAddr, account string, deviceIDs []uint32) ([]*wirepb.PreKeyBundle, error) {
	return guarded(p.r, p.r.Account(account), func() ([]*wirepb.PreKeyBundle, error) { return p.local.Claim(ctx, requester, account, deviceIDs) })
}

func (p *prekeys) Count(ctx context.Context, dev wire.DeviceAddr) (n int, signed bool, err error) {
	err = p.r.guard(p.r.Account(dev.Account), func() (err error) {
		n, signed, err = p.local.Count(ctx, dev)
		return err
	})
	return n, signed, err
}

func (p *prekeys) LowThreshold() int { return p.local.LowThreshold() }

func (p *prekeys) IdentityKey(ctx context.Context, dev wire.DeviceAddr) ([]byte, error) {
	return guarded(p.r, p.r.Account(dev.Account), func() ([]byte, error) { return p.local.IdentityKey(ctx, dev) })
}

func (p *prekeys) DeleteDevice(ctx context.Context, dev wire.DeviceAddr) error {
	return p.r.guard(p.r.Account(dev.Account), func() error { return p.local.DeleteDevice(ctx, dev) })
}

// ---------------------------------------------------------------- groups

type groups struct {
	r     *Router
	local relay.Groups
}

func (g *groups) CreateWith(ctx context.Context, creator, name string, members []string, commit group.CommitFunc) (*storepb.Group, error) {
	// AcceptGroupID puts the group on the creator's shard.
	return guarded(g.r, g.r.Account(creator), func() (*storepb.Group, error) {
		return g.local.CreateWith(ctx, creator, name, members, commit)
	})
}

func (g *groups) shard(id string) (cluster.ShardID, error) {
	gid, err := group.ParseID(id)
	if err != nil {
		return 0, err
	}
	return g.r.Group(gid), nil
}

func (g *groups) Get(ctx context.Context, id string) (*storepb.Group, error) {
	shard, err := g.shard(id)
	if err != nil {
		return nil, err
	}
	return guarded(g.r, shard, func() (*storepb.Group, error) { return g.local.Get(ctx, id) })
}

func (g *groups) ChangeWith(ctx context.Context, requester, id string, op wirepb.GroupChange_Op, members []string, commit group.CommitFunc) (group.Change, error) {
	shard, err := g.shard(id)
	if err != nil {
		return group.Change{}, err
	}
	return guarded(g.r, shard, func() (group.Change, error) {
		return g.local.ChangeWith(ctx, requester, id, op, members, commit)
	})
}

// ListFor asks every node: a user's groups live on their creators' shards.
func (g *groups) ListFor(ctx context.Context, username string) ([]*storepb.Group, error) {
	out, err := g.r.localGroups(ctx, g.local, username)
	if err != nil {
		return nil, err
	}
	nodes, err := g.r.node.Registry().Nodes(ctx)
	if err != nil {
		return nil, unavailable(err, "route: the cluster cannot be reached")
	}
	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		firstErr error
	)
	for _, n := range nodes {
		if !n.Alive || n.ID == g.r.self || n.Advertise == "" {
			continue
		}
		wg.Add(1)
		go func(adv string) {
			defer wg.Done()
			body, err := marshalCall(g.r.self, &routepb.Call{Body: &routepb.Call_ListGroups{ListGroups: &routepb.ListGroupsCall{Username: username}}})
			var rep *routepb.Reply
			if err == nil {
				rep, err = g.r.post(ctx, "list_groups", adv, body)
			}
			if err == nil && rep.GetError() != nil {
				err = wire.FromProto(rep.GetError())
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			out = append(out, rep.GetListGroups().GetGroups()...)
		}(n.Advertise)
	}
	wg.Wait()
	if firstErr != nil {
		return nil, unavailable(firstErr, "route: a node did not answer for the group list")
	}
	sort.Slice(out, func(i, j int) bool { return string(out[i].Id) < string(out[j].Id) })
	return out, nil
}

// localGroups are the groups of username that this node serves.
func (r *Router) localGroups(ctx context.Context, l relay.Groups, username string) ([]*storepb.Group, error) {
	all, err := l.ListFor(ctx, username)
	if err != nil {
		return nil, err
	}
	out := all[:0]
	for _, g := range all {
		if len(g.Id) == group.IDSize && r.Local(r.Group([group.IDSize]byte(g.Id))) {
			out = append(out, g)
		}
	}
	return out, nil
}

// ---------------------------------------------------------------- inbox

type routedInbox struct {
	r     *Router
	local relay.Inbox
}

// convShard returns the shard that owns a conversation's sequence counter
// (store.ConversationOwner: a 1:1 "d:A:B" is the lower name's, "g:<hex
// id>" the group's) and an account of that shard to keep dedup records
// under: the lower name, or the group's GroupDedupAccount.
func (r *Router) convShard(conv string) (shard cluster.ShardID, anchor string, ok bool) {
	o, ok := store.ConversationOwner(conv)
	switch {
	case !ok:
		return 0, "", false
	case o.Group != "":
		id := [group.IDSize]byte([]byte(o.Group))
		return r.Group(id), GroupDedupAccount(id), true
	}
	return r.Account(o.Account), o.Account, true
}

// GroupDedupAccount is the pseudo-account a group's dedup records are kept
// under on the group's shard ("#<hex id>": no username can be it), so they
// move with the group (ShardFilter).
func GroupDedupAccount(id [group.IDSize]byte) string { return "#" + hex.EncodeToString(id[:]) }

// partDedup is the DedupAccount of a part on shard s that is not the seal:
// an account of s, the sender's own on the sender's shard (a key apart
// from the seal's, which is the sender device's). Without a client message
// id it does not matter: nothing is deduplicated.
func partDedup(sender string, senderShard, s cluster.ShardID, account string) string {
	if s == senderShard {
		return sender
	}
	return account
}

func (ib *routedInbox) Append(ctx context.Context, m inbox.Send) (inbox.Accepted, error) {
	r := ib.r
	parts := make(map[cluster.ShardID][]inbox.Entry)
	for _, e := range m.Entries {
		s := r.Account(e.To.Account)
		parts[s] = append(parts[s], e)
	}
	c, anchor, hasConv := r.convShard(m.Conversation)
	if m.Conversation != "" && !hasConv {
		return inbox.Accepted{}, wire.Errorf(wirepb.ErrorCode_INTERNAL, "route: conversation key %q has no owner", m.Conversation)
	}
	// With a client message id, the sender's shard stores its part last
	// and keeps the sender device's own dedup record there (the "seal"):
	// that record then means every part is stored, so Lookup can answer a
	// retry with the original result before anything is checked again.
	// Every other part deduplicates under an account of its own shard.
	sealed := m.ClientMsgID != ""
	S := r.Account(m.Sender.Account)
	if oneShard(parts, S, c, hasConv) {
		// One shard, the sender's: one commit holds every entry, the
		// sequence and the sender's own dedup record, as on one node. The
		// choice depends on shards only, never on which node serves them,
		// so a retry after a move takes the same path and finds the same
		// dedup records.
		return ib.appendPart(ctx, S, m)
	}
	var sealEntries []inbox.Entry
	if sealed && (!hasConv || c != S) {
		sealEntries = parts[S]
		delete(parts, S)
	}
	var acc inbox.Accepted
	if hasConv {
		// The conversation's owner first: it allocates the sequence number
		// (or, for a retry, returns the original one).
		es := parts[c]
		delete(parts, c)
		var err error
		acc, err = ib.appendPart(ctx, c, inbox.Send{Sender: m.Sender, ClientMsgID: m.ClientMsgID,
			Conversation: m.Conversation, Entries: es, DedupAccount: partDedup(m.Sender.Account, S, c, anchor)})
		if err != nil {
			return inbox.Accepted{}, err
		}
	}
	var mu sync.Mutex
	seq := acc.Seq
	err := eachPart(ctx, parts, func(ctx context.Context, s cluster.ShardID, es []inbox.Entry) error {
		a, err := ib.appendPart(ctx, s, inbox.Send{Sender: m.Sender, ClientMsgID: m.ClientMsgID, Seq: seq,
			Entries: es, DedupAccount: partDedup(m.Sender.Account, S, s, es[0].To.Account)})
		if !hasConv && err == nil {
			mu.Lock()
			acc = a // no sequence: any part's time will do
			mu.Unlock()
		}
		return err
	})
	if err != nil || !sealed {
		return acc, err
	}
	a, err := ib.appendPart(ctx, S, inbox.Send{Sender: m.Sender, ClientMsgID: m.ClientMsgID, Seq: seq, Entries: sealEntries})
	if err != nil {
		return inbox.Accepted{}, err
	}
	if !hasConv {
		acc = a
	}
	return acc, nil
}

// oneShard reports whether every part, and the conversation (if any), is
// on the sender's shard.
func oneShard[T any](parts map[cluster.ShardID][]T, sender, conv cluster.ShardID, hasConv bool) bool {
	if hasConv && conv != sender {
		return false
	}
	for p := range parts {
		if p != sender {
			return false
		}
	}
	return true
}

// eachPart runs fn for every shard's part concurrently and returns the
// first error (after all have finished: a part is never abandoned midway).
func eachPart[T any](ctx context.Context, parts map[cluster.ShardID][]T, fn func(context.Context, cluster.ShardID, []T) error) error {
	if len(parts) == 1 {
		for s, es := range parts {
			return fn(ctx, s, es)
		}
	}
	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		firstErr error
	)
	for s, es := range parts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(ctx, s, es); err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return firstErr
}

func (ib *routedInbox) appendPart(ctx context.Context, shard cluster.ShardID, m inbox.Send) (inbox.Accepted, error) {
	if ib.r.Local(shard) {
		return guarded(ib.r, shard, func() (inbox.Accepted, error) { return ib.local.Append(ctx, m) })
	}
	call := &routepb.AppendCall{Sender: m.Sender.Account, SenderDevice: m.Sender.Device, ClientMsgId: m.ClientMsgID,
		DedupAccount: m.DedupAccount, Conversation: m.Conversation, Seq: m.Seq, Entries: entriesPB(m.Entries)}
	rep, err := ib.r.call(ctx, "append", &routepb.Call{Shard: uint32(shard), Body: &routepb.Call_Append{Append: call}})
	if err != nil {
		return inbox.Accepted{}, err
	}
	return acceptedOf(rep.GetAccepted()), nil
}

func (ib *routedInbox) AppendGroup(ctx context.Context, m inbox.GroupAppend) (inbox.Accepted, error) {
	r := ib.r
	parts := make(map[cluster.ShardID][]wire.DeviceAddr)
	for _, d := range m.Recipients {
		s := r.Account(d.Account)
		parts[s] = append(parts[s], d)
	}
	key := m.Conversation
	if key == "" {
		key = m.Order
	}
	c, anchor, ok := r.convShard(key)
	if !ok {
		return inbox.Accepted{}, wire.Errorf(wirepb.ErrorCode_INTERNAL, "route: group append without a group conversation")
	}
	// A client's message ends with the seal on the sender's shard, as in
	// Append: its own dedup record, written after every other part.
	sealed := m.ClientMsgID != ""
	S := r.Account(m.Sender.Account)
	if oneShard(parts, S, c, true) {
		// One shard, the sender's and the group's: one commit, as on one
		// node (by shards only, as in Append).
		if len(m.Also) > 0 && !r.Local(c) {
			return inbox.Accepted{}, unavailable(ErrNotOwner, "route: group %s is not served by this node", key)
		}
		return ib.appendGroupPart(ctx, c, m)
	}
	var sealTo []wire.DeviceAddr
	if sealed && c != S {
		sealTo = parts[S]
		delete(parts, S)
	}
	// The group's owner first, with the membership writes (Also): it
	// allocates the sequence number and holds the dedup record.
	first := m
	first.Recipients = parts[c]
	first.DedupAccount = anchor // the group's, on its shard
	delete(parts, c)
	if len(m.Also) > 0 && !r.Local(c) {
		return inbox.Accepted{}, unavailable(ErrNotOwner, "route: group %s is not served by this node", key)
	}
	acc, err := ib.appendGroupPart(ctx, c, first)
	if err != nil {
		return inbox.Accepted{}, err
	}
	rest := m
	rest.Conversation, rest.Seq, rest.Also = "", acc.Seq, nil
	// The other parts keep the group's order key: without a conversation
	// the inbox would have none, and a small part could be handed out
	// ahead of a large one still queued for fan-out on the same node.
	rest.Order = key
	send := func(ctx context.Context, s cluster.ShardID, to []wire.DeviceAddr) error {
		p := rest
		p.Recipients = to
		p.DedupAccount = partDedup(m.Sender.Account, S, s, to[0].Account)
		_, err := ib.appendGroupPart(ctx, s, p)
		return err
	}
	if sealed {
		// A client's message: a failed part fails the send, and the
		// client's retry (same id) redoes only what is missing; the seal
		// goes last.
		if err := eachPart(ctx, parts, send); err != nil {
			return inbox.Accepted{}, err
		}
		p := rest
		p.Recipients, p.DedupAccount = sealTo, ""
		if _, err := ib.appendGroupPart(ctx, S, p); err != nil {
			return inbox.Accepted{}, err
		}
		return acc, nil
	}
	// A server-made update (membership change) is committed on the
	// group's owner already: deliver the other parts with retries
	// rather than fail a change that happened.
	err = eachPart(ctx, parts, func(ctx context.Context, s cluster.ShardID, to []wire.DeviceAddr) error {
		var err error
		for attempt := 0; attempt < 5; attempt++ {
			if err = send(ctx, s, to); err == nil {
				return nil
			}
			select {
			case <-ctx.Done():
				return err
			case <-time.After(time.Duration(100<<attempt) * time.Millisecond):
			}
		}
		return err
	})
	if err != nil {
		r.log.Error("route: group update not delivered to every shard", "group", key, "err", err)
	}
	return acc, nil
}

func (ib *routedInbox) appendGroupPart(ctx context.Context, shard cluster.ShardID, m inbox.GroupAppend) (inbox.Accepted, error) {
	if ib.r.Local(shard) {
		return guarded(ib.r, shard, func() (inbox.Accepted, error) { return ib.local.AppendGroup(ctx, m) })
	}
	call := &routepb.AppendGroupCall{Sender: m.Sender.Account, SenderDevice: m.Sender.Device, ClientMsgId: m.ClientMsgID,
		DedupAccount: m.DedupAccount, Conversation: m.Conversation, Seq: m.Seq, Env: m.Env, Body: m.Body,
		NoQuota: m.NoQuota, Order: m.Order}
	for _, d := range m.Recipients {
		call.Recipients = append(call.Recipients, &wirepb.DeviceRef{Username: d.Account, DeviceId: d.Device})
	}
	rep, err := ib.r.call(ctx, "append_group", &routepb.Call{Shard: uint32(shard), Body: &routepb.Call_AppendGroup{AppendGroup: call}})
	if err != nil {
		return inbox.Accepted{}, err
	}
	return acceptedOf(rep.GetAccepted()), nil
}

// Lookup finds the sender device's own dedup record, which in cluster mode
// is the seal a send writes on the sender's shard after every other part
// (Append): found means the whole send is stored. It is on this node when
// the sender's socket is (the relay's Send, SyncToDevice to an own device);
// for a sender on another node (a forwarded request) it answers "not
// found", and the parts deduplicate themselves (Forward checks the seal on
// the sender's node first).
func (ib *routedInbox) Lookup(ctx context.Context, sender wire.DeviceAddr, clientMsgID string) (acc inbox.Accepted, ok bool, err error) {
	shard := ib.r.Account(sender.Account)
	if !ib.r.Local(shard) {
		return inbox.Accepted{}, false, nil
	}
	err = ib.r.guard(shard, func() (err error) {
		acc, ok, err = ib.local.Lookup(ctx, sender, clientMsgID)
		return err
	})
	return acc, ok, err
}

func (ib *routedInbox) Range(ctx context.Context, dev wire.DeviceAddr, after uint64, limit int) ([]inbox.Item, error) {
	return guarded(ib.r, ib.r.Account(dev.Account), func() ([]inbox.Item, error) { return ib.local.Range(ctx, dev, after, limit) })
}

func (ib *routedInbox) RangeRaw(ctx context.Context, dev wire.DeviceAddr, after uint64, limit int) ([]inbox.Item, error) {
	return guarded(ib.r, ib.r.Account(dev.Account), func() ([]inbox.Item, error) { return ib.local.RangeRaw(ctx, dev, after, limit) })
}

func (ib *routedInbox) Get(ctx context.Context, dev wire.DeviceAddr, id uint64) (*wirepb.Envelope, error) {
	return guarded(ib.r, ib.r.Account(dev.Account), func() (*wirepb.Envelope, error) { return ib.local.Get(ctx, dev, id) })
}

// Ack deletes locally; the receipt markers it leaves for senders on other
// shards are stored on their owners first (markers keep the highest
// sequence, so one stored twice after a failed ack is harmless).
func (ib *routedInbox) Ack(ctx context.Context, dev wire.DeviceAddr, ids []uint64, follow map[uint64][]inbox.Entry) ([]uint64, error) {
	shard := ib.r.Account(dev.Account)
	var remote []inbox.Entry
	local, copied := follow, false
	for id, es := range follow {
		var keep []inbox.Entry
		for _, e := range es {
			if ib.r.Account(e.To.Account) == shard {
				keep = append(keep, e)
			} else {
				remote = append(remote, e)
			}
		}
		if len(keep) == len(es) {
			continue
		}
		if !copied {
			local, copied = maps.Clone(follow), true
		}
		if len(keep) == 0 {
			delete(local, id)
		} else {
			local[id] = keep
		}
	}
	if len(remote) > 0 {
		if _, err := ib.AppendMarkers(ctx, remote); err != nil {
			return nil, err
		}
	}
	return guarded(ib.r, shard, func() ([]uint64, error) { return ib.local.Ack(ctx, dev, ids, local) })
}

func (ib *routedInbox) AppendMarkers(ctx context.Context, entries []inbox.Entry) (int, error) {
	parts := make(map[cluster.ShardID][]inbox.Entry)
	for _, e := range entries {
		s := ib.r.Account(e.To.Account)
		parts[s] = append(parts[s], e)
	}
	var (
		mu    sync.Mutex
		total int
	)
	err := eachPart(ctx, parts, func(ctx context.Context, s cluster.ShardID, es []inbox.Entry) error {
		var n int
		var err error
		if ib.r.Local(s) {
			err = ib.r.guard(s, func() (err error) {
				if es, err = ib.r.expandAccounts(ctx, ib.r.locals.Accounts, es); err != nil {
					return err
				}
				n, err = ib.local.AppendMarkers(ctx, es)
				return err
			})
		} else {
			var rep *routepb.Reply
			rep, err = ib.r.call(ctx, "markers", &routepb.Call{Shard: uint32(s),
				Body: &routepb.Call_Markers{Markers: &routepb.MarkersCall{Entries: entriesPB(es)}}})
			n = int(rep.GetMarkers().GetStored())
		}
		mu.Lock()
		total += n
		mu.Unlock()
		return err
	})
	return total, err
}

func (ib *routedInbox) DeleteDevice(ctx context.Context, dev wire.DeviceAddr) error {
	return ib.r.guard(ib.r.Account(dev.Account), func() error { return ib.local.DeleteDevice(ctx, dev) })
}

// ---------------------------------------------------------------- conversions

func entriesPB(es []inbox.Entry) []*routepb.Entry {
	out := make([]*routepb.Entry, len(es))
	for i, e := range es {
		out[i] = &routepb.Entry{Username: e.To.Account, DeviceId: e.To.Device, Env: e.Env, Coalesce: e.Coalesce}
	}
	return out
}

func entriesOf(es []*routepb.Entry) []inbox.Entry {
	out := make([]inbox.Entry, len(es))
	for i, e := range es {
		out[i] = inbox.Entry{To: wire.DeviceAddr{Account: e.Username, Device: e.DeviceId}, Env: e.Env, Coalesce: e.Coalesce}
	}
	return out
}

func acceptedOf(a *routepb.Accepted) inbox.Accepted {
	return inbox.Accepted{Seq: a.GetSeq(), ServerTime: time.UnixMilli(a.GetServerTimeMs()), Duplicate: a.GetDuplicate()}
}

func acceptedPB(a inbox.Accepted) *routepb.Accepted {
	return &routepb.Accepted{Seq: a.Seq, ServerTimeMs: a.ServerTime.UnixMilli(), Duplicate: a.Duplicate}
}
