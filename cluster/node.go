package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
)

// Config of a cluster node. The zero value of each field means its default.
type Config struct {
	// NodeID names the node, [a-z0-9_-]{1,64}; required. It is bound to the
	// data dir on first start and may not change.
	NodeID string
	// Advertise is the URL clients are redirected to and nodes send to.
	Advertise string
	// Shards is the shard count when this node creates the cluster; 0
	// accepts the cluster's count (DefaultShards at creation). A nonzero
	// count different from the cluster's is ErrShardCount.
	Shards int
	// Bootstrap lets this node create the cluster in Redis when Redis has
	// none and this data dir never joined one. Without it such a node waits
	// (ErrNoCluster), so a new node can never found a second, empty cluster
	// in a Redis that merely lost the first one.
	Bootstrap bool
	// NoFreshClaims: never claim a never-owned shard (it only takes shards
	// it is home of, or those given to it with Claim).
	NoFreshClaims bool
	// ExpectNodes is the node count the cluster is being started with: a
	// node claims at most ceil(shards / max(live nodes, ExpectNodes))
	// never-owned shards, so nodes started together split them evenly
	// (shards still unclaimed after three rounds are taken regardless).
	ExpectNodes int
	// ServeThroughOutage keeps serving the shards this node holds while
	// Redis cannot be reached (each failed round extends their local
	// deadlines), instead of stopping TTL − margin after the last renewal.
	// Safe because nothing in the cluster takes a shard from a live node on
	// its own: a move needs the source's cooperation, and an operator may
	// force a claim only of a node that is down (docs/cluster.md, "Redis
	// down"). Once Redis answers again, a lease found taken is dropped.
	ServeThroughOutage bool
	// Prefix of every Redis key (DefaultPrefix).
	Prefix string
	// LeaseTTL is the lease lifetime in Redis (10 s). A node whose renewals
	// fail stops serving LeaseTTL − SafetyMargin after the last good one.
	LeaseTTL time.Duration
	// RenewEvery is the maintenance period (LeaseTTL / 3).
	RenewEvery time.Duration
	// SafetyMargin is taken off every local lease deadline (LeaseTTL / 5);
	// see Fence.
	SafetyMargin time.Duration
	// RegistryTTL is the lifetime of node and device registrations (30 s);
	// they are refreshed every RegistryTTL / 3.
	RegistryTTL time.Duration
	// Clock (time.Now). Tests jump it to simulate a pause.
	Clock Clock
	// Log (slog.Default()).
	Log *slog.Logger
	// Registerer for the node's metrics (none if nil).
	Registerer prometheus.Registerer
}

func (c *Config) defaults() error {
	if err := ValidNodeID(c.NodeID); err != nil {
		return err
	}
	if c.Shards != 0 {
		if _, err := NewShardMap(c.Shards); err != nil {
			return err
		}
	}
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = 10 * time.Second
	}
	if c.RenewEvery <= 0 {
		c.RenewEvery = c.LeaseTTL / 3
	}
	if c.SafetyMargin <= 0 {
		c.SafetyMargin = c.LeaseTTL / 5
	}
	if c.RenewEvery >= c.LeaseTTL-c.SafetyMargin {
		return fmt.Errorf("cluster: renew period %v leaves no time before the lease deadline (TTL %v − margin %v)", c.RenewEvery, c.LeaseTTL, c.SafetyMargin)
	}
	if c.RegistryTTL <= 0 {
		c.RegistryTTL = 30 * time.Second
	}
	if c.Clock == nil {
		c.Clock = time.Now
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	return nil
}

type metrics struct {
	held     prometheus.Gauge
	acquired prometheus.Counter
	lost     *prometheus.CounterVec
	redisErr prometheus.Counter
	outage   prometheus.Counter
}

func newMetrics(r prometheus.Registerer) *metrics {
	m := &metrics{
		held: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ferry_cluster_shards_held",
			Help: "Shards whose lease this node holds."}),
		acquired: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_cluster_lease_acquired_total",
			Help: "Shard leases acquired (each with a new epoch)."}),
		lost: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_cluster_lease_lost_total",
			Help: "Shard leases this node stopped serving, by reason (lost: Redis says it is not ours; deadline: no renewal in time; released)."},
			[]string{"reason"}),
		redisErr: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_cluster_redis_errors_total",
			Help: "Maintenance rounds that failed to reach Redis."}),
		outage: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_cluster_outage_rounds_total",
			Help: "Maintenance rounds that kept serving held shards while Redis could not be reached (ServeThroughOutage)."}),
	}
	if r != nil {
		r.MustRegister(m.held, m.acquired, m.lost, m.redisErr, m.outage)
	}
	return m
}

// ErrSuperseded: another process of the same node id took this node's
// leases; this one stops (Run returns it, ferryd exits).
var ErrSuperseded = errors.New("cluster: superseded by another process of this node")

// Node is this process's membership in a cluster: it joins, keeps its
// registration and its leases alive, re-registers its shards when Redis
// comes back empty, and keeps the Fence every write is checked against.
type Node struct {
	// static after construction
	cfg     Config
	rdb     redis.UniversalClient
	keys    keys
	leases  *Leases
	reg     *Registry
	st      *Store
	fence   *Fence
	holder  Holder
	started time.Time
	log     *slog.Logger
	m       *metrics
	ready   chan struct{}

	meta atomic.Pointer[Meta] // set by the first successful join

	// owned by Tick (tickMu)
	tickMu       sync.Mutex
	readyOnce    sync.Once
	freshPending bool            // a scan may still find never-owned shards
	unclaimedFor map[ShardID]int // consecutive scans a shard was seen unclaimed
	lastDevices  time.Time       // last device registry refresh
	lastErr      string          // last maintenance error logged
	superseded   bool            // another process runs as this node: do nothing more

	// guarded by holdMu: shards being moved away, not to be re-acquired
	holdMu sync.Mutex
	holds  map[ShardID]bool

	// guarded by devMu
	devMu   sync.Mutex
	devices map[DeviceRef]struct{}
}

// NewNode prepares a node; Run (or Tick) joins. The data dir is bound to
// cfg.NodeID here.
func NewNode(rdb redis.UniversalClient, st *Store, cfg Config) (*Node, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	id, ok, err := st.NodeID()
	if err != nil {
		return nil, err
	}
	if ok && id != cfg.NodeID {
		return nil, fmt.Errorf("%w: data dir belongs to node %q, not %q", ErrNodeID, id, cfg.NodeID)
	}
	if !ok {
		if err := st.SetNodeID(cfg.NodeID); err != nil {
			return nil, err
		}
	}
	var inst [6]byte
	_, _ = rand.Read(inst[:])
	return &Node{
		cfg: cfg, rdb: rdb, keys: keys{cfg.Prefix},
		leases: NewLeases(rdb, cfg.Prefix), reg: NewRegistry(rdb, cfg.Prefix),
		st: st, fence: NewFence(cfg.Clock),
		holder:  Holder{Node: cfg.NodeID, Instance: hex.EncodeToString(inst[:])},
		started: cfg.Clock(), log: cfg.Log.With("node", cfg.NodeID), m: newMetrics(cfg.Registerer),
		ready: make(chan struct{}), freshPending: true, unclaimedFor: make(map[ShardID]int),
		devices: make(map[DeviceRef]struct{}),
	}, nil
}

// Fence is the node's lease record; check it around every write for a shard.
func (n *Node) Fence() *Fence { return n.fence }

// Holder is this process's lease identity.
func (n *Node) Holder() Holder { return n.holder }

// Ready is closed once the node has joined the cluster.
func (n *Node) Ready() <-chan struct{} { return n.ready }

// ShardMap returns the cluster's shard map; ok is false before the join.
func (n *Node) ShardMap() (ShardMap, bool) {
	m := n.meta.Load()
	if m == nil {
		return ShardMap{}, false
	}
	sm, err := NewShardMap(m.Shards)
	return sm, err == nil
}

// Run maintains the node every RenewEvery until ctx ends, then releases
// its leases and registration (with a short deadline of its own).
func (n *Node) Run(ctx context.Context) error {
	t := time.NewTicker(n.cfg.RenewEvery)
	defer t.Stop()
	for {
		// A round must end well before the deadlines it renews: a Redis
		// that does not answer (dial and read timeouts, retries) would
		// otherwise hold it past them.
		tctx, cancel := context.WithTimeout(ctx, n.cfg.RenewEvery)
		err := n.Tick(tctx)
		cancel()
		if errors.Is(err, ErrSuperseded) {
			return err
		}
		n.logTick(err)
		select {
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			return n.Leave(sctx)
		case <-t.C:
		}
	}
}

func (n *Node) logTick(err error) {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if msg == n.lastErr {
		return
	}
	n.lastErr = msg
	if err != nil {
		n.log.Warn("cluster maintenance failed", "err", err)
	} else {
		n.log.Info("cluster maintenance ok again")
	}
}

// Tick is one maintenance round: join (or re-create the cluster record
// after Redis lost it), heartbeat, renew held leases, re-acquire the shards
// this node is home of, claim never-owned shards, refresh the device
// registry, and stop serving any shard whose deadline passed. Run calls it;
// tests call it directly to control time. Errors are for logging: the
// round does all it can, and safety never depends on a round succeeding.
func (n *Node) Tick(ctx context.Context) error {
	n.tickMu.Lock()
	defer n.tickMu.Unlock()
	defer n.expire()
	if n.superseded {
		return ErrSuperseded
	}
	sent := n.cfg.Clock()
	meta, err := n.join(ctx)
	if err != nil {
		if errors.Is(err, ErrRedis) {
			n.m.redisErr.Inc()
			n.outage(sent)
		}
		return err
	}
	n.readyOnce.Do(func() { close(n.ready) })
	errs := []error{n.heartbeat(ctx), n.renew(ctx)}
	if n.superseded {
		return ErrSuperseded
	}
	errs = append(errs, n.reacquireHome(ctx))
	if !meta.Recovered && !n.cfg.NoFreshClaims {
		errs = append(errs, n.claimFresh(ctx, meta))
	}
	errs = append(errs, n.refreshDevices(ctx))
	err = errors.Join(errs...)
	if errors.Is(err, ErrRedis) {
		n.m.redisErr.Inc()
	}
	return err
}

// join checks (or creates) the cluster record against this data dir's.
func (n *Node) join(ctx context.Context) (Meta, error) {
	local, hasLocal, err := n.st.Cluster()
	if err != nil {
		return Meta{}, err
	}
	meta, ok, err := readMeta(ctx, n.rdb, n.keys)
	if err != nil {
		return Meta{}, err
	}
	if !ok {
		var want Meta
		switch {
		case hasLocal:
			want = Meta{ID: local.ID, Shards: local.Shards, Created: n.cfg.Clock(), Recovered: true}
			n.log.Warn("redis holds no cluster record: re-creating it from this node's store", "cluster", local.ID)
		case n.cfg.Bootstrap:
			shards := n.cfg.Shards
			if shards == 0 {
				shards = DefaultShards
			}
			want = Meta{ID: newClusterID(), Shards: shards, Created: n.cfg.Clock()}
		default:
			return Meta{}, fmt.Errorf("%w (start the first node with bootstrap)", ErrNoCluster)
		}
		if meta, err = createMeta(ctx, n.rdb, n.keys, want); err != nil {
			return Meta{}, err
		}
		if meta.ID == want.ID && !want.Recovered {
			n.log.Info("created cluster", "cluster", meta.ID, "shards", meta.Shards)
		}
	}
	switch {
	case hasLocal && local.ID != meta.ID:
		return Meta{}, fmt.Errorf("%w: data dir joined %s, redis holds %s", ErrWrongCluster, local.ID, meta.ID)
	case hasLocal && local.Shards != meta.Shards:
		return Meta{}, fmt.Errorf("%w: data dir has %d, cluster %d", ErrShardCount, local.Shards, meta.Shards)
	case n.cfg.Shards != 0 && n.cfg.Shards != meta.Shards:
		return Meta{}, fmt.Errorf("%w: configured %d, cluster %s has %d", ErrShardCount, n.cfg.Shards, meta.ID, meta.Shards)
	}
	if !hasLocal {
		if err := n.st.SetCluster(ClusterRecord{ID: meta.ID, Shards: meta.Shards}); err != nil {
			return Meta{}, err
		}
		n.log.Info("joined cluster", "cluster", meta.ID, "shards", meta.Shards)
	}
	if old := n.meta.Load(); old == nil || *old != meta {
		n.meta.Store(&meta)
		if old != nil && !old.Created.Equal(meta.Created) {
			n.freshPending = true
		}
	}
	return meta, nil
}

func (n *Node) heartbeat(ctx context.Context) error {
	return n.reg.Heartbeat(ctx, NodeInfo{ID: n.cfg.NodeID, Advertise: n.cfg.Advertise, Instance: n.holder.Instance,
		Started: n.started, Heartbeat: n.cfg.Clock()}, n.cfg.RegistryTTL)
}

func (n *Node) deadline(sent time.Time) time.Time {
	return sent.Add(n.cfg.LeaseTTL - n.cfg.SafetyMargin)
}

// renew extends every held lease in one pipeline.
func (n *Node) renew(ctx context.Context) error {
	gs := n.fence.grants()
	if len(gs) == 0 {
		return nil
	}
	shards := make([]ShardID, 0, len(gs))
	for s := range gs {
		shards = append(shards, s)
	}
	sort.Slice(shards, func(i, j int) bool { return shards[i] < shards[j] })
	epochs := make([]uint64, len(shards))
	for i, s := range shards {
		epochs[i] = gs[s].epoch
	}
	sent := n.cfg.Clock()
	var redisErr error
	checked := false // whether this round looked for a newer process of this node
	for i, err := range n.leases.RenewAll(ctx, n.holder, shards, epochs, n.cfg.LeaseTTL) {
		s := shards[i]
		switch {
		case err == nil:
			n.fence.grant(s, epochs[i], n.deadline(sent))
		case errors.Is(err, ErrLost):
			n.fence.revoke(s)
			n.m.lost.WithLabelValues("lost").Inc()
			n.log.Warn("lost shard lease: stopped serving it", "shard", s, "epoch", epochs[i])
			if checked {
				continue
			}
			checked = true
			if l, ok, _, gerr := n.leases.Get(ctx, s); gerr == nil && ok && l.Node == n.holder.Node && l.Instance != n.holder.Instance {
				// A newer process of this node took over (a restart while this
				// one hung): stop contending, or the two would take turns.
				n.superseded = true
				n.log.Error("another process runs as this node: stopping cluster membership", "instance", l.Instance)
				for s := range n.fence.grants() {
					n.fence.revoke(s)
				}
				return ErrSuperseded
			}
		default:
			redisErr = err // the grant lapses at its deadline unless a later renewal works
		}
	}
	if redisErr != nil {
		n.outage(sent)
	}
	return redisErr
}

// outage extends every grant from sent when ServeThroughOutage is set: a
// round that could not reach Redis.
func (n *Node) outage(sent time.Time) {
	if !n.cfg.ServeThroughOutage {
		return
	}
	for s, g := range n.fence.grants() {
		n.fence.grant(s, g.epoch, n.deadline(sent))
	}
	n.m.outage.Inc()
}

// take acquires shard (fresh: only if never owned) and, once the epoch is
// durable in the node's store, lets the fence pass for it.
func (n *Node) take(ctx context.Context, s ShardID, fresh bool) (uint64, error) {
	rec, err := n.st.Shard(s)
	if err != nil {
		return 0, err
	}
	sent := n.cfg.Clock()
	var epoch uint64
	if fresh {
		epoch, err = n.leases.ClaimFresh(ctx, s, n.holder, n.cfg.LeaseTTL, rec.Seen)
	} else {
		epoch, err = n.leases.Acquire(ctx, s, n.holder, n.cfg.LeaseTTL, rec.Seen)
	}
	var held *HeldError
	switch {
	case err == nil:
		if err := n.st.SetHome(s, epoch); err != nil {
			// Not durable: do not serve at an epoch we might forget.
			_ = n.leases.Release(ctx, s, n.holder, epoch)
			return 0, err
		}
		if old, ok := n.fence.grants()[s]; !ok || old.epoch != epoch {
			n.m.acquired.Inc()
			n.log.Info("acquired shard lease", "shard", s, "epoch", epoch, "fresh", fresh)
		}
		n.fence.grant(s, epoch, n.deadline(sent))
		return epoch, nil
	case errors.As(err, &held):
		if oerr := n.st.Observe(s, held.Lease.Epoch); oerr != nil {
			return 0, oerr
		}
		if rec.Home != 0 && held.Lease.Epoch > rec.Home {
			// Someone took the shard after our last tenure: its data is theirs now.
			n.log.Warn("shard taken over by another node: no longer its home", "shard", s,
				"owner", held.Lease.Node, "epoch", held.Lease.Epoch, "our_epoch", rec.Home)
			if cerr := n.st.ClearHome(s); cerr != nil {
				return 0, cerr
			}
		}
		return 0, err
	case errors.Is(err, ErrNotFresh):
		return 0, errors.Join(err, n.st.Observe(s, epoch))
	}
	return 0, err
}

// reacquireHome takes the shards whose data is here and that this node does
// not hold: after a restart, a lapsed lease, or Redis coming back empty
// (then with an epoch above every one this node saw).
func (n *Node) reacquireHome(ctx context.Context) error {
	recs, err := n.st.Shards()
	if err != nil {
		return err
	}
	sm, _ := n.ShardMap()
	held := n.fence.Held()
	var errs []error
	for s, r := range recs {
		if r.Home == 0 || int(s) >= sm.Count() {
			continue
		}
		if _, ok := held[s]; ok || n.holding(s) {
			continue
		}
		if _, err := n.take(ctx, s, false); err != nil && !errors.Is(err, ErrHeld) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// claimFresh claims never-owned shards: up to a fair share of the live
// nodes, and any shard seen unclaimed for three rounds whatever the share.
func (n *Node) claimFresh(ctx context.Context, meta Meta) error {
	if !n.freshPending {
		return nil
	}
	exists := make([]*redis.IntCmd, meta.Shards)
	for lo := 0; lo < meta.Shards; lo += registryChunk {
		hi := min(meta.Shards, lo+registryChunk)
		if _, err := n.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i := lo; i < hi; i++ {
				exists[i] = p.Exists(ctx, n.keys.epoch(ShardID(i)))
			}
			return nil
		}); err != nil {
			return fmt.Errorf("%w: scan shards: %w", ErrRedis, err)
		}
	}
	var unclaimed []ShardID
	for i, c := range exists {
		s := ShardID(i)
		if c.Val() == 0 {
			unclaimed = append(unclaimed, s)
			n.unclaimedFor[s]++
		} else {
			delete(n.unclaimedFor, s)
		}
	}
	if len(unclaimed) == 0 {
		n.freshPending = false
		return nil
	}
	nodes, err := n.reg.Nodes(ctx)
	if err != nil {
		return err
	}
	alive := 0
	for _, x := range nodes {
		if x.Alive {
			alive++
		}
	}
	alive = max(alive, n.cfg.ExpectNodes, 1)
	share := (meta.Shards + alive - 1) / alive
	mine := len(n.fence.Held())
	var errs []error
	for _, s := range unclaimed {
		if mine >= share && n.unclaimedFor[s] < 3 {
			continue
		}
		if _, err := n.take(ctx, s, true); err == nil {
			mine++
		} else if !errors.Is(err, ErrHeld) && !errors.Is(err, ErrNotFresh) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// expire stops serving shards whose local deadline passed.
func (n *Node) expire() {
	now := n.cfg.Clock()
	for s, g := range n.fence.grants() {
		if !now.Before(g.deadline) {
			n.fence.revoke(s)
			n.m.lost.WithLabelValues("deadline").Inc()
			n.log.Warn("shard lease not renewed in time: stopped serving it", "shard", s, "epoch", g.epoch)
		}
	}
	n.m.held.Set(float64(len(n.fence.Held())))
}

// Claim takes shard's lease for this node when nobody holds it, and makes
// this node its home: for an operator giving a shard to a node, and for
// the target of a shard move once the data is here. It returns the new
// epoch; a live lease of another node is a *HeldError.
func (n *Node) Claim(ctx context.Context, s ShardID) (uint64, error) {
	n.tickMu.Lock()
	defer n.tickMu.Unlock()
	if sm, ok := n.ShardMap(); !ok || int(s) >= sm.Count() {
		return 0, fmt.Errorf("%w: shard %d not in the cluster", ErrShardCount, s)
	}
	_, _, redisEpoch, err := n.leases.Get(ctx, s)
	if err != nil {
		return 0, err
	}
	if err := n.st.Observe(s, redisEpoch); err != nil {
		return 0, err
	}
	return n.take(ctx, s, false)
}

// Hold keeps this node from re-acquiring shard, which it is home of, until
// Unhold: a move of the shard away is in progress (its lease is released
// while its data is copied).
func (n *Node) Hold(s ShardID) {
	n.holdMu.Lock()
	defer n.holdMu.Unlock()
	if n.holds == nil {
		n.holds = make(map[ShardID]bool)
	}
	n.holds[s] = true
}

// Unhold ends Hold.
func (n *Node) Unhold(s ShardID) {
	n.holdMu.Lock()
	defer n.holdMu.Unlock()
	delete(n.holds, s)
}

func (n *Node) holding(s ShardID) bool {
	n.holdMu.Lock()
	defer n.holdMu.Unlock()
	return n.holds[s]
}

// Moved records that shard's data now lives on another node, which holds
// its lease: this node is no longer its home.
func (n *Node) Moved(s ShardID) error {
	n.tickMu.Lock()
	defer n.tickMu.Unlock()
	return n.st.ClearHome(s)
}

// Release stops serving shard at once and gives its lease up, keeping this
// node its home (it re-acquires it at the next round unless another node
// claims it first). Moves use it after fencing the shard.
func (n *Node) Release(ctx context.Context, s ShardID) error {
	n.tickMu.Lock()
	defer n.tickMu.Unlock()
	return n.release(ctx, s)
}

func (n *Node) release(ctx context.Context, s ShardID) error {
	g, ok := n.fence.grants()[s]
	if !ok {
		return nil
	}
	n.fence.revoke(s)
	n.m.lost.WithLabelValues("released").Inc()
	if err := n.leases.Release(ctx, s, n.holder, g.epoch); err != nil && !errors.Is(err, ErrLost) {
		return err
	}
	return nil
}

// Leave releases every lease and the node's registration (a clean stop).
func (n *Node) Leave(ctx context.Context) error {
	n.tickMu.Lock()
	defer n.tickMu.Unlock()
	var errs []error
	for s := range n.fence.grants() {
		errs = append(errs, n.release(ctx, s))
	}
	n.devMu.Lock()
	devs := make([]DeviceRef, 0, len(n.devices))
	for d := range n.devices {
		devs = append(devs, d)
	}
	n.devMu.Unlock()
	for _, d := range devs {
		errs = append(errs, n.reg.RemoveDevice(ctx, n.cfg.NodeID, d))
	}
	errs = append(errs, n.reg.Leave(ctx, n.cfg.NodeID))
	n.m.held.Set(0)
	return errors.Join(errs...)
}

// DeviceConnected records that dev's socket is on this node, in Redis now
// and at every refresh until DeviceDisconnected.
func (n *Node) DeviceConnected(ctx context.Context, dev DeviceRef) error {
	n.devMu.Lock()
	n.devices[dev] = struct{}{}
	n.devMu.Unlock()
	return n.reg.SetDevices(ctx, n.cfg.NodeID, []DeviceRef{dev}, n.cfg.RegistryTTL)
}

// DeviceDisconnected forgets dev's socket on this node.
func (n *Node) DeviceDisconnected(ctx context.Context, dev DeviceRef) error {
	n.devMu.Lock()
	delete(n.devices, dev)
	n.devMu.Unlock()
	return n.reg.RemoveDevice(ctx, n.cfg.NodeID, dev)
}

func (n *Node) refreshDevices(ctx context.Context) error {
	now := n.cfg.Clock()
	if now.Sub(n.lastDevices) < n.cfg.RegistryTTL/3 {
		return nil
	}
	n.devMu.Lock()
	devs := make([]DeviceRef, 0, len(n.devices))
	for d := range n.devices {
		devs = append(devs, d)
	}
	n.devMu.Unlock()
	if err := n.reg.SetDevices(ctx, n.cfg.NodeID, devs, n.cfg.RegistryTTL); err != nil {
		return err
	}
	n.lastDevices = now
	return nil
}

// Registry is the cluster's node and device registry.
func (n *Node) Registry() *Registry { return n.reg }

// Leases is the cluster's lease layer.
func (n *Node) Leases() *Leases { return n.leases }

// Meta is the cluster record from the last join (zero before it).
func (n *Node) Meta() Meta {
	if m := n.meta.Load(); m != nil {
		return *m
	}
	return Meta{}
}
