package cluster

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferryhq/ferry/internal/redistest"
)

func TestNodeJoinRules(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	rdb := testClient(t, srv)

	// No cluster and no bootstrap: wait.
	b := testNode(t, rdb, nil, Config{NodeID: "b"})
	if err := b.Tick(ctx); !errors.Is(err, ErrNoCluster) {
		t.Fatalf("join without a cluster = %v, want ErrNoCluster", err)
	}
	a := testNode(t, rdb, nil, Config{NodeID: "a", Bootstrap: true, Shards: 8})
	if err := a.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	<-a.Ready()
	if sm, ok := a.ShardMap(); !ok || sm.Count() != 8 {
		t.Fatalf("shard map = %v, %v", sm, ok)
	}
	// Alone, a claims every never-owned shard.
	if got := len(a.Fence().Held()); got != 8 {
		t.Fatalf("a holds %d shards, want 8", got)
	}
	if err := b.Tick(ctx); err != nil {
		t.Fatalf("b joining: %v", err)
	}
	if got := len(b.Fence().Held()); got != 0 {
		t.Fatalf("b holds %d shards of a live node", got)
	}
	// Another shard count is refused.
	c := testNode(t, rdb, nil, Config{NodeID: "c", Shards: 16})
	if err := c.Tick(ctx); !errors.Is(err, ErrShardCount) {
		t.Fatalf("join with 16 shards = %v, want ErrShardCount", err)
	}
	// A data dir of another cluster is refused.
	db := memDB(t)
	if err := NewStore(db).SetCluster(ClusterRecord{ID: "other", Shards: 8}); err != nil {
		t.Fatal(err)
	}
	d := testNode(t, rdb, db, Config{NodeID: "d"})
	if err := d.Tick(ctx); !errors.Is(err, ErrWrongCluster) {
		t.Fatalf("join with another cluster's data = %v, want ErrWrongCluster", err)
	}
	// A data dir is bound to its node id.
	if _, err := NewNode(rdb, NewStore(db), Config{NodeID: "e"}); !errors.Is(err, ErrNodeID) {
		t.Fatalf("reusing d's data dir as e = %v, want ErrNodeID", err)
	}
	if _, err := NewNode(rdb, NewStore(memDB(t)), Config{NodeID: "Bad Name"}); !errors.Is(err, ErrNodeID) {
		t.Fatalf("bad node id = %v", err)
	}
}

// TestFencingAfterPause: a node paused longer than the TTL cannot pass
// Fence — first on its own clock, then because another node took the
// shard — and does not win it back.
func TestFencingAfterPause(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	rdb := testClient(t, srv)
	clk := &testClock{}
	const ttl = time.Second
	a := testNode(t, rdb, nil, Config{NodeID: "a", Bootstrap: true, Shards: 2, LeaseTTL: ttl, Clock: clk.now})
	b := testNode(t, rdb, nil, Config{NodeID: "b", NoFreshClaims: true, LeaseTTL: ttl})
	if err := a.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	epoch, ok := a.Fence().Epoch(0)
	if !ok {
		t.Fatal("a does not hold shard 0")
	}
	epoch1, ok := a.Fence().Epoch(1)
	if !ok {
		t.Fatal("a does not hold shard 1")
	}
	if err := a.Fence().Check(0, epoch); err != nil {
		t.Fatal(err)
	}

	// a is paused (no renewals) and its clock moves on: Fence fails locally,
	// though Redis may still hold a's lease.
	clk.jump(ttl)
	if err := a.Fence().Check(0, epoch); !errors.Is(err, ErrFenced) {
		t.Fatalf("after a pause of a TTL: %v, want ErrFenced", err)
	}

	// Redis expires the leases; b takes shard 0.
	leaseGone(t, a.Leases(), 0)
	leaseGone(t, a.Leases(), 1)
	be, err := b.Claim(ctx, 0)
	if err != nil || be <= epoch {
		t.Fatalf("b claims shard 0 = %d, %v; want an epoch above %d", be, err, epoch)
	}
	if err := b.Fence().Check(0, be); err != nil {
		t.Fatal(err)
	}

	// a wakes up: neither its old epoch nor a round of maintenance lets it
	// write for shard 0, and it gives the shard up as home.
	if err := a.Fence().Check(0, epoch); !errors.Is(err, ErrFenced) {
		t.Fatalf("old owner after takeover: %v", err)
	}
	_ = a.Tick(ctx)
	if e, ok := a.Fence().Epoch(0); ok {
		t.Fatalf("old owner holds shard 0 again at %d", e)
	}
	if r, _ := a.st.Shard(0); r.Home != 0 || r.Seen < be {
		t.Fatalf("old owner's record %+v: want no home, seen ≥ %d", r, be)
	}
	// Shard 1, which nobody took, a re-acquires with a new epoch.
	if e1, ok := a.Fence().Epoch(1); !ok || e1 <= epoch1 {
		t.Fatalf("shard 1 after the pause: %d, %v; want held above epoch %d", e1, ok, epoch1)
	}
	_ = a.Tick(ctx)
	if _, ok := a.Fence().Epoch(0); ok {
		t.Fatal("old owner took shard 0 back")
	}
	if err := b.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Fence().Check(0, be); err != nil {
		t.Fatalf("new owner after renewals: %v", err)
	}
}

// TestNodeRenewsAndLosesLease: renewals keep a lease for many TTLs; a lease
// that Redis hands to someone else is dropped at the next round.
func TestNodeRenewsAndLosesLease(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	rdb := testClient(t, srv)
	const ttl = time.Second
	a := testNode(t, rdb, nil, Config{NodeID: "a", Bootstrap: true, Shards: 1, LeaseTTL: ttl})
	if err := a.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	epoch, ok := a.Fence().Epoch(0)
	if !ok {
		t.Fatal("a holds nothing")
	}
	end := time.Now().Add(2 * ttl)
	for time.Now().Before(end) {
		time.Sleep(ttl / 10)
		if err := a.Tick(ctx); err != nil {
			t.Fatal(err)
		}
		if err := a.Fence().Check(0, epoch); err != nil {
			t.Fatalf("while renewing: %v", err)
		}
	}
	// Someone deletes and re-takes the lease behind a's back (an operator,
	// a bug): a's next renewal fails and a stops serving at once.
	if err := rdb.Del(ctx, a.keys.lease(0)).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Leases().Acquire(ctx, 0, Holder{"x", "i"}, time.Minute, 0); err != nil {
		t.Fatal(err)
	}
	_ = a.Tick(ctx)
	if err := a.Fence().Check(0, epoch); !errors.Is(err, ErrFenced) {
		t.Fatalf("after losing the lease: %v", err)
	}
}

// TestNodeRestartTakesItsLease: a restarted node (same data, new instance)
// takes its shards back at once with new epochs; the old instance, if it
// is somehow still running, is fenced.
func TestNodeRestartTakesItsLease(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	rdb := testClient(t, srv)
	db := memDB(t)
	a1 := testNode(t, rdb, db, Config{NodeID: "a", Bootstrap: true, Shards: 4, LeaseTTL: time.Minute})
	if err := a1.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	old := a1.Fence().Held()
	a2 := testNode(t, rdb, db, Config{NodeID: "a", LeaseTTL: time.Minute})
	if err := a2.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	now := a2.Fence().Held()
	if len(now) != 4 {
		t.Fatalf("restarted node holds %v", now)
	}
	for s, e := range now {
		if e <= old[s] {
			t.Fatalf("shard %d: epoch %d after restart, was %d", s, e, old[s])
		}
	}
	if err := a1.Tick(ctx); !errors.Is(err, ErrSuperseded) {
		t.Fatalf("old instance's round = %v, want ErrSuperseded", err)
	}
	if h := a1.Fence().Held(); len(h) != 0 {
		t.Fatalf("old instance still holds %v", h)
	}
	_ = a1.Tick(ctx)
	if err := a2.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	for s, e := range a2.Fence().Held() {
		if now[s] != e {
			t.Fatalf("shard %d changed hands after the old instance stopped: %d → %d", s, now[s], e)
		}
	}
}

// TestRedisRestartEmpty: Redis is killed and comes back with nothing; the
// nodes re-create the cluster record and re-register the shards they are
// home of, each at an epoch above every earlier one, and no shard changes
// hands or is claimed fresh.
func TestRedisRestartEmpty(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	rdb := testClient(t, srv)
	const ttl = 2 * time.Second
	clk := &testClock{}
	a := testNode(t, rdb, nil, Config{NodeID: "a", Bootstrap: true, Shards: 6, NoFreshClaims: true, LeaseTTL: ttl, Clock: clk.now})
	b := testNode(t, rdb, nil, Config{NodeID: "b", NoFreshClaims: true, LeaseTTL: ttl})
	for _, n := range []*Node{a, b} {
		if err := n.Tick(ctx); err != nil {
			t.Fatal(err)
		}
	}
	owner := map[ShardID]*Node{0: a, 1: a, 2: b, 3: b, 4: b}
	for s, n := range owner {
		if _, err := n.Claim(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	// Shard 4 moves from b to a (b releases, a claims): its epoch is 2 now,
	// and only a remembers it.
	if err := b.Release(ctx, 4); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Claim(ctx, 4); err != nil {
		t.Fatal(err)
	}
	owner[4] = a
	_ = b.Tick(ctx) // b sees a's epoch 2 and stops being shard 4's home
	if r, _ := b.st.Shard(4); r.Home != 0 {
		t.Fatalf("b still home of shard 4: %+v", r)
	}
	before := map[ShardID]uint64{}
	for s, n := range owner {
		e, ok := n.Fence().Epoch(s)
		if !ok {
			t.Fatalf("shard %d not held by %s", s, n.cfg.NodeID)
		}
		before[s] = e
	}

	srv.Restart()
	if n, _ := rdb.DBSize(ctx).Result(); n != 0 {
		t.Fatalf("redis came back with %d keys", n)
	}
	// The nodes heal it on their own rounds (the first may hit a dead
	// connection).
	eventuallyErr(t, "shards re-registered", func() (bool, error) {
		err := errors.Join(a.Tick(ctx), b.Tick(ctx))
		for s, n := range owner {
			if _, ok := n.Fence().Epoch(s); !ok {
				return false, err
			}
		}
		return true, nil
	})
	st, err := ReadStatus(ctx, rdb, "")
	if err != nil {
		t.Fatal(err)
	}
	if !st.Meta.Recovered || st.Meta.ID != a.meta.Load().ID || st.Meta.Shards != 6 {
		t.Fatalf("meta after recovery: %+v", st.Meta)
	}
	for s, n := range owner {
		e, _ := n.Fence().Epoch(s)
		if e <= before[s] {
			t.Fatalf("shard %d: epoch %d after the restart, %d before: went backwards", s, e, before[s])
		}
		if got := st.Shards[s]; got.Owner != n.cfg.NodeID || got.Epoch != e {
			t.Fatalf("shard %d in status: %+v, want %s at %d", s, got, n.cfg.NodeID, e)
		}
	}
	if got := st.Shards[5]; got.Owner != "" {
		t.Fatalf("never-owned shard 5 claimed after recovery: %+v", got)
	}

	// A recovered cluster claims nothing fresh, even from a node allowed to.
	c := testNode(t, rdb, nil, Config{NodeID: "c", LeaseTTL: ttl})
	if err := c.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if h := c.Fence().Held(); len(h) != 0 {
		t.Fatalf("new node claimed %v in a recovered cluster", h)
	}
	// And Redis dying for good makes the nodes stop serving at their
	// deadlines, not at the first failed round. a's clock stops just
	// before its deadline, then reaches it.
	if err := a.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := a.fence.grants()[0].deadline
	clk.freeze(deadline.Add(-time.Millisecond))
	srv.Kill()
	if err := a.Tick(ctx); !errors.Is(err, ErrRedis) {
		t.Fatalf("tick with redis down = %v, want ErrRedis", err)
	}
	if len(a.Fence().Held()) != 3 {
		t.Fatalf("a holds %v after one failed round, before its deadline; want its 3 shards", a.Fence().Held())
	}
	clk.freeze(deadline)
	_ = a.Tick(ctx)
	if h := a.Fence().Held(); len(h) != 0 {
		t.Fatalf("a still serves %v at its deadline with redis down", h)
	}
	if _, ok := a.fence.grants()[0]; ok {
		t.Fatal("a's round at the deadline did not revoke shard 0")
	}
}

// TestNodesRaceForShards: nodes joining at once, racing for every fresh
// shard: each shard ends with exactly one owner, in Redis and in the
// fences.
func TestNodesRaceForShards(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	rdb := testClient(t, srv)
	const shards = 64
	nodes := make([]*Node, 3)
	for i := range nodes {
		nodes[i] = testNode(t, rdb, nil, Config{NodeID: string(rune('a' + i)), Bootstrap: true, Shards: shards, LeaseTTL: 5 * time.Second})
	}
	for round := 0; round < 4; round++ {
		var wg sync.WaitGroup
		for _, n := range nodes {
			wg.Add(1)
			go func() { defer wg.Done(); _ = n.Tick(ctx) }()
		}
		wg.Wait()
	}
	st, err := ReadStatus(ctx, rdb, "")
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	for _, n := range nodes {
		ids[n.Meta().ID] = true
	}
	if len(ids) != 1 {
		t.Fatalf("nodes joined %d different clusters", len(ids))
	}
	for s := range ShardID(shards) {
		var holders []string
		for _, n := range nodes {
			if e, ok := n.Fence().Epoch(s); ok {
				holders = append(holders, n.cfg.NodeID)
				if st.Shards[s].Epoch != e {
					t.Fatalf("shard %d: fence epoch %d, redis %d", s, e, st.Shards[s].Epoch)
				}
			}
		}
		if len(holders) != 1 || st.Shards[s].Owner != holders[0] {
			t.Fatalf("shard %d: fences %v, redis owner %q; want exactly one, the same", s, holders, st.Shards[s].Owner)
		}
	}
	var text bytes.Buffer
	if err := st.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"64 shards", "64 of 64 shards owned", "alive"} {
		if !strings.Contains(text.String(), want) {
			t.Fatalf("status text lacks %q:\n%s", want, text.String())
		}
	}
}

func TestRegistry(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	rdb := testClient(t, srv)
	a := testNode(t, rdb, nil, Config{NodeID: "a", Bootstrap: true, Shards: 2, Advertise: "ws://a.example:7600", RegistryTTL: 1500 * time.Millisecond})
	if err := a.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	reg := a.Registry()
	info, ok, err := reg.Node(ctx, "a")
	if err != nil || !ok || info.Advertise != "ws://a.example:7600" || info.Instance != a.Holder().Instance {
		t.Fatalf("node a = %+v, %v, %v", info, ok, err)
	}
	dev := DeviceRef{"alice", 2}
	if err := a.DeviceConnected(ctx, dev); err != nil {
		t.Fatal(err)
	}
	if node, ok, err := reg.Device(ctx, dev); err != nil || !ok || node != "a" {
		t.Fatalf("device = %q, %v, %v", node, ok, err)
	}
	// Heartbeats keep it past its TTL.
	end := time.Now().Add(2 * time.Second)
	for time.Now().Before(end) {
		time.Sleep(100 * time.Millisecond)
		if err := a.Tick(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok, _ := reg.Device(ctx, dev); !ok {
		t.Fatal("device entry expired despite heartbeats")
	}
	// A device that moved on to another node is not removed by the old one.
	if err := reg.SetDevices(ctx, "b", []DeviceRef{dev}, time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := a.DeviceDisconnected(ctx, dev); err != nil {
		t.Fatal(err)
	}
	if node, _, _ := reg.Device(ctx, dev); node != "b" {
		t.Fatalf("device = %q after a's disconnect, want b", node)
	}
	if err := reg.RemoveDevice(ctx, "b", dev); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := reg.Device(ctx, dev); ok {
		t.Fatal("device still registered")
	}
	// Without heartbeats the node's entry expires; status shows it gone.
	if err := a.DeviceConnected(ctx, DeviceRef{"bob", 1}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "registrations to expire", func() bool {
		_, okN, _ := reg.Node(ctx, "a")
		_, okD, _ := reg.Device(ctx, DeviceRef{"bob", 1})
		return !okN && !okD
	})
	nodes, err := reg.Nodes(ctx)
	if err != nil || len(nodes) != 1 || nodes[0].Alive {
		t.Fatalf("nodes = %+v, %v; want a, not alive", nodes, err)
	}
	// Leave releases the leases at once.
	if err := a.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := ReadStatus(ctx, rdb, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st.Shards {
		if s.Owner != "" {
			t.Fatalf("shard %d still owned after Leave: %+v", s.Shard, s)
		}
	}
	if _, err := ReadStatus(ctx, rdb, "other:"); !errors.Is(err, ErrNoCluster) {
		t.Fatalf("status of an absent cluster = %v", err)
	}
}

// TestNodeRun: Run keeps leases over many TTLs and leaves on cancel.
func TestNodeRun(t *testing.T) {
	srv := redistest.Start(t)
	rdb := testClient(t, srv)
	const ttl = 1500 * time.Millisecond
	a := testNode(t, rdb, nil, Config{NodeID: "a", Bootstrap: true, Shards: 3, LeaseTTL: ttl})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	<-a.Ready()
	eventually(t, "three shards held", func() bool { return len(a.Fence().Held()) == 3 })
	epochs := a.Fence().Held()
	time.Sleep(2 * ttl) // let two TTLs pass under renewal
	for s, e := range a.Fence().Held() {
		if epochs[s] != e {
			t.Fatalf("shard %d re-acquired (%d → %d): renewals did not keep it", s, epochs[s], e)
		}
	}
	if len(a.Fence().Held()) != 3 {
		t.Fatalf("held after 2 TTLs: %v", a.Fence().Held())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if h := a.Fence().Held(); len(h) != 0 {
		t.Fatalf("held after Run returned: %v", h)
	}
}

// With ServeThroughOutage a node keeps its shards while Redis is down, past
// every deadline, and takes them back at higher epochs once Redis returns
// empty; a lease found taken when Redis answers again is dropped.
func TestServeThroughOutage(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	rdb := testClient(t, srv)
	clk := &testClock{}
	a := testNode(t, rdb, nil, Config{NodeID: "a", Bootstrap: true, Shards: 3, ServeThroughOutage: true, Clock: clk.now})
	if err := a.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	before := a.Fence().Held()
	if len(before) != 3 {
		t.Fatalf("a holds %v, want 3 shards", before)
	}
	srv.Kill()
	for range 3 {
		clk.jump(5 * time.Second) // past a 2 s TTL each time
		if err := a.Tick(ctx); !errors.Is(err, ErrRedis) {
			t.Fatalf("tick with redis down = %v, want ErrRedis", err)
		}
		if h := a.Fence().Held(); len(h) != 3 {
			t.Fatalf("a serves %v during the outage, want its 3 shards", h)
		}
	}
	srv.Restart()
	eventuallyErr(t, "shards re-acquired", func() (bool, error) {
		err := a.Tick(ctx)
		h := a.Fence().Held()
		for s, e := range before {
			if h[s] <= e {
				return false, err
			}
		}
		return true, nil
	})
	// Another node takes shard 0 while a cannot see Redis (an operator's
	// forced claim): when a reaches Redis again it drops the shard.
	srv.Kill()
	clk.jump(5 * time.Second)
	_ = a.Tick(ctx)
	if _, ok := a.Fence().Epoch(0); !ok {
		t.Fatal("a dropped shard 0 during the outage")
	}
	srv.Restart()
	other := NewLeases(rdb, "")
	eventuallyErr(t, "shard 0 taken by b", func() (bool, error) {
		_, err := other.Acquire(ctx, 0, Holder{Node: "b", Instance: "x"}, time.Minute, 100)
		return err == nil, err
	})
	eventuallyErr(t, "a drops shard 0", func() (bool, error) {
		err := a.Tick(ctx)
		_, ok := a.Fence().Epoch(0)
		return !ok, err
	})
}
