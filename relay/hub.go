package relay

import (
	"hash/maphash"
	"sync"

	"github.com/ferryhq/ferry/wire"
)

const hubShards = 64

// hub maps each device to its one live receiving connection. It is sharded
// so that connects, disconnects and wake-ups on different devices do not
// contend on one lock.
type hub struct {
	seed   maphash.Seed
	shards [hubShards]hubShard
}

type hubShard struct {
	mu    sync.Mutex
	conns map[wire.DeviceAddr]*conn // guarded by mu
}

func newHub() *hub {
	h := &hub{seed: maphash.MakeSeed()}
	for i := range h.shards {
		h.shards[i].conns = make(map[wire.DeviceAddr]*conn)
	}
	return h
}

func (h *hub) shard(a wire.DeviceAddr) *hubShard {
	var mh maphash.Hash
	mh.SetSeed(h.seed)
	mh.WriteString(a.Account)
	d := a.Device
	_, _ = mh.Write([]byte{byte(d >> 24), byte(d >> 16), byte(d >> 8), byte(d)})
	return &h.shards[mh.Sum64()%hubShards]
}

// register makes c the device's connection and returns the one it replaced.
func (h *hub) register(a wire.DeviceAddr, c *conn) (old *conn) {
	s := h.shard(a)
	s.mu.Lock()
	old = s.conns[a]
	s.conns[a] = c
	s.mu.Unlock()
	return old
}

// unregister removes c if it is still the device's connection.
func (h *hub) unregister(a wire.DeviceAddr, c *conn) {
	s := h.shard(a)
	s.mu.Lock()
	if s.conns[a] == c {
		delete(s.conns, a)
	}
	s.mu.Unlock()
}

func (h *hub) get(a wire.DeviceAddr) *conn {
	s := h.shard(a)
	s.mu.Lock()
	c := s.conns[a]
	s.mu.Unlock()
	return c
}

// all returns every registered connection (for shutdown).
func (h *hub) all() []*conn {
	var out []*conn
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.Lock()
		for _, c := range s.conns {
			out = append(out, c)
		}
		s.mu.Unlock()
	}
	return out
}
