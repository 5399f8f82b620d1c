package route

// Presence and the device registry across nodes (docs/cluster.md,
// "Presence and the registry across nodes").

import (
	"context"
	"sync"
	"time"

	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/presence"
	"github.com/ferryhq/ferry/wire"
)

// registryTimeout bounds one batch of registry writes.
const registryTimeout = 2 * time.Second

// devRegistry tells the node's device registry (Redis) which devices have
// their receiving connection here, off the connection's path: the relay
// only counts (a replacement connection of a device overlaps the one it
// replaces, so a device is gone when its count drops to 0), and one
// goroutine (RunRegistry) writes the devices whose count crossed 0.
// Bounded: both maps hold at most the devices connected here plus those
// that ended since the last write.
type devRegistry struct {
	wake chan struct{}

	mu    sync.Mutex
	conns map[cluster.DeviceRef]int      // guarded by mu: receiving connections here
	dirty map[cluster.DeviceRef]struct{} // guarded by mu: to write
}

func newDevRegistry() *devRegistry {
	return &devRegistry{wake: make(chan struct{}, 1), conns: map[cluster.DeviceRef]int{}, dirty: map[cluster.DeviceRef]struct{}{}}
}

func (d *devRegistry) add(dev cluster.DeviceRef, delta int) {
	d.mu.Lock()
	before := d.conns[dev]
	n := before + delta
	if n <= 0 {
		delete(d.conns, dev)
	} else {
		d.conns[dev] = n
	}
	if (before == 0) != (n <= 0) {
		d.dirty[dev] = struct{}{}
	}
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// DeviceConnected implements relay.Cluster: it never blocks.
func (r *Router) DeviceConnected(dev wire.DeviceAddr) {
	r.devs.add(cluster.DeviceRef{Username: dev.Account, Device: dev.Device}, 1)
}

// DeviceDisconnected implements relay.Cluster: it never blocks.
func (r *Router) DeviceDisconnected(dev wire.DeviceAddr) {
	r.devs.add(cluster.DeviceRef{Username: dev.Account, Device: dev.Device}, -1)
}

// RunRegistry writes device registry changes until ctx ends (the node
// removes the devices still registered when it leaves). A failed write is
// not retried here: the node keeps the devices it was told of and
// re-writes them at each heartbeat, and a removal that failed expires with
// its TTL.
func (r *Router) RunRegistry(ctx context.Context) {
	d := r.devs
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.wake:
		}
		d.mu.Lock()
		batch := make(map[cluster.DeviceRef]bool, len(d.dirty))
		for dev := range d.dirty {
			batch[dev] = d.conns[dev] > 0
		}
		clear(d.dirty)
		d.mu.Unlock()
		// One deadline for the batch: with Redis unreachable the rest fail
		// at once, but the node still records each change (its refresh
		// writes the connected ones later; removals expire).
		bctx, cancel := context.WithTimeout(ctx, registryTimeout)
		failed := 0
		for dev, up := range batch {
			var err error
			if up {
				err = r.node.DeviceConnected(bctx, dev)
			} else {
				err = r.node.DeviceDisconnected(bctx, dev)
			}
			if err != nil {
				failed++
			}
		}
		cancel()
		if failed > 0 {
			r.log.Debug("route: device registry writes failed", "failed", failed, "of", len(batch))
		}
	}
}

// NewPresenceBridge makes the presence bridge of this node (cfg names the
// cluster's Redis and this node's presence store; the router supplies the
// shard map and what it serves). SetRelay hands it to the relay's tracker;
// the caller runs it (Bridge.Run).
func (r *Router) NewPresenceBridge(cfg presence.BridgeConfig) (*presence.Bridge, error) {
	cfg.Shard = func(u string) uint32 { return uint32(r.Account(u)) }
	cfg.Local = r.ServesAccount
	if cfg.Log == nil {
		cfg.Log = r.log
	}
	b, err := presence.NewBridge(cfg)
	if err != nil {
		return nil, err
	}
	r.bridge.Store(b)
	return b, nil
}
