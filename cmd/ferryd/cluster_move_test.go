package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ferryhq/ferry/cluster"
)

// nameOnShard returns a new username on shard s.
func (c *testCluster) nameOnShard(prefix string, s cluster.ShardID) string {
	c.t.Helper()
	for k := 0; k < 1000000; k++ {
		name := fmt.Sprintf("%s%04d", prefix, k)
		if !c.used[name] && c.smap.Account(name) == s {
			c.used[name] = true
			return name
		}
	}
	c.t.Fatalf("no username with prefix %s on shard %d", prefix, s)
	return ""
}

// move runs `ferryd cluster move SHARD NODE` and checks the new owner.
func (c *testCluster) move(s cluster.ShardID, to string) {
	c.t.Helper()
	before, err := c.status()
	if err != nil {
		c.t.Fatal(err)
	}
	out := runFerryd(c.t, "cluster", "move", fmt.Sprint(s), to, "--redis", c.redis.URL(), "--cluster-secret-file", c.secret)
	c.t.Logf("move: %s", strings.TrimSpace(out))
	st := c.awaitStatus(fmt.Sprintf("shard %d on %s", s, to), func(st cluster.Status) bool { return st.Shards[s].Owner == to })
	if st.Shards[s].Epoch <= before.Shards[s].Epoch {
		c.t.Fatalf("shard %d moved to %s at epoch %d, was %d", s, to, st.Shards[s].Epoch, before.Shards[s].Epoch)
	}
}

// TestClusterMoveUnderLoad: a shard moved under load from n1 to n2 and on
// to n3, then n1 drained (every shard it has left moved away) and stopped:
// every ✓'d message is delivered exactly once and in order (the same
// envelope ids: a redelivery after a move is the same envelope), and the
// moved accounts keep working on their new owners (clients are redirected).
func TestClusterMoveUnderLoad(t *testing.T) {
	c := startCluster(t, 3)
	first := c.nameOn("mv", 0)
	S := c.smap.Account(first)
	inS := func() string { return c.nameOnShard("mv", S) }
	dev := func(name string, via int) *crashDevice { return c.newDevice(name, via) }
	ps := []loadPair{
		{dev(c.nameOn("sa", 1), 1), dev(first, 0)},                // into S from n2
		{dev(c.nameOn("sb", 2), 2), dev(inS(), 1)},                // into S from n3
		{dev(inS(), 2), dev(c.nameOn("rc", 1), 1)},                // out of S to n2
		{dev(inS(), 0), dev(inS(), 2)},                            // within S
		{dev(c.nameOn("se", 0, S), 0), dev(c.nameOn("re", 2), 2)}, // elsewhere: n1 (not S) to n3
	}
	l := startLoadPairs(t, ps, 3*time.Minute)
	l.awaitRandomAcks("before the moves")
	c.move(S, "n2")
	l.awaitRandomAcks("after moving to n2")
	c.move(S, "n3")
	l.awaitRandomAcks("after moving to n3")

	out := runFerryd(t, "cluster", "drain", "n1", "--redis", c.redis.URL(), "--cluster-secret-file", c.secret)
	t.Logf("drain n1: %d shards moved", strings.Count(out, "\n"))
	st := c.awaitStatus("n1 drained", func(st cluster.Status) bool {
		for _, s := range st.Shards {
			if s.Owner == "n1" || s.Owner == "" {
				return false
			}
		}
		return true
	})
	_ = st
	l.awaitRandomAcks("after draining n1")
	c.nodes[0].stop() // retired: its clients go to the other nodes
	l.awaitRandomAcks("after stopping n1")
	n := l.finish("moves and a drain")
	t.Logf("%d messages ✓'d across two moves of shard %d and a drain of n1, every one delivered once, in order", n, S)
}
