package main

import (
	"bytes"
	"strings"

	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/ferryhq/ferry/route"
	"io"
	"os"
	"time"

	"github.com/ferryhq/ferry/cluster"
)

// clusterMain runs `ferryd cluster SUBCOMMAND ...`, the operator's view of a
// cluster (docs/cluster.md). It only talks to Redis; it never opens a data
// dir. Returns the exit code.
func clusterMain(args []string, stdout, stderr io.Writer) int {
	usage := func() {
		fmt.Fprintln(stderr, "usage: ferryd cluster status --redis URL [--prefix P] [--json]")
		fmt.Fprintln(stderr, "       ferryd cluster move SHARD NODE --redis URL --cluster-secret-file F [--prefix P]")
		fmt.Fprintln(stderr, "       ferryd cluster drain NODE --redis URL --cluster-secret-file F [--prefix P]")
	}
	if len(args) == 0 {
		usage()
		return 2
	}
	switch args[0] {
	case "status":
		fs := flag.NewFlagSet("ferryd cluster status", flag.ContinueOnError)
		fs.SetOutput(stderr)
		url := fs.String("redis", "", "Redis URL of the cluster (see docs/cluster.md for Sentinel and Redis Cluster forms)")
		prefix := fs.String("prefix", cluster.DefaultPrefix, "prefix of the cluster's Redis keys")
		asJSON := fs.Bool("json", false, "print JSON instead of tables")
		timeout := fs.Duration("timeout", 10*time.Second, "give up after this")
		if err := fs.Parse(args[1:]); err != nil {
			return 2
		}
		if *url == "" {
			fmt.Fprintln(stderr, "ferryd cluster status: --redis is required")
			return 2
		}
		if err := clusterStatus(*url, *prefix, *asJSON, *timeout, stdout); err != nil {
			fmt.Fprintln(stderr, "ferryd cluster status:", err)
			if errors.Is(err, cluster.ErrNoCluster) {
				return 3
			}
			return 1
		}
		return 0
	case "move", "drain":
		return clusterMove(args[0], args[1:], stdout, stderr)
	default:
		usage()
		return 2
	}
}

// clusterMove runs `ferryd cluster move SHARD NODE` and `ferryd cluster
// drain NODE` (every shard of NODE to the live node holding the fewest).
func clusterMove(cmd string, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("ferryd cluster "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	url := fs.String("redis", "", "Redis URL of the cluster")
	prefix := fs.String("prefix", cluster.DefaultPrefix, "prefix of the cluster's Redis keys")
	secretFile := fs.String("cluster-secret-file", "", "the cluster secret (authenticates the request to the node)")
	want := 2
	if cmd == "drain" {
		want = 1
	}
	// Positional arguments first, flags after (or the other way round).
	var pos []string
	rest := args
	for len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		pos, rest = append(pos, rest[0]), rest[1:]
	}
	if err := fs.Parse(rest); err != nil {
		return 2
	}
	pos = append(pos, fs.Args()...)
	if len(pos) != want || *url == "" || *secretFile == "" {
		fmt.Fprintf(stderr, "usage: ferryd cluster %s %s --redis URL --cluster-secret-file F\n", cmd, map[bool]string{true: "SHARD NODE", false: "NODE"}[cmd == "move"])
		return 2
	}
	secret, err := os.ReadFile(*secretFile)
	if err != nil {
		fmt.Fprintln(stderr, "ferryd cluster:", err)
		return 1
	}
	secret = bytes.TrimSpace(secret)
	rdb, err := cluster.NewRedis(*url)
	if err != nil {
		fmt.Fprintln(stderr, "ferryd cluster:", err)
		return 1
	}
	defer rdb.Close()
	ctx := context.Background()
	st, err := cluster.ReadStatus(ctx, rdb, *prefix)
	if err != nil {
		fmt.Fprintln(stderr, "ferryd cluster:", err)
		return 1
	}
	nodes := map[string]cluster.NodeStatus{}
	for _, n := range st.Nodes {
		nodes[n.ID] = n
	}
	type job struct {
		shard  cluster.ShardID
		target string
	}
	var jobs []job
	if cmd == "move" {
		s, err := route.ParseShard(pos[0])
		if err != nil || int(s) >= len(st.Shards) {
			fmt.Fprintf(stderr, "ferryd cluster move: no shard %q in a cluster of %d\n", pos[0], len(st.Shards))
			return 2
		}
		jobs = append(jobs, job{s, pos[1]})
	} else {
		held := map[string]int{}
		for _, sh := range st.Shards {
			held[sh.Owner]++
		}
		for _, sh := range st.Shards {
			if sh.Owner != pos[0] {
				continue
			}
			best := ""
			for _, n := range st.Nodes {
				if n.Alive && n.ID != pos[0] && (best == "" || held[n.ID] < held[best]) {
					best = n.ID
				}
			}
			if best == "" {
				fmt.Fprintln(stderr, "ferryd cluster drain: no other live node to take the shards")
				return 1
			}
			held[best]++
			jobs = append(jobs, job{sh.Shard, best})
		}
	}
	for _, j := range jobs {
		owner := st.Shards[j.shard].Owner
		src, ok := nodes[owner]
		if owner == "" || !ok || !src.Alive {
			fmt.Fprintf(stderr, "ferryd cluster %s: shard %d has no live owner\n", cmd, j.shard)
			return 1
		}
		res, err := route.Move(ctx, secret, src.Advertise, j.shard, j.target)
		if err != nil {
			fmt.Fprintf(stderr, "ferryd cluster %s: shard %d from %s to %s: %v\n", cmd, j.shard, owner, j.target, err)
			return 1
		}
		fmt.Fprintf(stdout, "shard %d: %s -> %s, epoch %d, %d records\n", j.shard, owner, j.target, res.GetEpoch(), res.GetRecords())
	}
	return 0
}

func clusterStatus(url, prefix string, asJSON bool, timeout time.Duration, w io.Writer) error {
	rdb, err := cluster.NewRedis(url)
	if err != nil {
		return err
	}
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	st, err := cluster.ReadStatus(ctx, rdb, prefix)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	return st.WriteText(w)
}

// runSubcommand handles ferryd's subcommands; ok is false for a plain
// server start (flags only), which keeps `ferryd --listen ...` unchanged.
func runSubcommand(args []string) (code int, ok bool) {
	if len(args) > 0 && args[0] == "cluster" {
		return clusterMain(args[1:], os.Stdout, os.Stderr), true
	}
	return 0, false
}
