package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
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
	default:
		usage()
		return 2
	}
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
