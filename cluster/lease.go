package cluster

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Errors of the lease layer.
var (
	// ErrHeld: the shard's lease is held by another node (see *HeldError).
	ErrHeld = errors.New("cluster: lease held by another node")
	// ErrNotFresh: a fresh claim found a shard that was owned before.
	ErrNotFresh = errors.New("cluster: shard was owned before")
	// ErrLost: a renewal or release found the lease gone or someone else's.
	ErrLost = errors.New("cluster: lease lost")
	// ErrRedis wraps failures to talk to Redis; they are retryable.
	ErrRedis = errors.New("cluster: redis")
	// ErrBadLease: a lease value in Redis does not parse.
	ErrBadLease = errors.New("cluster: malformed lease value")
	// ErrNodeID: a node id is not [a-z0-9_-]{1,64}.
	ErrNodeID = errors.New("cluster: bad node id")
)

var nodeIDRe = regexp.MustCompile(`^[a-z0-9_-]{1,64}$`)

// ValidNodeID reports whether id can name a node (it is part of Redis
// values separated by '|', and of log lines).
func ValidNodeID(id string) error {
	if !nodeIDRe.MatchString(id) {
		return fmt.Errorf("%w %q", ErrNodeID, id)
	}
	return nil
}

// Holder names a lease holder: the node and the process instance (random per
// start), so a restarted node is a new holder and gets a new epoch.
type Holder struct{ Node, Instance string }

// Lease is one shard's lease as Redis holds it.
type Lease struct {
	Shard ShardID
	Holder
	Epoch uint64
	// TTL is what Redis had left when it was read (0 if unknown).
	TTL time.Duration
}

// HeldError says who holds a shard another node asked for.
type HeldError struct{ Lease Lease }

func (e *HeldError) Error() string {
	return fmt.Sprintf("%v: shard %d held by %s at epoch %d", ErrHeld, e.Lease.Shard, e.Lease.Node, e.Lease.Epoch)
}
func (e *HeldError) Unwrap() error { return ErrHeld }

// keys builds the Redis key names of a cluster. A shard's lease and epoch
// share a hash tag so that one Lua script may touch both on Redis Cluster.
//
//	P meta                 hash: id, shards, created_ms, recovered
//	P {sN}:lease           string "node|instance|epoch", PX = lease TTL
//	P {sN}:epoch           integer, the shard's last epoch; never expires
//	P nodes                set of node ids (index for status)
//	P node:ID              hash: advertise, instance, started_ms, heartbeat_ms; PX
//	P dev:USER:DEVICE      node id of the device's socket; PX
type keys struct{ prefix string }

func (k keys) meta() string  { return k.prefix + "meta" }
func (k keys) nodes() string { return k.prefix + "nodes" }
func (k keys) node(id string) string {
	return k.prefix + "node:" + id
}
func (k keys) lease(s ShardID) string {
	return k.prefix + "{s" + s.String() + "}:lease"
}
func (k keys) epoch(s ShardID) string {
	return k.prefix + "{s" + s.String() + "}:epoch"
}
func (k keys) device(username string, device uint32) string {
	return k.prefix + "dev:" + username + ":" + strconv.FormatUint(uint64(device), 10)
}

// DefaultPrefix starts every Redis key of a cluster.
const DefaultPrefix = "ferry:"

// acquireScript takes a shard's lease.
//
//	KEYS[1] lease, KEYS[2] epoch
//	ARGV[1] node, ARGV[2] instance, ARGV[3] ttl ms, ARGV[4] epoch floor,
//	ARGV[5] "fresh" to take only a shard never owned (no epoch key)
//
// Returns {1, epoch} when the caller holds it (taken or, if it already held
// it, renewed), {0, lease value, pttl} when another node holds it, and
// {2, epoch} when a fresh claim found the shard owned before.
//
// The new epoch is max(stored epoch, floor) + 1: it grows with every new
// holder, and the floor (the highest epoch the claimant has seen, kept in
// its Pebble) keeps it from going backwards when Redis lost the counter.
// The same node with a new instance (a restart) takes its own lease over at
// once, with a new epoch; a different node waits for the lease to expire.
var acquireScript = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if cur then
  local node, inst = string.match(cur, '^([^|]*)|([^|]*)|')
  if node == ARGV[1] and inst == ARGV[2] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {1, string.match(cur, '|(%d+)$')}
  end
  if node ~= ARGV[1] then
    return {0, cur, redis.call('PTTL', KEYS[1])}
  end
end
local stored = redis.call('GET', KEYS[2])
if ARGV[5] == 'fresh' and stored then
  return {2, stored}
end
local e = tonumber(stored or '0')
local floor = tonumber(ARGV[4])
if floor > e then
  redis.call('SET', KEYS[2], ARGV[4])
end
e = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2] .. '|' .. e, 'PX', ARGV[3])
return {1, tostring(e)}
`)

// renewScript extends a lease only if it is still exactly the caller's.
var renewScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
`)

// releaseScript deletes a lease only if it is still exactly the caller's.
var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
`)

// Leases is the Redis side of shard leases. It holds no state of its own.
type Leases struct {
	rdb  redis.UniversalClient
	keys keys
}

// NewLeases returns the lease operations of the cluster under prefix ("" is
// DefaultPrefix).
func NewLeases(rdb redis.UniversalClient, prefix string) *Leases {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return &Leases{rdb: rdb, keys: keys{prefix}}
}

func leaseValue(h Holder, epoch uint64) string {
	return h.Node + "|" + h.Instance + "|" + strconv.FormatUint(epoch, 10)
}

// parseLease parses "node|instance|epoch" (outside bytes: from Redis).
func parseLease(s ShardID, v string) (Lease, error) {
	parts := strings.Split(v, "|")
	if len(parts) != 3 || ValidNodeID(parts[0]) != nil || parts[1] == "" {
		return Lease{}, fmt.Errorf("%w: shard %d", ErrBadLease, s)
	}
	e, err := strconv.ParseUint(parts[2], 10, 64)
	if err != nil || e == 0 {
		return Lease{}, fmt.Errorf("%w: shard %d epoch", ErrBadLease, s)
	}
	return Lease{Shard: s, Holder: Holder{Node: parts[0], Instance: parts[1]}, Epoch: e}, nil
}

// Acquire takes (or renews, if h already holds it) shard's lease for ttl
// and returns its epoch. Another node's live lease is a *HeldError. floor
// is the highest epoch the caller has ever seen for the shard.
func (l *Leases) Acquire(ctx context.Context, shard ShardID, h Holder, ttl time.Duration, floor uint64) (uint64, error) {
	return l.acquire(ctx, shard, h, ttl, floor, false)
}

// ClaimFresh is Acquire for a shard that was never owned in this Redis (no
// epoch key); a shard owned before gives ErrNotFresh, so a claim can never
// re-create a shard whose data lives on another node.
func (l *Leases) ClaimFresh(ctx context.Context, shard ShardID, h Holder, ttl time.Duration, floor uint64) (uint64, error) {
	return l.acquire(ctx, shard, h, ttl, floor, true)
}

func (l *Leases) acquire(ctx context.Context, shard ShardID, h Holder, ttl time.Duration, floor uint64, fresh bool) (uint64, error) {
	mode := ""
	if fresh {
		mode = "fresh"
	}
	res, err := acquireScript.Run(ctx, l.rdb, []string{l.keys.lease(shard), l.keys.epoch(shard)},
		h.Node, h.Instance, ttl.Milliseconds(), floor, mode).Slice()
	if err != nil {
		return 0, fmt.Errorf("%w: acquire shard %d: %w", ErrRedis, shard, err)
	}
	return decodeAcquire(shard, res)
}

func decodeAcquire(shard ShardID, res []any) (uint64, error) {
	if len(res) < 2 {
		return 0, fmt.Errorf("%w: acquire shard %d: reply %v", ErrRedis, shard, res)
	}
	code, _ := res[0].(int64)
	val, _ := res[1].(string)
	switch code {
	case 1, 2:
		e, err := strconv.ParseUint(val, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%w: shard %d epoch %q", ErrBadLease, shard, val)
		}
		if code == 2 {
			return e, fmt.Errorf("%w: shard %d (epoch %d)", ErrNotFresh, shard, e)
		}
		return e, nil
	case 0:
		lease, err := parseLease(shard, val)
		if err != nil {
			return 0, err
		}
		if len(res) > 2 {
			if ms, ok := res[2].(int64); ok && ms > 0 {
				lease.TTL = time.Duration(ms) * time.Millisecond
			}
		}
		return 0, &HeldError{Lease: lease}
	}
	return 0, fmt.Errorf("%w: acquire shard %d: reply %v", ErrRedis, shard, res)
}

// Renew extends h's lease on shard at epoch for ttl. ErrLost means the
// lease expired or another holder has it: stop serving the shard.
func (l *Leases) Renew(ctx context.Context, shard ShardID, h Holder, epoch uint64, ttl time.Duration) error {
	n, err := renewScript.Run(ctx, l.rdb, []string{l.keys.lease(shard)}, leaseValue(h, epoch), ttl.Milliseconds()).Int()
	if err != nil {
		return fmt.Errorf("%w: renew shard %d: %w", ErrRedis, shard, err)
	}
	if n != 1 {
		return fmt.Errorf("%w: shard %d epoch %d", ErrLost, shard, epoch)
	}
	return nil
}

// RenewAll renews many leases in one pipeline; errs[i] is the result of
// shards[i] (nil, ErrLost or ErrRedis).
func (l *Leases) RenewAll(ctx context.Context, h Holder, shards []ShardID, epochs []uint64, ttl time.Duration) []error {
	errs := make([]error, len(shards))
	if len(shards) == 0 {
		return errs
	}
	_ = renewScript.Load(ctx, l.rdb).Err() // EVALSHA in a pipeline needs the script loaded
	cmds := make([]*redis.Cmd, len(shards))
	_, err := l.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, s := range shards {
			cmds[i] = renewScript.EvalSha(ctx, p, []string{l.keys.lease(s)}, leaseValue(h, epochs[i]), ttl.Milliseconds())
		}
		return nil
	})
	for i, c := range cmds {
		n, cerr := c.Int()
		switch {
		case cerr != nil:
			if err == nil {
				err = cerr
			}
			errs[i] = fmt.Errorf("%w: renew shard %d: %w", ErrRedis, shards[i], cerr)
		case n != 1:
			errs[i] = fmt.Errorf("%w: shard %d epoch %d", ErrLost, shards[i], epochs[i])
		}
	}
	return errs
}

// Release gives up h's lease (a clean stop or a move), so the next holder
// need not wait for the TTL. Releasing a lease that is not h's any more is
// ErrLost and changes nothing.
func (l *Leases) Release(ctx context.Context, shard ShardID, h Holder, epoch uint64) error {
	n, err := releaseScript.Run(ctx, l.rdb, []string{l.keys.lease(shard)}, leaseValue(h, epoch)).Int()
	if err != nil {
		return fmt.Errorf("%w: release shard %d: %w", ErrRedis, shard, err)
	}
	if n != 1 {
		return fmt.Errorf("%w: shard %d epoch %d", ErrLost, shard, epoch)
	}
	return nil
}

// Get reads shard's lease; ok is false when nobody holds it. epoch is the
// shard's last epoch either way (0: never owned in this Redis).
func (l *Leases) Get(ctx context.Context, shard ShardID) (lease Lease, ok bool, epoch uint64, err error) {
	var lv, ev *redis.StringCmd
	var pt *redis.DurationCmd
	_, err = l.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		lv = p.Get(ctx, l.keys.lease(shard))
		pt = p.PTTL(ctx, l.keys.lease(shard))
		ev = p.Get(ctx, l.keys.epoch(shard))
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return Lease{}, false, 0, fmt.Errorf("%w: get shard %d: %w", ErrRedis, shard, err)
	}
	return decodeGet(shard, lv, pt, ev)
}

func decodeGet(shard ShardID, lv *redis.StringCmd, pt *redis.DurationCmd, ev *redis.StringCmd) (Lease, bool, uint64, error) {
	var epoch uint64
	if s, err := ev.Result(); err == nil {
		epoch, _ = strconv.ParseUint(s, 10, 64)
	}
	v, err := lv.Result()
	if errors.Is(err, redis.Nil) {
		return Lease{}, false, epoch, nil
	}
	if err != nil {
		return Lease{}, false, epoch, fmt.Errorf("%w: get shard %d: %w", ErrRedis, shard, err)
	}
	lease, err := parseLease(shard, v)
	if err != nil {
		return Lease{}, false, epoch, err
	}
	if d, err := pt.Result(); err == nil && d > 0 {
		lease.TTL = d
	}
	return lease, true, epoch, nil
}
