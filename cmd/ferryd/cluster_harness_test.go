package main

// Black-box harness for cluster mode (issue 7): a real redis-server
// (internal/redistest) and several ferryd processes on fixed free loopback
// ports (a node's advertise URL comes from --listen, so the port must be
// known before it starts and kept across restarts).

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/internal/redistest"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/redis/go-redis/v9"
)

// clusterLeaseTTL is short so that expiries in the tests take seconds.
const clusterLeaseTTL = 3 * time.Second

// testCluster is a Redis and its ferryd nodes n1..nN.
type testCluster struct {
	t     *testing.T
	redis *redistest.Server
	rdb   redis.UniversalClient
	nodes []*server
	ids   []string
	smap  cluster.ShardMap
	used  map[string]bool // usernames handed out
	// secret is the cluster secret file (for ferryd cluster move/drain).
	secret string
	// addrs are the nodes' URLs, fixed at start (restarts keep them; read
	// here, not from the servers, which a restart writes).
	addrs []string
}

// startCluster starts Redis and n ferryd nodes (n1 bootstraps the cluster)
// and waits until every shard has an owner. It skips the test when
// redis-server is missing.
func startCluster(t *testing.T, n int) *testCluster {
	t.Helper()
	rs := redistest.Start(t)
	rdb, err := cluster.NewRedis(rs.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("cluster-e2e-secret-0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := &testCluster{t: t, redis: rs, rdb: rdb, used: map[string]bool{}, secret: secret}
	for i := range n {
		id := fmt.Sprint("n", i+1)
		args := []string{"--send-rate", "inf", "--register-rate", "inf", "--conn-rate", "inf", "--max-conns-per-ip", "0", "--redis", rs.URL(), "--node-id", id, "--cluster-secret-file", secret,
			"--cluster-expect-nodes", strconv.Itoa(n), "--cluster-lease-ttl", clusterLeaseTTL.String()}
		if i == 0 {
			args = append(args, "--cluster-bootstrap")
		}
		s := &server{t: t, data: t.TempDir(), args: args, log: &syncBuffer{}}
		s.start(freeAddr(t), args...)
		t.Cleanup(s.stop)
		c.nodes = append(c.nodes, s)
		c.ids = append(c.ids, id)
		c.addrs = append(c.addrs, s.url())
	}
	st := c.awaitStatus("every shard owned", func(st cluster.Status) bool { return owned(st) == st.Meta.Shards })
	c.smap, err = cluster.NewShardMap(st.Meta.Shards)
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range st.Nodes {
		if ns.Held == 0 {
			t.Fatalf("node %s holds no shard: %+v", ns.ID, st.Nodes)
		}
	}
	return c
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// owned counts the shards with an owner.
func owned(st cluster.Status) int {
	n := 0
	for _, s := range st.Shards {
		if s.Owner != "" {
			n++
		}
	}
	return n
}

func (c *testCluster) status() (cluster.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return cluster.ReadStatus(ctx, c.rdb, "")
}

// awaitStatus polls the cluster status until ok holds (generous deadline).
func (c *testCluster) awaitStatus(what string, ok func(cluster.Status) bool) cluster.Status {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := c.status()
		if err == nil && ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("cluster never reached %q: err %v, %d of %d shards owned, nodes %+v", what, err, owned(st), len(st.Shards), st.Nodes)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// node returns the index of the node with id.
func (c *testCluster) node(id string) int {
	for i, x := range c.ids {
		if x == id {
			return i
		}
	}
	c.t.Fatalf("no node %q", id)
	return -1
}

// ownerOf returns the index of the node that owns account now.
func (c *testCluster) ownerOf(account string) int {
	c.t.Helper()
	st, err := c.status()
	if err != nil {
		c.t.Fatal(err)
	}
	return c.node(st.Shards[c.smap.Account(account)].Owner)
}

// nameOn returns a new username whose shard node i owns now and, if
// notShards is given, whose shard is none of them.
func (c *testCluster) nameOn(prefix string, i int, notShards ...cluster.ShardID) string {
	c.t.Helper()
	st, err := c.status()
	if err != nil {
		c.t.Fatal(err)
	}
next:
	for k := 0; k < 100000; k++ {
		name := fmt.Sprintf("%s%03d", prefix, k)
		s := c.smap.Account(name)
		if c.used[name] || st.Shards[s].Owner != c.ids[i] {
			continue
		}
		for _, x := range notShards {
			if s == x {
				continue next
			}
		}
		c.used[name] = true
		return name
	}
	c.t.Fatalf("no username with prefix %s on %s", prefix, c.ids[i])
	return ""
}

// urls are the nodes' URLs, starting with node first (a device dials the
// next one when a node is down).
func (c *testCluster) urls(first int) []string {
	var out []string
	for k := range c.addrs {
		out = append(out, c.addrs[(first+k)%len(c.addrs)])
	}
	return out
}

// newDevice registers username through node via (which need not own it:
// the SDK follows the redirect) and returns a device that authenticates
// through any node, following redirects and trying the next node when one
// is down.
func (c *testCluster) newDevice(name string, via int) *crashDevice {
	c.t.Helper()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	d := &crashDevice{name: name, key: key, reg: 7}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, at, err := client.DialAs(ctx, c.addrs[via], client.DialOptions{ClientName: "cluster-test"}, func(conn *client.Conn) error {
		_, err := conn.Register(ctx, name, key, d.reg)
		return err
	})
	if err != nil {
		c.t.Fatalf("register %s via %s: %v", name, c.ids[via], err)
	}
	conn.Close()
	if owner := c.addrs[c.ownerOf(name)]; at != owner {
		c.t.Fatalf("register %s: connected to %s, owner is %s", name, at, owner)
	}
	attempt := 0
	d.dial = func(ctx context.Context) (*client.Conn, error) {
		us := c.urls(via)
		u := us[attempt%len(us)]
		attempt++
		conn, _, err := client.DialAs(ctx, u, client.DialOptions{ClientName: "cluster-test"}, func(conn *client.Conn) error {
			_, err := conn.Auth(ctx, name, 1, key, false)
			return err
		})
		return conn, err
	}
	return d
}

// send is one raw 1:1 send from conn to the device to (device 1).
func send(ctx context.Context, conn *client.Conn, id string, to *crashDevice) (uint64, error) {
	r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
		ClientMsgId: id, To: to.name, Ciphertexts: []*wirepb.DeviceCiphertext{{Username: to.name, DeviceId: 1,
			RegistrationId: to.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("ciphertext " + id)}}}}})
	if err != nil {
		return 0, err
	}
	return r.GetSend().Seq, nil
}

// mustConnect connects d (following redirects) or fails the test.
func mustConnect(t *testing.T, d *crashDevice) *client.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := d.connect(ctx)
	if err != nil {
		t.Fatalf("connect %s: %v", d.name, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// nextMessage returns the next SIGNAL envelope on conn, acking it (and any
// other envelope before it).
func nextMessage(t *testing.T, conn *client.Conn) *wirepb.Envelope {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case ev, ok := <-conn.Events():
			if !ok {
				t.Fatalf("connection closed while waiting for a message: %v", conn.Err())
			}
			env := ev.GetEnvelope()
			if env == nil {
				continue
			}
			go conn.Do(context.Background(), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
			if env.Type == wirepb.EnvelopeType_SIGNAL_MESSAGE {
				return env
			}
		case <-deadline:
			t.Fatal("no message within 30 s")
		}
	}
}

// retryable reports whether err is what a client retries: a retryable wire
// error (UNAVAILABLE) or a connection closed with a reconnect code.
func retryable(err error) bool {
	var we *wire.Error
	if errors.As(err, &we) {
		return we.Code == wirepb.ErrorCode_UNAVAILABLE
	}
	var ce *client.CloseError
	return errors.As(err, &ce) && ce.Reconnect() || errors.Is(err, client.ErrClosed)
}

// execFerryd runs the ferryd binary with args and returns its output.
func execFerryd(args ...string) (string, error) {
	out, err := exec.Command(filepath.Join(binDir, "ferryd"), args...).CombinedOutput()
	return string(out), err
}

// sumMetric sums every sample of name whose labels contain all of labels
// (`kind="append"` ...).
func sumMetric(m metricsText, name string, labels ...string) float64 {
	total := 0.0
	for _, l := range strings.Split(string(m), "\n") {
		if !strings.HasPrefix(l, name+"{") && !strings.HasPrefix(l, name+" ") {
			continue
		}
		ok := true
		for _, lb := range labels {
			ok = ok && strings.Contains(l, lb)
		}
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64)
		if err == nil {
			total += f
		}
	}
	return total
}
