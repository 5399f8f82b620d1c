package route

import (
	"context"
	"errors"
	"io"
	"net/http"
	"time"

	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/relay"
	"github.com/ferryhq/ferry/route/routepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// callTimeout bounds the work of one served call.
const callTimeout = 30 * time.Second

func marshalCall(from string, c *routepb.Call) ([]byte, error) {
	c.FromNode = from
	return proto.Marshal(c)
}

// SetRelay gives the router the relay that forwarded requests and events
// run on (the relay is built over the router's stores, so after them).
// If a presence bridge was made (NewPresenceBridge), the relay's tracker
// uses it from now on.
func (r *Router) SetRelay(srv *relay.Server) {
	if b := r.bridge.Load(); b != nil {
		srv.SetPresenceBridge(b)
	}
	r.srv.Store(srv)
}

// Handler serves node-to-node calls at Path.
func (r *Router) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method != http.MethodPost {
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		if err := checkTime(req.Header.Get(AuthHeader), time.Now()); err != nil {
			r.m.calls.WithLabelValues("served", "unauthenticated").Inc()
			http.Error(w, "unauthenticated", http.StatusUnauthorized)
			return
		}
		body, err := io.ReadAll(io.LimitReader(req.Body, maxCallBytes+1))
		if err != nil {
			http.Error(w, "read failed", http.StatusBadRequest)
			return
		}
		if len(body) > maxCallBytes {
			http.Error(w, "call too large", http.StatusRequestEntityTooLarge)
			return
		}
		if err := verify(r.cfg.Secret, body, req.Header.Get(AuthHeader), time.Now()); err != nil {
			r.m.calls.WithLabelValues("served", "unauthenticated").Inc()
			r.log.Warn("route: refused a node call", "remote", req.RemoteAddr, "err", err)
			http.Error(w, "unauthenticated", http.StatusUnauthorized)
			return
		}
		c := &routepb.Call{}
		if err := proto.Unmarshal(body, c); err != nil {
			http.Error(w, "bad call", http.StatusBadRequest)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		rep := r.serve(ctx, c)
		out, err := proto.Marshal(rep)
		if err != nil {
			http.Error(w, "encode reply", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	})
}

// errReply turns err into a reply; errors other than wire errors are
// logged and answered INTERNAL.
func (r *Router) errReply(err error) *routepb.Reply {
	var we *wire.Error
	if errors.As(err, &we) {
		out := *we
		if we.Code == wirepb.ErrorCode_INTERNAL || we.Code == wirepb.ErrorCode_UNAVAILABLE {
			r.log.Warn("route: call failed", "code", we.Code.String(), "err", err)
		} else {
			out.Message = err.Error()
		}
		return &routepb.Reply{Error: out.Proto()}
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return &routepb.Reply{Error: wire.Errorf(wirepb.ErrorCode_UNAVAILABLE, "call timed out").Proto()}
	}
	r.log.Error("route: call failed", "err", err)
	return &routepb.Reply{Error: wire.Errorf(wirepb.ErrorCode_INTERNAL, "internal error").Proto()}
}

func badCall(format string, args ...any) *routepb.Reply {
	return &routepb.Reply{Error: wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "route: "+format, args...).Proto()}
}

// wrongNode is the refusal of a call for a shard this node does not serve.
func wrongNode(shard cluster.ShardID) *routepb.Reply {
	return &routepb.Reply{Error: wire.Errorf(wirepb.ErrorCode_WRONG_NODE, "route: shard %d is not served here", shard).Proto()}
}

func (r *Router) serve(ctx context.Context, c *routepb.Call) *routepb.Reply {
	shard := cluster.ShardID(c.Shard)
	switch c.Body.(type) {
	case *routepb.Call_ListGroups, *routepb.Call_Import:
	default:
		if !r.Local(shard) {
			return wrongNode(shard)
		}
	}
	l := r.locals
	var rep *routepb.Reply
	err := func() error {
		switch b := c.Body.(type) {
		case *routepb.Call_Account:
			if r.Account(b.Account.Username) != shard {
				rep = badCall("account not on shard %d", shard)
				return nil
			}
			return r.guard(shard, func() error {
				acct, err := l.Accounts.Account(ctx, b.Account.Username)
				rep = &routepb.Reply{Result: &routepb.Reply_Account{Account: acct}}
				return err
			})
		case *routepb.Call_Append:
			a := b.Append
			es := entriesOf(a.Entries)
			for _, e := range es {
				if r.Account(e.To.Account) != shard || e.Env == nil {
					rep = badCall("entry not on shard %d", shard)
					return nil
				}
			}
			return r.guard(shard, func() error {
				acc, err := l.Inbox.Append(ctx, inbox.Send{Sender: wire.DeviceAddr{Account: a.Sender, Device: a.SenderDevice},
					ClientMsgID: a.ClientMsgId, DedupAccount: a.DedupAccount, Conversation: a.Conversation, Seq: a.Seq, Entries: es})
				rep = &routepb.Reply{Result: &routepb.Reply_Accepted{Accepted: acceptedPB(acc)}}
				return err
			})
		case *routepb.Call_AppendGroup:
			a := b.AppendGroup
			m := inbox.GroupAppend{Sender: wire.DeviceAddr{Account: a.Sender, Device: a.SenderDevice},
				ClientMsgID: a.ClientMsgId, DedupAccount: a.DedupAccount, Conversation: a.Conversation, Seq: a.Seq,
				Env: a.Env, Body: a.Body, NoQuota: a.NoQuota, Order: a.Order}
			for _, d := range a.Recipients {
				if r.Account(d.Username) != shard {
					rep = badCall("recipient not on shard %d", shard)
					return nil
				}
				m.Recipients = append(m.Recipients, wire.DeviceAddr{Account: d.Username, Device: d.DeviceId})
			}
			return r.guard(shard, func() error {
				acc, err := l.Inbox.AppendGroup(ctx, m)
				rep = &routepb.Reply{Result: &routepb.Reply_Accepted{Accepted: acceptedPB(acc)}}
				return err
			})
		case *routepb.Call_Markers:
			es := entriesOf(b.Markers.Entries)
			for _, e := range es {
				if r.Account(e.To.Account) != shard || e.Env == nil {
					rep = badCall("marker not on shard %d", shard)
					return nil
				}
			}
			return r.guard(shard, func() error {
				es, err := r.expandAccounts(ctx, l.Accounts, es)
				if err != nil {
					return err
				}
				n, err := l.Inbox.AppendMarkers(ctx, es)
				rep = &routepb.Reply{Result: &routepb.Reply_Markers{Markers: &routepb.MarkersResult{Stored: uint32(n)}}}
				return err
			})
		case *routepb.Call_Forward:
			srv := r.srv.Load()
			if srv == nil {
				return unavailable(ErrNotOwner, "route: node starting")
			}
			f := &wirepb.ClientFrame{}
			if err := proto.Unmarshal(b.Forward.Frame, f); err != nil {
				rep = badCall("forwarded frame does not decode")
				return nil
			}
			if s, ok := r.frameShard(f); !ok || s != shard {
				rep = badCall("forwarded frame not for shard %d", shard)
				return nil
			}
			return r.guard(shard, func() error {
				res := srv.ServeAs(ctx, wire.DeviceAddr{Account: b.Forward.Username, Device: b.Forward.DeviceId}, f)
				out, err := proto.Marshal(res)
				rep = &routepb.Reply{Result: &routepb.Reply_Response{Response: out}}
				return err
			})
		case *routepb.Call_ListGroups:
			gs, err := r.localGroups(ctx, l.Groups, b.ListGroups.Username)
			rep = &routepb.Reply{Result: &routepb.Reply_ListGroups{ListGroups: &routepb.ListGroupsResult{Groups: gs}}}
			return err
		case *routepb.Call_Event:
			srv := r.srv.Load()
			if srv == nil {
				return unavailable(ErrNotOwner, "route: node starting")
			}
			devs := make([]wire.DeviceAddr, 0, len(b.Event.Devices))
			for _, d := range b.Event.Devices {
				devs = append(devs, wire.DeviceAddr{Account: d.Username, Device: d.DeviceId})
			}
			n := srv.DeliverLocal(devs, b.Event.Event)
			rep = &routepb.Reply{Result: &routepb.Reply_Event{Event: &routepb.EventResult{Queued: uint32(n)}}}
			return nil
		case *routepb.Call_Move:
			mctx, cancel := context.WithTimeout(context.Background(), moveTimeout)
			defer cancel()
			res, err := r.moveOut(mctx, shard, b.Move.TargetNode)
			rep = &routepb.Reply{Result: &routepb.Reply_Move{Move: res}}
			return err
		case *routepb.Call_Import:
			mctx, cancel := context.WithTimeout(context.Background(), moveTimeout)
			defer cancel()
			res, err := r.importShard(mctx, shard, b.Import.Records)
			rep = &routepb.Reply{Result: &routepb.Reply_Move{Move: res}}
			return err
		}
		rep = badCall("unknown call")
		return nil
	}()
	if err != nil {
		return r.errReply(err)
	}
	return rep
}

// ---------------------------------------------------------------- relay.Cluster

var _ relay.Cluster = (*Router)(nil)

// Home implements relay.Cluster: "" if this node serves account, else the
// URL of the node that does.
func (r *Router) Home(ctx context.Context, account string) (string, error) {
	node, url, err := r.Owner(ctx, r.Account(account))
	if err != nil {
		return "", err
	}
	if node == r.self {
		return "", nil
	}
	return url, nil
}

// frameShard is the shard a request is about when it is about another
// account or a group: those run on that shard's owner.
func (r *Router) frameShard(f *wirepb.ClientFrame) (cluster.ShardID, bool) {
	groupShard := func(id string) (cluster.ShardID, bool) {
		gid, err := group.ParseID(id)
		if err != nil {
			return 0, false
		}
		return r.Group(gid), true
	}
	switch b := f.Body.(type) {
	case *wirepb.ClientFrame_ClaimBundles:
		return r.Account(b.ClaimBundles.Username), true
	case *wirepb.ClientFrame_GetDeviceList:
		return r.Account(b.GetDeviceList.Username), true
	case *wirepb.ClientFrame_SyncToDevice:
		if b.SyncToDevice.Username != "" { // another account's device (sender keys)
			return r.Account(b.SyncToDevice.Username), true
		}
	case *wirepb.ClientFrame_GetGroup:
		return groupShard(b.GetGroup.GroupId)
	case *wirepb.ClientFrame_GroupChange:
		return groupShard(b.GroupChange.GroupId)
	case *wirepb.ClientFrame_GroupSend:
		return groupShard(b.GroupSend.GroupId)
	case *wirepb.ClientFrame_MarkRead:
		if b.MarkRead.GroupId != "" {
			return groupShard(b.MarkRead.GroupId)
		}
	case *wirepb.ClientFrame_Typing:
		if b.Typing.GroupId != "" {
			return groupShard(b.Typing.GroupId)
		}
		if b.Typing.Peer != "" {
			return r.Account(b.Typing.Peer), true
		}
	}
	return 0, false
}

// Forward implements relay.Cluster: a request about another shard runs on
// its owner, as dev.
func (r *Router) Forward(ctx context.Context, dev wire.DeviceAddr, f *wirepb.ClientFrame) (*wirepb.Response, bool, error) {
	shard, ok := r.frameShard(f)
	if !ok || r.Local(shard) {
		return nil, false, nil
	}
	if res, ok, err := r.sealed(ctx, dev, f); err != nil || ok {
		return res, true, err
	}
	frame, err := proto.Marshal(f)
	if err != nil {
		return nil, true, err
	}
	rep, err := r.call(ctx, "forward", &routepb.Call{Shard: uint32(shard), Body: &routepb.Call_Forward{Forward: &routepb.ForwardCall{
		Username: dev.Account, DeviceId: dev.Device, Frame: frame}}})
	if err != nil {
		return nil, true, err
	}
	res := &wirepb.Response{}
	if err := proto.Unmarshal(rep.GetResponse(), res); err != nil {
		return nil, true, unavailable(ErrCall, "route: forwarded response does not decode")
	}
	return res, true, nil
}

// Deliver implements relay.Cluster: events (typing) for devices on other
// nodes, best-effort, one call per shard.
func (r *Router) Deliver(ctx context.Context, devs []wire.DeviceAddr, event []byte) {
	parts := make(map[cluster.ShardID][]*wirepb.DeviceRef)
	for _, d := range devs {
		s := r.Account(d.Account)
		if r.Local(s) {
			continue
		}
		parts[s] = append(parts[s], &wirepb.DeviceRef{Username: d.Account, DeviceId: d.Device})
	}
	_ = eachPart(ctx, parts, func(ctx context.Context, s cluster.ShardID, to []*wirepb.DeviceRef) error {
		_, err := r.call(ctx, "event", &routepb.Call{Shard: uint32(s), Body: &routepb.Call_Event{Event: &routepb.EventCall{Devices: to, Event: event}}})
		return err
	})
}

// ServesAccount reports whether this node serves account now (the relay
// closes the sockets of accounts whose shard it lost).
func (r *Router) ServesAccount(account string) bool { return r.Local(r.Account(account)) }

// expandAccounts replaces each marker for device 0 ("every device of the
// account", from a node that does not serve the account) by one marker per
// device of the account as stored here; an unknown account gets none.
func (r *Router) expandAccounts(ctx context.Context, accounts relay.Accounts, es []inbox.Entry) ([]inbox.Entry, error) {
	var out []inbox.Entry
	for i, e := range es {
		if e.To.Device != 0 {
			if out != nil {
				out = append(out, e)
			}
			continue
		}
		if out == nil {
			out = append(make([]inbox.Entry, 0, len(es)+4), es[:i]...)
		}
		acct, err := accounts.Account(ctx, e.To.Account)
		if wire.CodeOf(err) == wirepb.ErrorCode_UNKNOWN_ACCOUNT {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, d := range acct.Devices {
			x := e
			x.To.Device = d.Id
			out = append(out, x)
		}
	}
	if out == nil {
		return es, nil
	}
	return out, nil
}

// sealed answers a forwarded send (GroupSend, SyncToDevice to another
// account) that is a retry of one stored before: its seal, the sender
// device's dedup record, is on the sender's shard, here (see Append), so
// the original result is returned without running the send again.
func (r *Router) sealed(ctx context.Context, dev wire.DeviceAddr, f *wirepb.ClientFrame) (*wirepb.Response, bool, error) {
	var id string
	switch b := f.Body.(type) {
	case *wirepb.ClientFrame_GroupSend:
		id = b.GroupSend.ClientMsgId
	case *wirepb.ClientFrame_SyncToDevice:
		id = b.SyncToDevice.ClientMsgId
	}
	shard := r.Account(dev.Account)
	if id == "" || r.locals.Inbox == nil || !r.Local(shard) {
		return nil, false, nil
	}
	var acc inbox.Accepted
	var found bool
	err := r.guard(shard, func() (err error) {
		acc, found, err = r.locals.Inbox.Lookup(ctx, dev, id)
		return err
	})
	if err != nil || !found {
		return nil, false, err
	}
	sr := &wirepb.SendResult{Seq: acc.Seq, ServerTimeMs: acc.ServerTime.UnixMilli(), Duplicate: true}
	if _, ok := f.Body.(*wirepb.ClientFrame_GroupSend); ok {
		return &wirepb.Response{Result: &wirepb.Response_GroupSend{GroupSend: sr}}, true, nil
	}
	return &wirepb.Response{Result: &wirepb.Response_SyncToDevice{SyncToDevice: sr}}, true, nil
}
