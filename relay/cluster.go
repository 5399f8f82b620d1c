package relay

// Cluster mode (docs/cluster.md, "Routing"): a device's socket lives on the
// node that serves its account's shard; requests about another shard's
// account or a group run on that shard's owner (Cluster.Forward, served
// there by ServeAs); typing events for devices elsewhere go through
// Cluster.Deliver and arrive by DeliverLocal.

import (
	"context"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// forwardable are the requests another node may run here for one of its
// devices: each is about an account or group of this node's shards and
// uses nothing of the caller's connection.
func forwardable(f *wirepb.ClientFrame) bool {
	switch f.Body.(type) {
	case *wirepb.ClientFrame_ClaimBundles, *wirepb.ClientFrame_GetDeviceList,
		*wirepb.ClientFrame_GetGroup, *wirepb.ClientFrame_GroupChange, *wirepb.ClientFrame_GroupSend,
		*wirepb.ClientFrame_MarkRead, *wirepb.ClientFrame_Typing, *wirepb.ClientFrame_SyncToDevice:
		return true
	}
	return false
}

// ServeAs runs a request forwarded by another node as its authenticated
// device dev and returns the response (with the frame's id). The caller
// (package route) has authenticated the node and checks the shard's fence
// around it.
func (s *Server) ServeAs(ctx context.Context, dev wire.DeviceAddr, f *wirepb.ClientFrame) *wirepb.Response {
	if !forwardable(f) {
		return &wirepb.Response{Id: f.Id, Error: wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: request cannot be forwarded").Proto()}
	}
	var res *wirepb.Response
	c := &conn{s: s, addr: dev, state: stateAuthed, reply: func(r *wirepb.Response) { res = r }}
	c.serve(f)
	if res == nil {
		res = &wirepb.Response{Id: f.Id, Error: wire.Errorf(wirepb.ErrorCode_INTERNAL, "internal error").Proto()}
	}
	return res
}

// DeliverLocal queues an encoded ServerFrame on the receiving connections
// of devs that are here; full queues drop it. It returns how many took it.
func (s *Server) DeliverLocal(devs []wire.DeviceAddr, frame []byte) int {
	n := 0
	for _, d := range devs {
		if c := s.hub.get(d); c != nil && c.tryEnqueue(frame) {
			n++
		}
	}
	return n
}

// CloseUnserved closes every connection whose account this node no longer
// serves (its shard moved or its lease lapsed): the client reconnects and
// is redirected to the new owner.
func (s *Server) CloseUnserved() int {
	cl := s.deps.Cluster
	if cl == nil {
		return 0
	}
	// Every authenticated connection is in the device table (trackDevice
	// runs before the client hears "ok"), keyed by its address.
	d := s.dev
	d.mu.Lock()
	var drop []*conn
	for addr, set := range d.conns {
		if cl.ServesAccount(addr.Account) {
			continue
		}
		for c := range set {
			drop = append(drop, c)
		}
	}
	d.mu.Unlock()
	for _, c := range drop {
		c.close(wire.CloseWrongNode, "this node no longer serves the account")
	}
	return len(drop)
}

// redirected answers a Register or Auth for an account this node does not
// serve: WRONG_NODE with the owner's URL (or the error that says nobody
// serves it now), then a close that tells the client to reconnect. It
// returns false if the connection may go on (this node serves the account).
func (c *conn) redirected(id uint64, kind, account string) bool {
	cl := c.s.deps.Cluster
	if cl == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	url, err := cl.Home(ctx, account)
	if err == nil && url == "" {
		return false
	}
	if err == nil {
		e := wire.Errorf(wirepb.ErrorCode_WRONG_NODE, "relay: account %s is served by another node", account)
		e.Redirect = url
		err = e
		c.s.metrics.redirects.Inc()
	}
	c.respondErr(id, kind, err)
	c.close(wire.CloseWrongNode, "account served by another node")
	return true
}
