package cluster

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// NodeInfo is a node's registration: where clients and other nodes reach it.
type NodeInfo struct {
	ID        string
	Advertise string // URL clients are redirected to and nodes send to
	Instance  string // random per process start
	Started   time.Time
	Heartbeat time.Time
	// Alive: the registration has not expired (the node heartbeats).
	Alive bool
}

// DeviceRef names one device of an account.
type DeviceRef struct {
	Username string
	Device   uint32
}

// Registry is the Redis side of the connection registry: node → advertise
// URL, and device → node of its socket, each with a TTL refreshed by the
// owner's heartbeats, so a node that dies leaves nothing that outlives it
// by more than a TTL.
type Registry struct {
	rdb  redis.UniversalClient
	keys keys
}

// NewRegistry returns the registry of the cluster under prefix ("" is
// DefaultPrefix).
func NewRegistry(rdb redis.UniversalClient, prefix string) *Registry {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return &Registry{rdb: rdb, keys: keys{prefix}}
}

// Heartbeat (re)registers a node for ttl.
func (r *Registry) Heartbeat(ctx context.Context, n NodeInfo, ttl time.Duration) error {
	k := r.keys.node(n.ID)
	_, err := r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.HSet(ctx, k, "advertise", n.Advertise, "instance", n.Instance,
			"started_ms", n.Started.UnixMilli(), "heartbeat_ms", n.Heartbeat.UnixMilli())
		p.PExpire(ctx, k, ttl)
		p.SAdd(ctx, r.keys.nodes(), n.ID)
		return nil
	})
	if err != nil {
		return fmt.Errorf("%w: heartbeat: %w", ErrRedis, err)
	}
	return nil
}

// Leave removes a node's registration (a clean stop); it stays in the node
// index so status still lists it, as not alive.
func (r *Registry) Leave(ctx context.Context, id string) error {
	if err := r.rdb.Del(ctx, r.keys.node(id)).Err(); err != nil {
		return fmt.Errorf("%w: leave: %w", ErrRedis, err)
	}
	return nil
}

func msTime(s string) time.Time {
	ms, err := strconv.ParseInt(s, 10, 64)
	if err != nil || ms <= 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms)
}

// Node returns one node's registration; ok is false if it expired or never
// existed.
func (r *Registry) Node(ctx context.Context, id string) (NodeInfo, bool, error) {
	m, err := r.rdb.HGetAll(ctx, r.keys.node(id)).Result()
	if err != nil {
		return NodeInfo{}, false, fmt.Errorf("%w: node %s: %w", ErrRedis, id, err)
	}
	if len(m) == 0 {
		return NodeInfo{ID: id}, false, nil
	}
	return NodeInfo{ID: id, Advertise: m["advertise"], Instance: m["instance"],
		Started: msTime(m["started_ms"]), Heartbeat: msTime(m["heartbeat_ms"]), Alive: true}, true, nil
}

// Nodes returns every node that ever registered in this Redis, alive or
// not, sorted by id.
func (r *Registry) Nodes(ctx context.Context) ([]NodeInfo, error) {
	ids, err := r.rdb.SMembers(ctx, r.keys.nodes()).Result()
	if err != nil {
		return nil, fmt.Errorf("%w: nodes: %w", ErrRedis, err)
	}
	sort.Strings(ids)
	out := make([]NodeInfo, 0, len(ids))
	for _, id := range ids {
		n, _, err := r.Node(ctx, id)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

// registryChunk bounds one pipeline of device refreshes.
const registryChunk = 512

// SetDevices records that devs have their sockets on node, for ttl.
func (r *Registry) SetDevices(ctx context.Context, node string, devs []DeviceRef, ttl time.Duration) error {
	for len(devs) > 0 {
		chunk := devs[:min(len(devs), registryChunk)]
		devs = devs[len(chunk):]
		_, err := r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, d := range chunk {
				p.Set(ctx, r.keys.device(d.Username, d.Device), node, ttl)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("%w: set devices: %w", ErrRedis, err)
		}
	}
	return nil
}

// removeDeviceScript deletes a device entry only if it still names the node.
var removeDeviceScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
`)

// RemoveDevice forgets dev's socket on node; an entry naming another node
// (the device reconnected elsewhere) is left alone.
func (r *Registry) RemoveDevice(ctx context.Context, node string, dev DeviceRef) error {
	if err := removeDeviceScript.Run(ctx, r.rdb, []string{r.keys.device(dev.Username, dev.Device)}, node).Err(); err != nil {
		return fmt.Errorf("%w: remove device: %w", ErrRedis, err)
	}
	return nil
}

// Device returns the node holding dev's socket; ok is false if none.
func (r *Registry) Device(ctx context.Context, dev DeviceRef) (node string, ok bool, err error) {
	node, err = r.rdb.Get(ctx, r.keys.device(dev.Username, dev.Device)).Result()
	if errors.Is(err, redis.Nil) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("%w: device: %w", ErrRedis, err)
	}
	return node, true, nil
}
