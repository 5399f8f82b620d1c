package relay

import (
	"math"
	"net/netip"
	"time"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// rateLimited is the RATE_LIMITED error for a wait of d.
func rateLimited(what string, d time.Duration) *wire.Error {
	ms := uint32(math.MaxUint32)
	if d < time.Duration(math.MaxUint32)*time.Millisecond {
		ms = uint32((d + time.Millisecond - 1) / time.Millisecond)
	}
	e := wire.Errorf(wirepb.ErrorCode_RATE_LIMITED, "relay: too many %s; retry in %d ms", what, ms)
	e.RetryAfterMs = max(ms, 1)
	return e
}

// remoteKey is the rate-limit key of a remote address "ip:port": the IP,
// or for IPv6 its /64 (one host usually holds a whole /64).
func remoteKey(remote string) string {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return remote
	}
	a := ap.Addr().Unmap()
	if a.Is6() {
		if p, err := a.Prefix(64); err == nil {
			return p.String()
		}
	}
	return a.String()
}
