package main

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/internal/redistest"
	"github.com/ferryhq/ferry/store"
)

// TestClusterStatusCommand: `ferryd cluster status` against a real Redis
// holding a one-node cluster, as text and JSON, and against an empty one.
func TestClusterStatusCommand(t *testing.T) {
	srv := redistest.Start(t)
	run := func(args ...string) (string, int) {
		t.Helper()
		out, err := exec.Command(filepath.Join(binDir, "ferryd"), append([]string{"cluster", "status", "--redis", srv.URL()}, args...)...).CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	if out, code := run(); code != 3 || !strings.Contains(out, "no cluster") {
		t.Fatalf("status of an empty Redis: exit %d\n%s", code, out)
	}

	rdb, err := cluster.NewRedis(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	n, err := cluster.NewNode(rdb, cluster.NewStore(db), cluster.Config{NodeID: "node-1", Bootstrap: true, Shards: 4,
		Advertise: "ws://127.0.0.1:7601", LeaseTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Tick(ctx); err != nil {
		t.Fatal(err)
	}

	out, code := run()
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	for _, want := range []string{"4 shards", "node-1", "alive", "ws://127.0.0.1:7601", "4 of 4 shards owned"} {
		if !strings.Contains(out, want) {
			t.Fatalf("status lacks %q:\n%s", want, out)
		}
	}
	out, code = run("--json")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	var st cluster.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if st.Meta.Shards != 4 || len(st.Shards) != 4 || len(st.Nodes) != 1 || st.Nodes[0].Held != 4 {
		t.Fatalf("json status: %+v", st)
	}
	for _, s := range st.Shards {
		if s.Owner != "node-1" || s.Epoch != 1 {
			t.Fatalf("shard %+v", s)
		}
	}
}
