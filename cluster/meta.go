package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// Errors of joining a cluster.
var (
	// ErrNoCluster: Redis holds no cluster and this node may not create one.
	ErrNoCluster = errors.New("cluster: no cluster in redis")
	// ErrWrongCluster: this data dir belongs to another cluster than Redis's.
	ErrWrongCluster = errors.New("cluster: data dir belongs to another cluster")
)

// Meta is the cluster's identity, written once at creation.
type Meta struct {
	ID      string
	Shards  int
	Created time.Time
	// Recovered: Redis lost the cluster (it restarted empty) and a member
	// re-created this record from its own store. In a recovered cluster no
	// shard is claimed fresh: a shard without an epoch key may have its data
	// on a node that has not re-registered yet.
	Recovered bool
}

// createMetaScript writes the meta hash unless it exists, then returns it.
var createMetaScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'shards', ARGV[2], 'created_ms', ARGV[3], 'recovered', ARGV[4])
end
return redis.call('HGETALL', KEYS[1])
`)

func newClusterID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func parseMeta(m map[string]string) (Meta, error) {
	n, err := strconv.Atoi(m["shards"])
	if err != nil || n < 1 || n > MaxShards || m["id"] == "" {
		return Meta{}, fmt.Errorf("%w: malformed meta %q", ErrRedis, m)
	}
	return Meta{ID: m["id"], Shards: n, Created: msTime(m["created_ms"]), Recovered: m["recovered"] == "1"}, nil
}

// readMeta returns the cluster's meta; ok is false if Redis has none.
func readMeta(ctx context.Context, rdb redis.UniversalClient, k keys) (Meta, bool, error) {
	m, err := rdb.HGetAll(ctx, k.meta()).Result()
	if err != nil {
		return Meta{}, false, fmt.Errorf("%w: meta: %w", ErrRedis, err)
	}
	if len(m) == 0 {
		return Meta{}, false, nil
	}
	meta, err := parseMeta(m)
	return meta, err == nil, err
}

// createMeta writes meta unless one exists, and returns the one in Redis.
func createMeta(ctx context.Context, rdb redis.UniversalClient, k keys, want Meta) (Meta, error) {
	rec := "0"
	if want.Recovered {
		rec = "1"
	}
	res, err := createMetaScript.Run(ctx, rdb, []string{k.meta()}, want.ID, want.Shards, want.Created.UnixMilli(), rec).StringSlice()
	if err != nil {
		return Meta{}, fmt.Errorf("%w: create meta: %w", ErrRedis, err)
	}
	m := make(map[string]string, len(res)/2)
	for i := 0; i+1 < len(res); i += 2 {
		m[res[i]] = res[i+1]
	}
	return parseMeta(m)
}
