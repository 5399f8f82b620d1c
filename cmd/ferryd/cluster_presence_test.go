package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/internal/redistest"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// startPresenceCluster starts ferryd nodes n1 (which creates the cluster) ..
// nN on one Redis, and waits until every shard is owned and each node
// holds some. It returns the nodes and the owner of each shard.
func startPresenceCluster(t *testing.T, redisURL string, count int, args ...string) ([]*server, []string) {
	t.Helper()
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("a cluster secret of the presence test"), 0o600); err != nil {
		t.Fatal(err)
	}
	var nodes []*server
	for i := 1; i <= count; i++ {
		addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
		a := append([]string{"--listen", addr, "--advertise", "ws://" + addr, "--redis", redisURL,
			"--node-id", fmt.Sprintf("n%d", i), "--cluster-secret-file", secret,
			"--cluster-expect-nodes", strconv.Itoa(count), "--cluster-lease-ttl", "6s"}, args...)
		if i == 1 {
			a = append(a, "--cluster-bootstrap")
		}
		nodes = append(nodes, startServer(t, t.TempDir(), a...))
	}
	rdb, err := cluster.NewRedis(redisURL)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := cluster.ReadStatus(ctx, rdb, "")
		cancel()
		if err == nil {
			owners := make([]string, len(st.Shards))
			held := map[string]int{}
			for i, s := range st.Shards {
				owners[i] = s.Owner
				if s.Owner != "" {
					held[s.Owner]++
				}
			}
			if len(held) == count && heldSum(held) == len(st.Shards) {
				return nodes, owners
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cluster did not settle: %+v, %v", st, err)
		}
		time.Sleep(100 * time.Millisecond) // polling Redis: there is no event to await
	}
}

func heldSum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// presenceNameOn returns prefix+N, the first such username whose shard node owns.
func presenceNameOn(t *testing.T, owners []string, prefix, node string) string {
	t.Helper()
	sm, err := cluster.NewShardMap(len(owners))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10000; i++ {
		n := prefix + strconv.Itoa(i)
		if owners[sm.Account(n)] == node {
			return n
		}
	}
	t.Fatalf("no %sN on %s", prefix, node)
	return ""
}

// A viewer on node n1 subscribed to an account of node n2 sees it go
// online and offline (SIGKILL of its receiving process, detected by n2's
// pings), gets its typing, and the device registry in Redis follows the
// receiving connection.
func TestBlackBoxClusterPresence(t *testing.T) {
	rs := redistest.Start(t)
	nodes, owners := startPresenceCluster(t, rs.URL(), 2,
		"--ping-interval", "1s", "--presence-flap-window", "200ms", "--cluster-presence-ttl", "3s")
	aliceName, bobName := presenceNameOn(t, owners, "alice", "n1"), presenceNameOn(t, owners, "bob", "n2")
	aliceHome, bobHome := t.TempDir(), t.TempDir()
	mustFerry(t, aliceHome, "--server", nodes[0].url(), "register", aliceName)
	mustFerry(t, bobHome, "--server", nodes[1].url(), "register", bobName)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	alice, err := client.Open(ctx, client.Options{Home: aliceHome})
	if err != nil {
		t.Fatal(err)
	}
	defer alice.Close()
	presence := make(chan *wirepb.PresenceInfo, 256)
	typing := make(chan *wirepb.TypingEvent, 256)
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		_ = alice.Receive(ctx, client.ReceiveOptions{Subscribe: []string{bobName}, Handle: func(ev client.Event) {
			switch {
			case ev.Presence != nil:
				select {
				case presence <- ev.Presence:
				default:
				}
			case ev.Typing != nil:
				select {
				case typing <- ev.Typing:
				default:
				}
			}
		}})
	}()
	defer func() { cancel(); <-recvDone }()
	awaitState := func(want wirepb.PresenceState) *wirepb.PresenceInfo {
		t.Helper()
		timeout := time.After(60 * time.Second)
		for {
			select {
			case p := <-presence:
				if p.Username == bobName && p.State == want {
					return p
				}
			case <-timeout:
				t.Fatalf("%s never saw %s %v\nn1:\n%s\nn2:\n%s", aliceName, bobName, want, nodes[0].log, nodes[1].log)
			}
		}
	}
	// The first answer: bob's registration connection came and went.
	awaitState(wirepb.PresenceState_OFFLINE)

	bob := background(t, bobHome, "recv", "--wait", "5m")
	awaitState(wirepb.PresenceState_ONLINE)
	// The device registry names bob's node while his socket is there.
	rdb, err := cluster.NewRedis(rs.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	registered := func() string {
		v, _ := rdb.Get(ctx, "ferry:dev:"+bobName+":1").Result()
		return v
	}
	pollUntil(t, "bob's device registered on n2", func() bool { return registered() == "n2" })

	// Typing from bob (on n2) reaches alice (on n1).
	deadline := time.After(60 * time.Second)
	for got := false; !got; {
		mustFerry(t, bobHome, "typing", aliceName)
		select {
		case ev := <-typing:
			if ev.Username != bobName || !ev.Typing {
				t.Fatalf("typing event %+v", ev)
			}
			got = true
		case <-time.After(500 * time.Millisecond): // paces the retries (rate limit), not a synchronization
		case <-deadline:
			t.Fatalf("alice never saw bob typing")
		}
	}

	if err := bob.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	if p := awaitState(wirepb.PresenceState_OFFLINE); p.LastSeenMs == 0 {
		t.Fatalf("offline without last seen: %+v", p)
	}
	pollUntil(t, "bob's device unregistered", func() bool { return registered() == "" })
}

// pollUntil polls cond (state in another process, with no event to await)
// until it holds, failing after a minute.
func pollUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
