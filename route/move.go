package route

// Moving a shard between nodes (docs/cluster.md, "Moving a shard"): the
// source fences the shard (releases its lease while keeping the
// re-acquire off), exports every record of it, the target imports them
// durably and claims the lease (a higher epoch, and it becomes home), then
// the source drops its copy and its home record. Until the target's claim
// the source stays home, so a failure at any step leaves the shard where it
// was; clients of the shard retry (UNAVAILABLE) during the move and are
// redirected to the target after it.

import (
	"encoding/hex"
	"strings"

	"context"
	"errors"
	"fmt"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/store"
	"net/http"
	"strconv"
	"time"

	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/route/routepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// ShardData is the store side of a move: every record of one shard, each
// an encoded storepb.ShardRecord (package shardmove over the stores).
type ShardData interface {
	// Export calls emit for every record of shard, from one consistent
	// view taken after every write queued before it committed.
	Export(ctx context.Context, shard cluster.ShardID, emit func(rec []byte) error) error
	// Import stores records of shard durably, replacing whatever of the
	// shard's accounts and groups is stored here; repeating it is harmless.
	Import(ctx context.Context, shard cluster.ShardID, recs [][]byte) error
	// Drop deletes every record of shard.
	Drop(ctx context.Context, shard cluster.ShardID) error
}

// ShardFilter selects shard s's records for a move: its accounts, its
// groups, and the dedup records kept under a group's GroupDedupAccount.
func ShardFilter(smap cluster.ShardMap, s cluster.ShardID) store.ShardFilter {
	inGroup := func(id []byte) bool { return len(id) == group.IDSize && smap.Group([group.IDSize]byte(id)) == s }
	return store.ShardFilter{
		Account: func(u string) bool {
			if rest, ok := strings.CutPrefix(u, "#"); ok {
				id, err := hex.DecodeString(rest)
				return err == nil && inGroup(id)
			}
			return smap.Account(u) == s
		},
		Group: inGroup,
	}
}

// moveClient carries move and import calls. The router's transport gives
// up on a reply after the call timeout (5 s); an import may take longer,
// so these have no reply-header timeout of their own (the call's deadline
// bounds them).
var moveClient = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 2, IdleConnTimeout: 30 * time.Second}}

// moveTimeout bounds a whole move as seen by the operator's command and
// the import call.
const moveTimeout = 2 * time.Minute

// SetShardData enables moves of this node's shards (and imports into it).
func (r *Router) SetShardData(d ShardData) { r.data = d }

// moveOut is the source side of a move of shard to target.
func (r *Router) moveOut(ctx context.Context, shard cluster.ShardID, target string) (*routepb.MoveResult, error) {
	if r.data == nil {
		return nil, wire.Errorf(wirepb.ErrorCode_UNAVAILABLE, "route: this node cannot move shards")
	}
	if target == r.self {
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "route: shard %d is already on %s", shard, target)
	}
	info, ok, err := r.node.Registry().Node(ctx, target)
	if err != nil {
		return nil, unavailable(err, "route: the cluster cannot be reached")
	}
	if !ok || !info.Alive || info.Advertise == "" {
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "route: node %q is not alive in the cluster", target)
	}
	if !r.Local(shard) {
		return nil, wire.Errorf(wirepb.ErrorCode_WRONG_NODE, "route: shard %d is not served here", shard)
	}
	r.node.Hold(shard)
	defer r.node.Unhold(shard)
	// Fence: from here no write for the shard passes its post-commit check,
	// so nothing committed after the export below was ever acknowledged.
	if err := r.node.Release(ctx, shard); err != nil {
		return nil, unavailable(err, "route: release shard %d", shard)
	}
	r.forget(shard)
	if srv := r.srv.Load(); srv != nil {
		srv.CloseUnserved()
	}
	moved := false
	defer func() {
		if !moved {
			// Still home: take the shard back now rather than at the next round.
			if _, err := r.node.Claim(context.Background(), shard); err != nil {
				r.log.Warn("route: shard not taken back after a failed move; the next round retries", "shard", shard, "err", err)
			}
		}
	}()
	var recs [][]byte
	for attempt := 0; ; attempt++ {
		recs = recs[:0]
		size := 0
		err = r.data.Export(ctx, shard, func(rec []byte) error {
			size += len(rec) + 8
			if size > maxCallBytes-1024 {
				return wire.Errorf(wirepb.ErrorCode_MESSAGE_TOO_LARGE, "route: shard %d holds more than %d bytes: too large for one move call", shard, maxCallBytes)
			}
			recs = append(recs, rec)
			return nil
		})
		// A fan-out job still writing entries for the shard: wait for it
		// (the shard is fenced, so nothing new is queued for it).
		if err == nil || !errors.Is(err, inbox.ErrFanoutPending) || attempt >= 50 {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	if err != nil {
		return nil, err
	}
	body, err := marshalCall(r.self, &routepb.Call{Shard: uint32(shard), Body: &routepb.Call_Import{Import: &routepb.ImportCall{Records: recs}}})
	if err != nil {
		return nil, err
	}
	rep, _, err := roundTrip(ctx, moveClient, r.cfg.Secret, info.Advertise, body, moveTimeout)
	if err == nil && rep.GetError() != nil {
		err = wire.FromProto(rep.GetError())
	}
	if err != nil {
		r.m.calls.WithLabelValues("import", "failed").Inc()
		return nil, fmt.Errorf("route: move shard %d to %s: %w", shard, target, err)
	}
	r.m.calls.WithLabelValues("import", "OK").Inc()
	moved = true
	res := rep.GetMove()
	if err := r.node.Moved(shard); err != nil {
		r.log.Error("route: shard moved but its home record not cleared", "shard", shard, "err", err)
	}
	if err := r.data.Drop(ctx, shard); err != nil {
		// The target serves the shard; what is left here is unreachable
		// (this node is no longer its home) and goes with a later drop.
		r.log.Error("route: shard moved but its local copy not dropped", "shard", shard, "err", err)
	}
	r.log.Info("route: shard moved", "shard", shard, "to", target, "epoch", res.GetEpoch(), "records", len(recs))
	return &routepb.MoveResult{Epoch: res.GetEpoch(), Records: uint32(len(recs))}, nil
}

// importShard is the target side: store, then claim.
func (r *Router) importShard(ctx context.Context, shard cluster.ShardID, recs [][]byte) (*routepb.MoveResult, error) {
	if r.data == nil {
		return nil, wire.Errorf(wirepb.ErrorCode_UNAVAILABLE, "route: this node cannot take shards")
	}
	if r.Local(shard) {
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "route: shard %d is already served here", shard)
	}
	if err := r.data.Import(ctx, shard, recs); err != nil {
		return nil, err
	}
	epoch, err := r.node.Claim(ctx, shard)
	if err != nil {
		return nil, unavailable(err, "route: claim shard %d after the import", shard)
	}
	r.forget(shard)
	return &routepb.MoveResult{Epoch: epoch, Records: uint32(len(recs))}, nil
}

// Move asks the node at advertise (the shard's owner) to move shard to
// target; for `ferryd cluster move`.
func Move(ctx context.Context, secret []byte, advertise string, shard cluster.ShardID, target string) (*routepb.MoveResult, error) {
	body, err := marshalCall("operator", &routepb.Call{Shard: uint32(shard), Body: &routepb.Call_Move{Move: &routepb.MoveCall{TargetNode: target}}})
	if err != nil {
		return nil, err
	}
	rep, _, err := roundTrip(ctx, moveClient, secret, advertise, body, moveTimeout)
	if err != nil {
		return nil, err
	}
	if e := rep.GetError(); e != nil {
		return nil, wire.FromProto(e)
	}
	return rep.GetMove(), nil
}

// ParseShard parses a shard number.
func ParseShard(s string) (cluster.ShardID, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("route: bad shard %q", s)
	}
	return cluster.ShardID(n), nil
}
