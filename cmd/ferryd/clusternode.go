package main

// Cluster mode of the server (issue 7; docs/cluster.md, docs/operations.md).

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"github.com/ferryhq/ferry/shardmove"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"google.golang.org/protobuf/proto"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/presence"
	"github.com/ferryhq/ferry/relay"
	"github.com/ferryhq/ferry/route"
	"github.com/prometheus/client_golang/prometheus"
)

// clusterFlags are the flags of cluster mode; without --redis the server
// is the embedded single node.
type clusterFlags struct {
	redis       string
	nodeID      string
	advertise   string
	shards      int
	bootstrap   bool
	secretFile  string
	prefix      string
	leaseTTL    time.Duration
	expect      int
	strict      bool
	callTO      time.Duration
	presenceTTL time.Duration
}

func (f *clusterFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.redis, "redis", "", "join a cluster coordinated by this Redis (redis://host:port; a Sentinel set or Redis Cluster: see docs/operations.md); empty: one node, no Redis")
	fs.StringVar(&f.nodeID, "node-id", "", "this node's id in the cluster, [a-z0-9_-]{1,64}; bound to the data dir (required with --redis)")
	fs.StringVar(&f.advertise, "advertise", "", "the ws:// or wss:// URL clients are redirected to and other nodes call (default: from --listen)")
	fs.IntVar(&f.shards, "shards", 0, "shard count when this node creates the cluster (default 256; fixed for the cluster's life)")
	fs.BoolVar(&f.bootstrap, "cluster-bootstrap", false, "allow this node to create the cluster if Redis has none and this data dir never joined one")
	fs.StringVar(&f.secretFile, "cluster-secret-file", "", "file holding the secret every node shares (≥ 16 bytes) that authenticates node-to-node calls (required with --redis)")
	fs.StringVar(&f.prefix, "cluster-prefix", cluster.DefaultPrefix, "prefix of every Redis key of the cluster")
	fs.DurationVar(&f.leaseTTL, "cluster-lease-ttl", 10*time.Second, "shard lease lifetime in Redis; a node that cannot renew stops serving its shards 4/5 of it after the last renewal")
	fs.IntVar(&f.expect, "cluster-expect-nodes", 0, "nodes the new cluster is started with: each claims at most its share of the never-owned shards")
	fs.BoolVar(&f.strict, "cluster-strict-leases", false, "stop serving this node's shards when Redis cannot be reached for a lease TTL (default: keep serving them through a Redis outage; see docs/cluster.md)")
	fs.DurationVar(&f.callTO, "cluster-call-timeout", 5*time.Second, "deadline of one node-to-node call")
	fs.DurationVar(&f.presenceTTL, "cluster-presence-ttl", 30*time.Second, "lifetime in Redis of an online account's presence record, refreshed every third of it: a dead node's accounts turn unknown on other nodes within about 1.5× it")
}

// clusterNode is a running cluster membership.
type clusterNode struct {
	node   *cluster.Node
	router *route.Router
	cancel context.CancelFunc
	done   chan error // Run's result
	// the presence bridge and the device registry writer, stopped by leave
	// (docs/cluster.md, "Presence and the registry across nodes")
	workers     sync.WaitGroup
	stopWorkers context.CancelFunc
}

// joinCluster joins (waiting until Redis answers and the cluster exists)
// and returns the node with its router.
func joinCluster(f clusterFlags, listen string, tls bool, db *pebble.DB, reg prometheus.Registerer, log *slog.Logger) (*clusterNode, error) {
	if f.nodeID == "" {
		return nil, errors.New("--redis needs --node-id")
	}
	if f.secretFile == "" {
		return nil, errors.New("--redis needs --cluster-secret-file")
	}
	secret, err := os.ReadFile(f.secretFile)
	if err != nil {
		return nil, fmt.Errorf("cluster secret: %w", err)
	}
	secret = bytes.TrimSpace(secret)
	adv := f.advertise
	if adv == "" {
		scheme := "ws"
		if tls {
			scheme = "wss"
		}
		adv = scheme + "://" + listen
	}
	rdb, err := cluster.NewRedis(f.redis)
	if err != nil {
		return nil, err
	}
	node, err := cluster.NewNode(rdb, cluster.NewStore(db), cluster.Config{
		NodeID: f.nodeID, Advertise: adv, Shards: f.shards, Bootstrap: f.bootstrap, Prefix: f.prefix,
		LeaseTTL: f.leaseTTL, ExpectNodes: f.expect, ServeThroughOutage: !f.strict, Log: log, Registerer: reg,
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	cn := &clusterNode{node: node, cancel: cancel, done: make(chan error, 1)}
	go func() { cn.done <- node.Run(ctx) }()
	log.Info("ferryd: joining the cluster", "node", f.nodeID, "advertise", adv)
	select {
	case <-node.Ready():
	case err := <-cn.done:
		cancel()
		return nil, fmt.Errorf("cluster: %w", err)
	}
	cn.router, err = route.NewRouter(route.Config{Node: node, Secret: secret, Timeout: f.callTO, Log: log, Registerer: reg})
	if err != nil {
		cancel()
		<-cn.done
		return nil, err
	}
	bridge, err := cn.router.NewPresenceBridge(presence.BridgeConfig{Redis: rdb, Prefix: f.prefix,
		Backend: presence.NewStore(db), TTL: f.presenceTTL, Log: log, Registerer: reg})
	if err != nil {
		cancel()
		<-cn.done
		return nil, err
	}
	wctx, wcancel := context.WithCancel(context.Background())
	cn.stopWorkers = wcancel
	cn.workers.Add(2)
	go func() { defer cn.workers.Done(); bridge.Run(wctx) }()
	go func() { defer cn.workers.Done(); cn.router.RunRegistry(wctx) }()
	sm, _ := node.ShardMap()
	log.Info("ferryd: joined the cluster", "node", f.nodeID, "cluster", node.Meta().ID, "shards", sm.Count())
	return cn, nil
}

// watchShards closes the sockets of accounts whose shard this node stopped
// serving, at most every interval, until ctx ends.
func (cn *clusterNode) watchShards(ctx context.Context, srv *relay.Server, log *slog.Logger) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	prev := cn.node.Fence().Held()
	sweeps := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		held := cn.node.Fence().Held()
		lost := 0
		for s, e := range prev {
			if held[s] != e {
				lost++
			}
		}
		prev = held
		sweeps++
		// Every second a full sweep as well: a socket authenticated just
		// before a shard was released may register after the tick that
		// noticed the loss.
		if lost > 0 || sweeps%4 == 0 {
			if n := srv.CloseUnserved(); n > 0 {
				log.Info("ferryd: closed connections of accounts no longer served here", "shards_lost", lost, "connections", n)
			}
		}
	}
}

// leave releases the node's leases and registration (a clean stop).
func (cn *clusterNode) leave() error {
	cn.stopWorkers()
	cn.workers.Wait()
	cn.cancel()
	err := <-cn.done
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

// deps returns the relay's stores: d itself on one node, d routed through
// the cluster otherwise.
func deps(cn *clusterNode, d relay.Deps) relay.Deps {
	if cn == nil {
		return d
	}
	d.Accounts, d.Prekeys, d.Inbox, d.Groups = cn.router.Deps(route.Locals{
		Accounts: d.Accounts, Prekeys: d.Prekeys, Inbox: d.Inbox, Groups: d.Groups})
	d.Cluster = cn.router
	return d
}

// shardData is route.ShardData over this node's stores (package
// shardmove), with records encoded as storepb.ShardRecord.
type shardData struct {
	smap   cluster.ShardMap
	stores []shardmove.Store
}

func newShardData(cn *clusterNode, stores ...shardmove.Store) *shardData {
	sm, _ := cn.node.ShardMap()
	return &shardData{smap: sm, stores: stores}
}

func (d *shardData) Export(ctx context.Context, s cluster.ShardID, emit func([]byte) error) error {
	return shardmove.Export(ctx, d.stores, route.ShardFilter(d.smap, s), func(r *storepb.ShardRecord) error {
		b, err := proto.Marshal(r)
		if err != nil {
			return err
		}
		return emit(b)
	})
}

func (d *shardData) Import(ctx context.Context, s cluster.ShardID, raw [][]byte) error {
	recs := make([]*storepb.ShardRecord, len(raw))
	for i, b := range raw {
		r := &storepb.ShardRecord{}
		if err := proto.Unmarshal(b, r); err != nil {
			return fmt.Errorf("%w: record %d does not decode", store.ErrShardRecord, i)
		}
		recs[i] = r
	}
	return shardmove.Import(ctx, d.stores, recs)
}

func (d *shardData) Drop(ctx context.Context, s cluster.ShardID) error {
	return shardmove.Drop(ctx, d.stores, route.ShardFilter(d.smap, s))
}
