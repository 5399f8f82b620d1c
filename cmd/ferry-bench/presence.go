package main

// presence mode (issue 5): how many presence events a burst of connects
// and disconnects makes, with the server's flap coalescing on or off. The
// devices are spread over worker processes (this binary, re-run as
// "presence-worker"), since one process may open at most 20,000 files.
//
// Device i (one account each) subscribes to the K accounts after it
// (i+1 .. i+K, wrapping). Odd devices churn, even ones stay connected and
// watch: "flap" disconnects every odd device and reconnects it at once
// (and re-subscribes); "leave" disconnects every odd device for good.

import (
	"bufio"
	"cmp"
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferryhq/ferry/client"
)

type presencePhase struct {
	Phase       string  `json:"phase"`
	Transitions float64 `json:"transitions"` // presence changes the server pushed (after coalescing)
	Coalesced   float64 `json:"coalesced"`   // flaps that made no event
	Events      float64 `json:"events"`      // events queued to subscriber connections
	Dropped     float64 `json:"dropped"`
	Received    int64   `json:"received"` // presence events the devices got
	Seconds     float64 `json:"seconds"`  // the burst itself (all workers done)
}

type presenceResult struct {
	Devices int             `json:"devices"`
	Procs   int             `json:"procs"`
	Watch   int             `json:"watch"`
	Phases  []presencePhase `json:"phases"`
}

func presenceBench(server string, args []string) error {
	fs := flag.NewFlagSet("presence", flag.ContinueOnError)
	n := fs.Int("devices", 10000, "devices (one account each)")
	procs := fs.Int("procs", 4, "worker processes the devices are spread over")
	watch := fs.Int("watch", 10, "accounts each device subscribes to")
	settle := fs.Duration("settle", 3*time.Second, "wait after a burst for delayed (coalesced) events; must exceed the server's flap window")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *n / *procs > 15000 {
		return fmt.Errorf("presence: %d devices per process is too many for 20,000 open files", *n / *procs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	metricsURL, err := metricsURLOf(server)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	run := hex.EncodeToString(randBytes(3))
	type worker struct {
		cmd *exec.Cmd
		in  io.WriteCloser
		out *bufio.Scanner
	}
	var ws []*worker
	defer func() {
		for _, w := range ws {
			w.in.Close()
			_ = w.cmd.Wait()
		}
	}()
	per := (*n + *procs - 1) / *procs
	for from := 0; from < *n; from += per {
		cnt := min(per, *n-from)
		cmd := exec.CommandContext(ctx, self, "--server", server, "presence-worker", "--run", run,
			"--from", strconv.Itoa(from), "--count", strconv.Itoa(cnt), "--total", strconv.Itoa(*n), "--watch", strconv.Itoa(*watch))
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			return err
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return err
		}
		ws = append(ws, &worker{cmd: cmd, in: in, out: bufio.NewScanner(out)})
	}
	// step tells every worker to do one thing and waits for their answers
	// (a number: presence events received since the last step).
	step := func(what string) (int64, error) {
		for _, w := range ws {
			if _, err := fmt.Fprintln(w.in, what); err != nil {
				return 0, err
			}
		}
		var total int64
		for _, w := range ws {
			if !w.out.Scan() {
				return 0, fmt.Errorf("presence: a worker ended during %s", what)
			}
			v, err := strconv.ParseInt(strings.TrimSpace(w.out.Text()), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("presence: worker said %q", w.out.Text())
			}
			total += v
		}
		return total, nil
	}
	if _, err := step("setup"); err != nil {
		return err
	}
	time.Sleep(*settle) // let the setup's own events pass before the baseline
	if _, err := step("count"); err != nil {
		return err
	}
	res := presenceResult{Devices: *n, Procs: len(ws), Watch: *watch}
	for _, phase := range []string{"flap", "leave"} {
		m0, err := scrapePresence(ctx, metricsURL)
		if err != nil {
			return err
		}
		start := time.Now()
		during, err := step(phase)
		if err != nil {
			return err
		}
		secs := time.Since(start).Seconds()
		time.Sleep(*settle) // coalesced offline events come a flap window later
		got, err := step("count")
		if err != nil {
			return err
		}
		m1, err := scrapePresence(ctx, metricsURL)
		if err != nil {
			return err
		}
		res.Phases = append(res.Phases, presencePhase{Phase: phase, Transitions: m1[0] - m0[0], Coalesced: m1[1] - m0[1],
			Events: m1[2] - m0[2], Dropped: m1[3] - m0[3], Received: during + got, Seconds: secs})
	}
	if *asJSON {
		return json.NewEncoder(os.Stdout).Encode(res)
	}
	fmt.Printf("presence: %d devices over %d processes, each watching %d accounts\n", res.Devices, res.Procs, res.Watch)
	for _, p := range res.Phases {
		fmt.Printf("  %-5s burst %.2fs: %.0f transitions pushed, %.0f flaps coalesced, %.0f events queued, %.0f dropped, %d received\n",
			p.Phase, p.Seconds, p.Transitions, p.Coalesced, p.Events, p.Dropped, p.Received)
	}
	return nil
}

// scrapePresence reads transitions (summed over states), coalesced flaps,
// events and drops from the server's /metrics.
func scrapePresence(ctx context.Context, metricsURL string) ([4]float64, error) {
	var v [4]float64
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, metricsURL, nil)
	if err != nil {
		return v, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return v, fmt.Errorf("read server metrics: %w", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		x, _ := strconv.ParseFloat(f[1], 64)
		switch name := f[0]; {
		case strings.HasPrefix(name, "ferry_presence_transitions_total"):
			v[0] += x
		case name == "ferry_presence_flaps_coalesced_total":
			v[1] = x
		case name == "ferry_presence_events_total":
			v[2] = x
		case name == "ferry_presence_events_dropped_total":
			v[3] = x
		}
	}
	return v, sc.Err()
}

// presenceWorker holds devices [from, from+count) of a presence run and
// obeys its parent's steps on stdin: setup, flap, leave, count.
func presenceWorker(server string, args []string) error {
	fs := flag.NewFlagSet("presence-worker", flag.ContinueOnError)
	run := fs.String("run", "", "run id (account name prefix)")
	from := fs.Int("from", 0, "first device")
	count := fs.Int("count", 0, "devices")
	total := fs.Int("total", 0, "devices in the whole run")
	watch := fs.Int("watch", 10, "accounts each device watches")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	name := func(i int) string { return fmt.Sprintf("bp%s_%d", *run, i) }
	keys := make([]ed25519.PrivateKey, *count)
	conns := make([]*client.Conn, *count)
	var received atomic.Int64
	drain := func(c *client.Conn) {
		go func() {
			for ev := range c.Events() {
				if ev.GetPresence() != nil {
					received.Add(1)
				}
			}
		}()
	}
	watched := func(i int) []string {
		var out []string
		for k := 1; k <= *watch && k < *total; k++ {
			out = append(out, name((i+k)%*total))
		}
		return out
	}
	// each runs f for every device, 32 at a time.
	each := func(f func(i int) error) error {
		sem := make(chan struct{}, 32)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var first error
		for i := range *count {
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer func() { <-sem; wg.Done() }()
				if err := f(i); err != nil {
					mu.Lock()
					first = cmp.Or(first, err)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		return first
	}
	connect := func(i int) error {
		c, err := dialAuth(ctx, server, name(*from+i), keys[i])
		if err != nil {
			return err
		}
		drain(c)
		conns[i] = c
		_, err = c.SubscribePresence(ctx, watched(*from+i))
		return err
	}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		var err error
		switch sc.Text() {
		case "setup":
			err = each(func(i int) error {
				d, key, err := newDeviceKey(ctx, server, name(*from+i))
				if err != nil {
					return err
				}
				keys[i], conns[i] = key, d.conn
				drain(d.conn)
				_, err = d.conn.SubscribePresence(ctx, watched(*from+i))
				return err
			})
		case "flap": // every churning device goes away and is back at once
			err = each(func(i int) error {
				if (*from+i)%2 == 0 {
					return nil
				}
				conns[i].Close()
				return connect(i)
			})
		case "leave": // every churning device goes away
			err = each(func(i int) error {
				if (*from+i)%2 == 1 {
					conns[i].Close()
				}
				return nil
			})
		case "count":
		default:
			err = fmt.Errorf("unknown step %q", sc.Text())
		}
		if err != nil {
			return err
		}
		fmt.Println(received.Swap(0))
	}
	if err := sc.Err(); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}
