// Package route is the data path of cluster mode: it finds the node that
// owns an account's or a group's shard, makes node-to-node calls to it
// (authenticated with the cluster secret, with deadlines, safe to repeat),
// serves those calls, and wraps the relay's stores so that every read and
// write for a shard goes to its owner and every local one is checked
// against the shard's fencing epoch (docs/cluster.md, "Routing").
//
// The relay keeps a device's socket on the owner of its account's shard,
// so delivery and acks are local; what crosses nodes is the part of a send
// for recipients on other shards, reads of other accounts' devices, group
// requests (run on the group's owner) and typing events.
package route

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferryhq/ferry/cluster"
	"github.com/ferryhq/ferry/presence"
	"github.com/ferryhq/ferry/relay"
	"github.com/ferryhq/ferry/route/routepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
)

// Path is where a node serves node-to-node calls.
const Path = "/v1/node"

// AuthHeader carries a call's time and MAC.
const AuthHeader = "Ferry-Node-Auth"

// maxSkew is how far a call's time may be from the callee's clock.
const maxSkew = 30 * time.Second

// ownerTTL is how long a looked-up owner is trusted without asking Redis
// again (a call the owner refuses drops it at once).
const ownerTTL = time.Second

// Sentinels. Client-facing forms are wire errors (errUnavailable).
var (
	// ErrNotOwner: this node does not hold the shard's lease now.
	ErrNotOwner = errors.New("route: shard not served here")
	// ErrNoOwner: nobody holds the shard's lease now (or Redis cannot say).
	ErrNoOwner = errors.New("route: shard has no owner")
	// ErrAuth: a node-to-node call failed authentication.
	ErrAuth = errors.New("route: node authentication failed")
	// ErrCall: a node-to-node call failed in transport.
	ErrCall = errors.New("route: node call failed")
)

// unavailable wraps err as a retryable UNAVAILABLE for the client; the
// message names no node address.
func unavailable(err error, format string, args ...any) error {
	we := wire.Errorf(wirepb.ErrorCode_UNAVAILABLE, format, args...)
	return fmt.Errorf("%w: %w", we, err)
}

// Config of a Router.
type Config struct {
	Node   *cluster.Node // joined (Ready) before NewRouter
	Secret []byte        // the cluster secret every node shares (≥ 16 bytes)
	// Timeout bounds one node-to-node call (5 s).
	Timeout    time.Duration
	Log        *slog.Logger
	Registerer prometheus.Registerer
	// Transport for node-to-node HTTP (a default one with keep-alives).
	Transport http.RoundTripper
}

// Router finds owners and calls them.
type Router struct {
	cfg   Config
	node  *cluster.Node
	fence *cluster.Fence
	smap  cluster.ShardMap
	self  string
	hc    *http.Client
	log   *slog.Logger
	m     *metrics

	locals Locals                          // set by Deps, before serving
	data   ShardData                       // set by SetShardData, before serving
	srv    atomic.Pointer[relay.Server]    // set by SetRelay
	bridge atomic.Pointer[presence.Bridge] // set by NewPresenceBridge (presence.go)
	devs   *devRegistry                    // device registry writes (presence.go)

	mu     sync.Mutex
	owners map[cluster.ShardID]owner // guarded by mu
}

type owner struct {
	node string
	url  string // the node's advertise URL (ws:// or wss://)
	at   time.Time
}

type metrics struct {
	calls *prometheus.CounterVec
	dur   *prometheus.HistogramVec
}

// NewRouter makes a router for a node that has joined its cluster.
func NewRouter(cfg Config) (*Router, error) {
	smap, ok := cfg.Node.ShardMap()
	if !ok {
		return nil, errors.New("route: the node has not joined a cluster")
	}
	if len(cfg.Secret) < 16 {
		return nil, errors.New("route: the cluster secret must be at least 16 bytes")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	tr := cfg.Transport
	if tr == nil {
		tr = &http.Transport{MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second,
			ResponseHeaderTimeout: cfg.Timeout, ForceAttemptHTTP2: true}
	}
	m := &metrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_route_calls_total",
			Help: "Node-to-node calls made, by kind and result."}, []string{"kind", "result"}),
		dur: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "ferry_route_call_seconds",
			Help:    "Duration of node-to-node calls, by kind.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1, 5}}, []string{"kind"}),
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(m.calls, m.dur)
	}
	return &Router{cfg: cfg, node: cfg.Node, fence: cfg.Node.Fence(), smap: smap,
		self: cfg.Node.Holder().Node, hc: &http.Client{Transport: tr, Timeout: cfg.Timeout},
		log: cfg.Log, m: m, owners: make(map[cluster.ShardID]owner), devs: newDevRegistry()}, nil
}

// ShardMap is the cluster's.
func (r *Router) ShardMap() cluster.ShardMap { return r.smap }

// Account returns the shard of an account.
func (r *Router) Account(username string) cluster.ShardID { return r.smap.Account(username) }

// Group returns the shard of a group.
func (r *Router) Group(id [16]byte) cluster.ShardID { return r.smap.Group(id) }

// Local reports whether this node serves shard now.
func (r *Router) Local(shard cluster.ShardID) bool {
	_, ok := r.fence.Epoch(shard)
	return ok
}

// Owner returns the node that holds shard's lease and its advertise URL;
// node is this node's id when it is local.
func (r *Router) Owner(ctx context.Context, shard cluster.ShardID) (node, url string, err error) {
	if r.Local(shard) {
		return r.self, "", nil
	}
	r.mu.Lock()
	o, ok := r.owners[shard]
	r.mu.Unlock()
	if ok && time.Since(o.at) < ownerTTL {
		return o.node, o.url, nil
	}
	lease, held, _, err := r.node.Leases().Get(ctx, shard)
	if err != nil {
		return "", "", unavailable(fmt.Errorf("%w: %w", ErrNoOwner, err), "route: shard %d: the cluster cannot be reached", shard)
	}
	if !held {
		return "", "", unavailable(ErrNoOwner, "route: shard %d has no owner now", shard)
	}
	if lease.Node == r.self {
		// Ours in Redis but not (yet, or any more) in the fence: a renewal
		// or an acquire is on its way.
		return "", "", unavailable(ErrNotOwner, "route: shard %d is being taken over", shard)
	}
	info, ok, err := r.node.Registry().Node(ctx, lease.Node)
	if err != nil {
		return "", "", unavailable(fmt.Errorf("%w: %w", ErrNoOwner, err), "route: shard %d: the cluster cannot be reached", shard)
	}
	if !ok || info.Advertise == "" {
		return "", "", unavailable(ErrNoOwner, "route: the owner of shard %d is not registered", shard)
	}
	r.mu.Lock()
	r.owners[shard] = owner{node: lease.Node, url: info.Advertise, at: time.Now()}
	r.mu.Unlock()
	return lease.Node, info.Advertise, nil
}

// forget drops a cached owner (it refused a call for the shard).
func (r *Router) forget(shard cluster.ShardID) {
	r.mu.Lock()
	delete(r.owners, shard)
	r.mu.Unlock()
}

// guard runs fn, a local read or write for shard, under the shard's
// fencing epoch: the epoch is taken before and checked after, so a write
// that passes happened while this node held the lease (docs/cluster.md,
// "The Fence"). A write that fails the check is not acknowledged; its
// client retries, on the new owner if the shard moved, and the client
// message id deduplicates it.
func (r *Router) guard(shard cluster.ShardID, fn func() error) error {
	epoch, ok := r.fence.Epoch(shard)
	if !ok {
		return unavailable(ErrNotOwner, "route: shard %d is not served by this node now", shard)
	}
	if err := fn(); err != nil {
		return err
	}
	if err := r.fence.Check(shard, epoch); err != nil {
		return unavailable(err, "route: shard %d moved during the request; retry", shard)
	}
	return nil
}

// nodeURL turns an advertise URL (ws/wss) into the node-call URL.
func nodeURL(advertise string) (string, error) {
	u, err := url.Parse(advertise)
	if err != nil {
		return "", err
	}
	switch u.Scheme {
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	case "http", "https":
	default:
		return "", fmt.Errorf("route: advertise URL %q: scheme must be ws, wss, http or https", advertise)
	}
	u.Path = Path
	u.RawQuery = ""
	return u.String(), nil
}

// sign returns the AuthHeader value for body at t.
func sign(secret, body []byte, t time.Time) string {
	ts := strconv.FormatInt(t.UnixMilli(), 10)
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(ts))
	mac.Write([]byte{'.'})
	mac.Write(body)
	return ts + "." + hex.EncodeToString(mac.Sum(nil))
}

// checkTime checks an AuthHeader value's time alone, before the body is
// read: a call from far outside the window is refused without reading it.
func checkTime(header string, now time.Time) error {
	ts, _, ok := strings.Cut(header, ".")
	if !ok {
		return fmt.Errorf("%w: malformed header", ErrAuth)
	}
	ms, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return fmt.Errorf("%w: malformed time", ErrAuth)
	}
	if d := now.Sub(time.UnixMilli(ms)); d > maxSkew || d < -maxSkew {
		return fmt.Errorf("%w: time %v off", ErrAuth, d.Round(time.Millisecond))
	}
	return nil
}

// verify checks an AuthHeader value for body at now.
func verify(secret, body []byte, header string, now time.Time) error {
	if err := checkTime(header, now); err != nil {
		return err
	}
	ts, sig, _ := strings.Cut(header, ".")
	got, err := hex.DecodeString(sig)
	if err != nil {
		return fmt.Errorf("%w: malformed mac", ErrAuth)
	}
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(ts))
	mac.Write([]byte{'.'})
	mac.Write(body)
	if !hmac.Equal(got, mac.Sum(nil)) {
		return fmt.Errorf("%w: bad mac", ErrAuth)
	}
	return nil
}

// maxCallBytes bounds a call or reply body.
const maxCallBytes = 64 << 20

// call sends c to the owner of c.Shard and returns its reply's result. A
// reply with an error is returned as that *wire.Error. One retry follows a
// refusal by a stale owner (the cache is dropped and Redis asked again).
func (r *Router) call(ctx context.Context, kind string, c *routepb.Call) (*routepb.Reply, error) {
	shard := cluster.ShardID(c.Shard)
	c.FromNode = r.self
	body, err := proto.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("route: encode %s call: %w", kind, err)
	}
	for attempt := 0; ; attempt++ {
		node, adv, err := r.Owner(ctx, shard)
		if err != nil {
			r.m.calls.WithLabelValues(kind, "no_owner").Inc()
			return nil, err
		}
		if node == r.self {
			return nil, unavailable(ErrNotOwner, "route: shard %d became local during the call; retry", shard)
		}
		rep, err := r.post(ctx, kind, adv, body)
		if err != nil {
			r.forget(shard)
			return nil, unavailable(err, "route: the node serving shard %d did not answer", shard)
		}
		if e := rep.GetError(); e != nil {
			we := wire.FromProto(e)
			if we.Code == wirepb.ErrorCode_WRONG_NODE {
				r.forget(shard)
				if attempt == 0 {
					continue
				}
				// Ownership is changing under us (a move): for the client
				// this is a retryable UNAVAILABLE, not a redirect.
				return nil, unavailable(ErrNotOwner, "route: shard %d is changing owner; retry", shard)
			}
			return nil, we
		}
		return rep, nil
	}
}

func (r *Router) post(ctx context.Context, kind, advertise string, body []byte) (*routepb.Reply, error) {
	start := time.Now()
	rep, result, err := roundTrip(ctx, r.hc, r.cfg.Secret, advertise, body, r.cfg.Timeout)
	if result != "" {
		if result != "transport" {
			r.m.dur.WithLabelValues(kind).Observe(time.Since(start).Seconds())
		}
		r.m.calls.WithLabelValues(kind, result).Inc()
	}
	return rep, err
}

// roundTrip makes one authenticated call to the node at advertise, with
// its own deadline, and decodes the reply. result is the outcome for the
// calls metric: "transport", "http_<status>", "bad_reply", the reply's
// error code or "OK" ("" if the call was never made).
func roundTrip(ctx context.Context, hc *http.Client, secret []byte, advertise string, body []byte, timeout time.Duration) (rep *routepb.Reply, result string, err error) {
	u, err := nodeURL(advertise)
	if err != nil {
		return nil, "", err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return nil, "", err
	}
	req.Header.Set("Content-Type", "application/x-protobuf")
	req.Header.Set(AuthHeader, sign(secret, body, time.Now()))
	resp, err := hc.Do(req)
	if err != nil {
		return nil, "transport", fmt.Errorf("%w: %w", ErrCall, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxCallBytes+1))
	if err != nil {
		return nil, "transport", fmt.Errorf("%w: read reply: %w", ErrCall, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, "http_" + strconv.Itoa(resp.StatusCode),
			fmt.Errorf("%w: HTTP %d: %s", ErrCall, resp.StatusCode, strings.TrimSpace(string(b[:min(len(b), 200)])))
	}
	rep = &routepb.Reply{}
	if err := proto.Unmarshal(b, rep); err != nil {
		return nil, "bad_reply", fmt.Errorf("%w: decode reply: %w", ErrCall, err)
	}
	if rep.Error != nil {
		return rep, rep.Error.Code.String(), nil
	}
	return rep, "OK", nil
}
