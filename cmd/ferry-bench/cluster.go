package main

// Cluster placement for pairs (issue 7): with --redis, the bench reads the
// shard owners and picks usernames so that each pair's sender and receiver
// live on the same node (--cluster-placement same) or on two different
// nodes (cross). Every dial follows WRONG_NODE redirects, so --server may
// be any node.

import (
	"context"
	"fmt"
	"slices"

	"github.com/ferryhq/ferry/cluster"
)

// placer picks usernames by the node that owns their shard.
type placer struct {
	smap   cluster.ShardMap
	owners []string // by shard
	nodes  []string // nodes holding shards, sorted
}

func newPlacer(ctx context.Context, redisURL, prefix string) (*placer, error) {
	rdb, err := cluster.NewRedis(redisURL)
	if err != nil {
		return nil, err
	}
	defer rdb.Close()
	st, err := cluster.ReadStatus(ctx, rdb, prefix)
	if err != nil {
		return nil, err
	}
	smap, err := cluster.NewShardMap(st.Meta.Shards)
	if err != nil {
		return nil, err
	}
	p := &placer{smap: smap}
	for _, s := range st.Shards {
		p.owners = append(p.owners, s.Owner)
		if s.Owner != "" && !slices.Contains(p.nodes, s.Owner) {
			p.nodes = append(p.nodes, s.Owner)
		}
	}
	slices.Sort(p.nodes)
	if len(p.nodes) == 0 {
		return nil, fmt.Errorf("cluster %s: no shard has an owner", st.Meta.ID)
	}
	return p, nil
}

// name returns base_k for the first k whose shard node owns.
func (p *placer) name(base, node string) string {
	for k := 0; ; k++ {
		n := fmt.Sprintf("%s_%d", base, k)
		if p.owners[p.smap.Account(n)] == node {
			return n
		}
	}
}

// pairNodes returns the nodes of pair i's sender and receiver.
func (p *placer) pairNodes(i int, placement string) (string, string, error) {
	s := p.nodes[i%len(p.nodes)]
	switch placement {
	case "same":
		return s, s, nil
	case "cross":
		if len(p.nodes) < 2 {
			return "", "", fmt.Errorf("cross placement needs two nodes holding shards, have %v", p.nodes)
		}
		return s, p.nodes[(i+1)%len(p.nodes)], nil
	}
	return "", "", fmt.Errorf("--cluster-placement must be same or cross, not %q", placement)
}
