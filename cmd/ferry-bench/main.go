// Command ferry-bench drives a ferryd with simulated devices and reports
// throughput and latency. Payloads are opaque random bytes of realistic
// ciphertext sizes: the server cannot tell them from real ciphertext, so the
// figures measure the server, not client-side Signal work.
//
//	ferry-bench --server ws://127.0.0.1:7600 pairs --pairs 16 --messages 200 [--json]
//
// Against a cluster, --server may be any node (every dial follows the
// WRONG_NODE redirect to the account's owner); pairs --cluster-placement
// same|cross --redis URL places each pair's two accounts on one node or on
// two (cluster.go).
//
// Modes: pairs, drain, idle, group (group.go).
package main

import (
	"bufio"
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/wire/wirepb"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "ferry-bench:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("ferry-bench", flag.ContinueOnError)
	server := fs.String("server", "ws://127.0.0.1:7600", "server URL")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return errors.New("usage: ferry-bench --server URL pairs [--pairs P] [--messages N] [--size B] [--json]\n       ferry-bench --server URL drain [--messages K] [--size B] [--json]\n       ferry-bench --server URL idle N [--procs P] [--settle D] [--json]\n       ferry-bench --server URL group [--members G] [--devices D] [--messages M] [--procs P] [--json]\n       ferry-bench --server URL storm N [--backoff-min D] [--json]\n       ferry-bench --server URL presence [--devices N] [--procs P] [--watch K] [--settle D] [--json]")
	}
	switch fs.Arg(0) {
	case "pairs":
		return pairs(*server, fs.Args()[1:])
	case "drain":
		return drain(*server, fs.Args()[1:])
	case "idle":
		return idle(*server, fs.Args()[1:])
	case "storm":
		return storm(*server, fs.Args()[1:])
	case "idle-worker": // started by idle --procs
		return idleWorker(*server, fs.Args()[1:])
	case "group":
		return groupBench(*server, fs.Args()[1:])
	case "group-worker": // started by group
		return groupWorker(*server, fs.Args()[1:])
	case "presence":
		return presenceBench(*server, fs.Args()[1:])
	case "presence-worker":
		return presenceWorker(*server, fs.Args()[1:])
	default:
		return fmt.Errorf("unknown mode %q (have: pairs, drain, idle, group, storm, presence)", fs.Arg(0))
	}
}

// device is a registered bench device with one open connection.
type device struct {
	name string
	reg  uint32
	conn *client.Conn
	url  string // the node the connection is on (a cluster redirects to the account's owner)
}

func newDevice(ctx context.Context, server, name string) (*device, error) {
	d, _, err := newDeviceKey(ctx, server, name)
	return d, err
}

// newDeviceKey is newDevice that also returns the auth key (to reconnect).
func newDeviceKey(ctx context.Context, server, name string) (*device, ed25519.PrivateKey, error) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	reg := uint32(1 + len(name)%16000)
	conn, at, err := client.DialAs(ctx, server, benchDial, func(c *client.Conn) error {
		_, err := c.Register(ctx, name, key, reg)
		return err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("register %s: %w", name, err)
	}
	return &device{name: name, reg: reg, conn: conn, url: at}, key, nil
}

var benchDial = client.DialOptions{ClientName: "ferry-bench"}

// dialAuth connects as device 1 of name through server, following cluster
// redirects to the node that serves the account.
func dialAuth(ctx context.Context, server, name string, key ed25519.PrivateKey) (*client.Conn, error) {
	conn, _, err := client.DialAs(ctx, server, benchDial, func(c *client.Conn) error {
		_, err := c.Auth(ctx, name, 1, key, false)
		return err
	})
	return conn, err
}

type drainResult struct {
	Messages int     `json:"messages"`
	DrainMs  float64 `json:"drain_ms"`
	PerSec   float64 `json:"msgs_per_sec"`
}

// drain queues K messages for an offline device, then measures the time
// from its reconnect (dial included) to the last envelope, acking as it goes.
func drain(server string, args []string) error {
	fs := flag.NewFlagSet("drain", flag.ContinueOnError)
	k := fs.Int("messages", 5000, "messages queued for the offline device")
	size := fs.Int("size", 160, "ciphertext bytes")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	run := hex.EncodeToString(randBytes(3))
	s, err := newDevice(ctx, server, "ds"+run)
	if err != nil {
		return err
	}
	defer s.conn.Close()
	r, key, err := newDeviceKey(ctx, server, "dr"+run)
	if err != nil {
		return err
	}
	r.conn.Close() // offline while the backlog builds
	payload := randBytes(*size)
	// Queue with many sends in flight (group commit), bounded.
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for i := 0; i < *k; i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer func() { <-sem; wg.Done() }()
			_, err := s.conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
				ClientMsgId: fmt.Sprint("d", i), To: r.name, Ciphertexts: []*wirepb.DeviceCiphertext{{
					Username: r.name, DeviceId: 1, RegistrationId: r.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: payload}}}}})
			if err != nil {
				mu.Lock()
				firstErr = cmp.Or(firstErr, err)
				mu.Unlock()
			}
		}(i)
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	start := time.Now()
	conn, err := dialAuth(ctx, server, r.name, key)
	if err != nil {
		return err
	}
	defer conn.Close()
	got := map[uint64]bool{}
	var batch []uint64
	for len(got) < *k {
		select {
		case ev, ok := <-conn.Events():
			if !ok {
				return fmt.Errorf("connection closed after %d of %d: %v", len(got), *k, conn.Err())
			}
			if env := ev.GetEnvelope(); env != nil {
				got[env.Id] = true
				batch = append(batch, env.Id)
			}
			if len(batch) >= 32 || len(conn.Events()) == 0 {
				ids := batch
				batch = nil
				go conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: ids}}})
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	el := time.Since(start)
	res := drainResult{Messages: *k, DrainMs: ms(el), PerSec: float64(*k) / el.Seconds()}
	if *asJSON {
		return json.NewEncoder(os.Stdout).Encode(res)
	}
	fmt.Printf("drain: %d queued messages delivered %.0f ms after reconnect (%.0f msgs/s)\n", res.Messages, res.DrainMs, res.PerSec)
	return nil
}

type pairsResult struct {
	Pairs        int     `json:"pairs"`
	Messages     int     `json:"messages"`
	MsgsPerSec   float64 `json:"msgs_per_sec"`
	AckP50Ms     float64 `json:"ack_p50_ms"`
	AckP99Ms     float64 `json:"ack_p99_ms"`
	DeliverP50Ms float64 `json:"deliver_p50_ms"`
	DeliverP99Ms float64 `json:"deliver_p99_ms"`
	DeliverP999  float64 `json:"deliver_p999_ms"`
	Lost         int     `json:"lost"`
	Duplicates   int     `json:"duplicates"`
	Rate         float64 `json:"rate"` // offered msgs/s, 0: unpaced
	Idle         int     `json:"idle_connections"`
	E2EE         bool    `json:"e2ee"`
	Placement    string  `json:"cluster_placement,omitempty"`
}

func pairs(server string, args []string) error {
	fs := flag.NewFlagSet("pairs", flag.ContinueOnError)
	np := fs.Int("pairs", 16, "sender/receiver pairs")
	nm := fs.Int("messages", 200, "messages per pair")
	size := fs.Int("size", 160, "ciphertext bytes")
	rate := fs.Float64("rate", 0, "total messages per second over all pairs (0: unpaced, one in flight per sender)")
	idleN := fs.Int("idle", 0, "extra idle authenticated connections held during the run (at most 15,000 per process)")
	e2ee := fs.Bool("e2ee", false, "real Signal sessions through the client SDK (the end-to-end figure; client crypto shares the cores)")
	asJSON := fs.Bool("json", false, "print one JSON object")
	placement := fs.String("cluster-placement", "", "same|cross: each pair's sender and receiver on the same cluster node or on two different ones (needs --redis)")
	redisURL := fs.String("redis", "", "the cluster's Redis, read for shard owners with --cluster-placement")
	redisPrefix := fs.String("cluster-prefix", "", "the cluster's Redis key prefix (default ferry:)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if (*placement == "") != (*redisURL == "") {
		return errors.New("pairs: --cluster-placement and --redis go together")
	}
	if *idleN < 0 || *idleN > 15000 {
		return errors.New("pairs: --idle must be 0..15000 per process (20,000 open files)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	run := hex.EncodeToString(randBytes(3))
	if *idleN > 0 {
		conns, err := idleConns(ctx, server, "bpi"+run, *idleN)
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		if err != nil {
			return err
		}
	}
	if *e2ee && *placement != "" {
		return errors.New("pairs: --cluster-placement is for the raw pairs, not --e2ee")
	}
	if *e2ee {
		return e2eePairs(ctx, server, run, *np, *nm, *rate, *idleN, *asJSON)
	}
	var interval time.Duration // per sender
	if *rate > 0 {
		interval = time.Duration(float64(time.Second) * float64(*np) / *rate)
	}
	var pl *placer
	if *placement != "" {
		var err error
		if pl, err = newPlacer(ctx, *redisURL, *redisPrefix); err != nil {
			return err
		}
	}
	type pair struct{ s, r *device }
	ps := make([]pair, *np)
	for i := range ps {
		sname, rname := fmt.Sprintf("bs%s_%d", run, i), fmt.Sprintf("br%s_%d", run, i)
		if pl != nil {
			sn, rn, err := pl.pairNodes(i, *placement)
			if err != nil {
				return err
			}
			sname, rname = pl.name(sname, sn), pl.name(rname, rn)
		}
		s, err := newDevice(ctx, server, sname)
		if err != nil {
			return err
		}
		r, err := newDevice(ctx, server, rname)
		if err != nil {
			return err
		}
		ps[i] = pair{s, r}
	}
	var (
		mu         sync.Mutex
		ackLat     []float64
		deliverLat []float64
		lost, dups int
		wg         sync.WaitGroup
		payload    = randBytes(*size)
		start      = time.Now()
		firstErr   error
	)
	for _, p := range ps {
		wg.Add(2)
		sentAt := make(map[string]time.Time, *nm)
		var smu sync.Mutex
		go func() { // receiver
			defer wg.Done()
			got := map[string]bool{}
			for len(got) < *nm {
				select {
				case ev, ok := <-p.r.conn.Events():
					if !ok {
						return
					}
					env := ev.GetEnvelope()
					if env == nil {
						continue
					}
					now := time.Now()
					smu.Lock()
					t0 := sentAt[env.ClientMsgId]
					smu.Unlock()
					mu.Lock()
					if got[env.ClientMsgId] {
						dups++
					} else if !t0.IsZero() {
						deliverLat = append(deliverLat, ms(now.Sub(t0)))
					}
					mu.Unlock()
					got[env.ClientMsgId] = true
					go p.r.conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
				case <-ctx.Done():
					mu.Lock()
					lost += *nm - len(got)
					mu.Unlock()
					return
				}
			}
		}()
		go func() { // sender
			defer wg.Done()
			next := time.Now()
			for i := 0; i < *nm; i++ {
				if interval > 0 {
					time.Sleep(time.Until(next)) // pacing the load is the point here
					next = next.Add(interval)
				}
				id := fmt.Sprintf("%s-%d", p.s.name, i)
				t0 := time.Now()
				smu.Lock()
				sentAt[id] = t0
				smu.Unlock()
				_, err := p.s.conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
					ClientMsgId: id, To: p.r.name, Ciphertexts: []*wirepb.DeviceCiphertext{{
						Username: p.r.name, DeviceId: 1, RegistrationId: p.r.reg,
						Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: payload}}}}})
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					cancel()
					return
				}
				mu.Lock()
				ackLat = append(ackLat, ms(time.Since(t0)))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if firstErr != nil {
		return firstErr
	}
	res := pairsResult{Pairs: *np, Messages: *np * *nm, Lost: lost, Duplicates: dups, Rate: *rate, Idle: *idleN, Placement: *placement,
		MsgsPerSec: float64(*np**nm) / elapsed.Seconds(),
		AckP50Ms:   pct(ackLat, 0.50), AckP99Ms: pct(ackLat, 0.99),
		DeliverP50Ms: pct(deliverLat, 0.50), DeliverP99Ms: pct(deliverLat, 0.99), DeliverP999: pct(deliverLat, 0.999)}
	if *asJSON {
		return json.NewEncoder(os.Stdout).Encode(res)
	}
	printPairs(res)
	return nil
}

func printPairs(res pairsResult) {
	where := ""
	if res.Placement != "" {
		where = ", cluster placement " + res.Placement
	}
	fmt.Printf("pairs %d, messages %d, %.0f msgs/s (persist → ✓ → deliver → ack → delete), offered rate %v, idle connections %d, e2ee %v%s\n",
		res.Pairs, res.Messages, res.MsgsPerSec, res.Rate, res.Idle, res.E2EE, where)
	fmt.Printf("send→✓       p50 %.2f ms  p99 %.2f ms\n", res.AckP50Ms, res.AckP99Ms)
	fmt.Printf("send→deliver p50 %.2f ms  p99 %.2f ms  p99.9 %.2f ms\n", res.DeliverP50Ms, res.DeliverP99Ms, res.DeliverP999)
	fmt.Printf("lost %d, duplicates %d\n", res.Lost, res.Duplicates)
}

func pct(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

type idleResult struct {
	Connections  int     `json:"connections"`
	BytesPerConn float64 `json:"bytes_per_conn"`
	IdleCPU      float64 `json:"idle_cpu_cores"` // server CPU while the connections idle, in cores
}

// idle holds N authenticated, idle device connections and reads the
// server's resident memory and CPU from its /metrics. One process holds at
// most ~19,000 sockets here (20,000 files per process): run several for more.
func idle(server string, args []string) error {
	fs := flag.NewFlagSet("idle", flag.ContinueOnError)
	settle := fs.Duration("settle", 10*time.Second, "how long to measure idle CPU")
	procs := fs.Int("procs", 1, "worker processes holding the connections (at most 19,000 each: 20,000 open files per process)")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if len(args) == 0 {
		return errors.New("usage: ferry-bench --server URL idle N [--procs P] [--settle D] [--json]")
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n <= 0 {
		return fmt.Errorf("idle: N must be a positive number, got %q", args[0])
	}
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *procs < 1 || (n+*procs-1) / *procs > 19000 {
		return fmt.Errorf("idle: %d connections need at least %d processes (--procs): 19,000 per process", n, (n+18999)/19000)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	metricsURL, err := metricsURLOf(server)
	if err != nil {
		return err
	}
	rss0, _, err := scrape(ctx, metricsURL)
	if err != nil {
		return err
	}
	run := hex.EncodeToString(randBytes(3))
	if *procs > 1 {
		stop, err := idleSpread(ctx, server, "bi"+run, n, *procs)
		if err != nil {
			return err
		}
		defer stop()
		return idleReport(ctx, metricsURL, rss0, n, *settle, *asJSON)
	}
	conns, err := idleConns(ctx, server, "bi"+run, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err != nil {
		return err
	}
	return idleReport(ctx, metricsURL, rss0, n, *settle, *asJSON)
}

// idleReport reads the server's memory and idle CPU with n connections up.
func idleReport(ctx context.Context, metricsURL string, rss0 float64, n int, settle time.Duration, asJSON bool) error {
	rss1, cpu1, err := scrape(ctx, metricsURL)
	if err != nil {
		return err
	}
	time.Sleep(settle) // measuring idle CPU over a fixed span is the point here
	_, cpu2, err := scrape(ctx, metricsURL)
	if err != nil {
		return err
	}
	res := idleResult{Connections: n, BytesPerConn: (rss1 - rss0) / float64(n), IdleCPU: (cpu2 - cpu1) / settle.Seconds()}
	if asJSON {
		return json.NewEncoder(os.Stdout).Encode(res)
	}
	fmt.Printf("idle: %d connections, %.0f bytes of server memory each, server CPU while idle %.3f cores\n",
		res.Connections, res.BytesPerConn, res.IdleCPU)
	return nil
}

// metricsURLOf turns ws://host:port into http://host:port/metrics.
func metricsURLOf(server string) (string, error) {
	u, err := url.Parse(server)
	if err != nil {
		return "", err
	}
	switch u.Scheme {
	case "wss", "https":
		u.Scheme = "https"
	default:
		u.Scheme = "http"
	}
	u.Path = "/metrics"
	return u.String(), nil
}

// scrape reads the server's resident memory and total CPU seconds.
func scrape(ctx context.Context, metricsURL string) (rss, cpu float64, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, metricsURL, nil)
	if err != nil {
		return 0, 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, 0, fmt.Errorf("read server metrics: %w", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		v, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "process_resident_memory_bytes":
			rss = v
		case "process_cpu_seconds_total":
			cpu = v
		}
	}
	if rss == 0 {
		return 0, 0, errors.New("server metrics have no process_resident_memory_bytes")
	}
	return rss, cpu, sc.Err()
}
