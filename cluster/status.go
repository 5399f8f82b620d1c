package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/redis/go-redis/v9"
)

// Status is the cluster as Redis sees it now.
type Status struct {
	Meta   Meta
	Nodes  []NodeStatus
	Shards []ShardStatus // one per shard, in order
}

// NodeStatus is a node and how many shards it holds.
type NodeStatus struct {
	NodeInfo
	Held int
}

// ShardStatus is one shard's owner.
type ShardStatus struct {
	Shard ShardID
	// Owner is the node holding the lease; "" if nobody does now.
	Owner    string
	Instance string
	// Epoch is the lease's epoch, or the shard's last epoch when unowned
	// (0: never owned since Redis last started empty).
	Epoch uint64
	TTL   time.Duration
}

// ReadStatus reads the cluster under prefix ("" is DefaultPrefix). It only
// reads. ErrNoCluster if Redis holds none.
func ReadStatus(ctx context.Context, rdb redis.UniversalClient, prefix string) (Status, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	k := keys{prefix}
	meta, ok, err := readMeta(ctx, rdb, k)
	if err != nil {
		return Status{}, err
	}
	if !ok {
		return Status{}, ErrNoCluster
	}
	st := Status{Meta: meta, Shards: make([]ShardStatus, meta.Shards)}
	nodes, err := NewRegistry(rdb, prefix).Nodes(ctx)
	if err != nil {
		return Status{}, err
	}
	type cmds struct {
		lv, ev *redis.StringCmd
		pt     *redis.DurationCmd
	}
	cs := make([]cmds, meta.Shards)
	for lo := 0; lo < meta.Shards; lo += registryChunk {
		hi := min(meta.Shards, lo+registryChunk)
		_, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i := lo; i < hi; i++ {
				s := ShardID(i)
				cs[i] = cmds{lv: p.Get(ctx, k.lease(s)), pt: p.PTTL(ctx, k.lease(s)), ev: p.Get(ctx, k.epoch(s))}
			}
			return nil
		})
		if err != nil && !errors.Is(err, redis.Nil) {
			return Status{}, fmt.Errorf("%w: status: %w", ErrRedis, err)
		}
	}
	held := make(map[string]int)
	for i, c := range cs {
		lease, ok, epoch, err := decodeGet(ShardID(i), c.lv, c.pt, c.ev)
		if err != nil {
			return Status{}, err
		}
		ss := ShardStatus{Shard: ShardID(i), Epoch: epoch}
		if ok {
			ss.Owner, ss.Instance, ss.Epoch, ss.TTL = lease.Node, lease.Instance, lease.Epoch, lease.TTL
			held[lease.Node]++
		}
		st.Shards[i] = ss
	}
	for _, n := range nodes {
		st.Nodes = append(st.Nodes, NodeStatus{NodeInfo: n, Held: held[n.ID]})
	}
	return st, nil
}

// WriteText prints the status for people: the cluster, its nodes, and one
// line per shard.
func (s Status) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	rec := ""
	if s.Meta.Recovered {
		rec = " (recovered: re-created from members' stores after Redis lost it)"
	}
	fmt.Fprintf(tw, "cluster %s, %d shards, created %s%s\n\n", s.Meta.ID, s.Meta.Shards, s.Meta.Created.UTC().Format(time.RFC3339), rec)
	fmt.Fprintln(tw, "NODE\tSTATE\tSHARDS\tADVERTISE\tLAST HEARTBEAT")
	for _, n := range s.Nodes {
		state, hb := "gone", "-"
		if n.Alive {
			state, hb = "alive", n.Heartbeat.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", n.ID, state, n.Held, orDash(n.Advertise), hb)
	}
	unowned := 0
	fmt.Fprintln(tw, "\nSHARD\tOWNER\tEPOCH\tLEASE LEFT")
	for _, sh := range s.Shards {
		left := "-"
		if sh.Owner == "" {
			unowned++
		} else {
			left = sh.TTL.Round(time.Millisecond).String()
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\n", sh.Shard, orDash(sh.Owner), sh.Epoch, left)
	}
	fmt.Fprintf(tw, "\n%d of %d shards owned\n", len(s.Shards)-unowned, len(s.Shards))
	return tw.Flush()
}

func orDash(s string) string {
	if strings.TrimSpace(s) == "" {
		return "-"
	}
	return s
}
