package cluster

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/internal/redistest"
	"github.com/ferryhq/ferry/store"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/logging"
)

func init() { logging.Disable() } // tests kill Redis; its reconnect chatter is noise

// testClient connects to srv with short timeouts (tests kill Redis).
func testClient(t *testing.T, srv *redistest.Server) redis.UniversalClient {
	t.Helper()
	c := redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:       []string{srv.Addr()},
		DialTimeout: 300 * time.Millisecond, ReadTimeout: time.Second, WriteTimeout: time.Second,
		MaxRetries: 2, MinRetryBackoff: 10 * time.Millisecond, MaxRetryBackoff: 50 * time.Millisecond,
	})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// testClock is real time plus an offset a test can jump (a simulated pause
// of the process: its clock moves, nothing else happens).
type testClock struct {
	mu     sync.Mutex
	offset time.Duration
	frozen time.Time // if set, the time, whatever the real one
}

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.frozen.IsZero() {
		return c.frozen
	}
	return time.Now().Add(c.offset)
}

// freeze stops the clock at t.
func (c *testClock) freeze(t time.Time) {
	c.mu.Lock()
	c.frozen = t
	c.mu.Unlock()
}

func (c *testClock) jump(d time.Duration) {
	c.mu.Lock()
	c.offset += d
	c.mu.Unlock()
}

func memDB(t *testing.T) *pebble.DB {
	t.Helper()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// testNode makes a node on its own in-memory Pebble unless db is given.
func testNode(t *testing.T, rdb redis.UniversalClient, db *pebble.DB, cfg Config) *Node {
	t.Helper()
	if db == nil {
		db = memDB(t)
	}
	if cfg.Log == nil {
		cfg.Log = quiet
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = 2 * time.Second
	}
	n, err := NewNode(rdb, NewStore(db), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it holds or 10 s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// eventuallyErr is eventually whose condition also reports its last
// error, printed on a timeout.
func eventuallyErr(t *testing.T, what string, cond func() (bool, error)) {
	t.Helper()
	var last error
	deadline := time.Now().Add(10 * time.Second)
	for {
		ok, err := cond()
		if ok {
			return
		}
		if err != nil {
			last = err
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for: %s (last error: %v)", what, last)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// leaseGone waits until Redis has expired shard's lease.
func leaseGone(t *testing.T, l *Leases, s ShardID) {
	t.Helper()
	eventually(t, "lease of shard "+s.String()+" to expire in redis", func() bool {
		_, ok, _, err := l.Get(context.Background(), s)
		return err == nil && !ok
	})
}
