package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ferryhq/ferry/client"
)

// idleConns registers n devices (names prefix_i) and keeps their
// authenticated connections open.
func idleConns(ctx context.Context, server, prefix string, n int) ([]*client.Conn, error) {
	conns := make([]*client.Conn, 0, n)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			d, err := newDevice(ctx, server, fmt.Sprintf("%s_%d", prefix, i))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				firstErr = cmp.Or(firstErr, err)
				return
			}
			conns = append(conns, d.conn)
		})
	}
	wg.Wait()
	return conns, firstErr
}

// idleWorker holds n idle connections, prints one line when they are up,
// and keeps them until its standard input closes.
func idleWorker(server string, args []string) error {
	fs := flag.NewFlagSet("idle-worker", flag.ContinueOnError)
	prefix := fs.String("prefix", "", "account name prefix")
	n := fs.Int("n", 0, "connections")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	conns, err := idleConns(ctx, server, *prefix, *n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	out := json.NewEncoder(os.Stdout)
	if err != nil {
		return out.Encode(workerLine{Error: err.Error()})
	}
	if err := out.Encode(workerLine{Ready: true}); err != nil {
		return err
	}
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n') // until the coordinator is done
	return nil
}

// idleSpread starts procs idle workers holding n connections between them
// and returns once every one is up; stop ends them.
func idleSpread(ctx context.Context, server, prefix string, n, procs int) (stop func(), err error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	var cmds []*exec.Cmd
	var stdins []interface{ Close() error }
	stop = func() {
		for _, in := range stdins {
			in.Close()
		}
		for _, c := range cmds {
			_ = c.Wait()
		}
	}
	per := (n + procs - 1) / procs
	for i, left := 0, n; left > 0; i, left = i+1, left-per {
		k := min(per, left)
		cmd := exec.CommandContext(ctx, self, "--server", server, "idle-worker", "--prefix", fmt.Sprintf("%s_%d", prefix, i), "--n", strconv.Itoa(k))
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			stop()
			return nil, err
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			stop()
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			stop()
			return nil, err
		}
		cmds, stdins = append(cmds, cmd), append(stdins, in)
		sc := bufio.NewScanner(out)
		if !sc.Scan() {
			stop()
			return nil, fmt.Errorf("idle worker %d exited", i)
		}
		var l workerLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil || l.Error != "" {
			stop()
			return nil, fmt.Errorf("idle worker %d: %v%s", i, err, l.Error)
		}
	}
	return stop, nil
}

// e2eePairs is pairs with real Signal sessions: each device is a client SDK
// device with its own SQLite store (X3DH on the first message, then the
// ratchet), so the figure is what a user of `ferry` would see.
func e2eePairs(ctx context.Context, server, run string, np, nm int, rate float64, idleN int, asJSON bool) error {
	dir, err := os.MkdirTemp("", "ferry-bench-e2ee-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	open := func(name string) (*client.Client, error) {
		c, err := client.Open(ctx, client.Options{Home: filepath.Join(dir, name), ClientName: "ferry-bench"})
		if err != nil {
			return nil, err
		}
		if err := c.SetServer(ctx, server); err != nil {
			return nil, err
		}
		return c, c.Register(ctx, name)
	}
	type pair struct{ s, r *client.Client }
	ps := make([]pair, np)
	for i := range ps {
		s, err := open(fmt.Sprintf("es%s_%d", run, i))
		if err != nil {
			return err
		}
		defer s.Close()
		r, err := open(fmt.Sprintf("er%s_%d", run, i))
		if err != nil {
			return err
		}
		defer r.Close()
		ps[i] = pair{s, r}
	}
	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(time.Second) * float64(np) / rate)
	}
	var (
		mu         sync.Mutex
		ackLat     []float64
		deliverLat []float64
		lost, dups int
		firstErr   error
		wg, rwg    sync.WaitGroup // senders, receivers
	)
	recvCtx, stopRecv := context.WithCancel(ctx)
	defer stopRecv()
	start := time.Now()
	for _, p := range ps {
		sentAt := make(map[string]time.Time, nm)
		var smu sync.Mutex
		got := map[string]bool{}
		all := make(chan struct{})
		var closeOnce sync.Once
		wg.Add(1)
		rwg.Add(1)
		go func() { // receiver
			defer rwg.Done()
			_ = p.r.Receive(recvCtx, client.ReceiveOptions{Handle: func(ev client.Event) {
				m := ev.Message
				if m == nil || m.Outgoing {
					return
				}
				now := time.Now()
				id, _, _ := strings.Cut(m.Text, " ")
				smu.Lock()
				t0 := sentAt[id]
				smu.Unlock()
				mu.Lock()
				if got[id] {
					dups++
				} else if !t0.IsZero() {
					deliverLat = append(deliverLat, ms(now.Sub(t0)))
				}
				got[id] = true
				n := len(got)
				mu.Unlock()
				if n == nm {
					closeOnce.Do(func() { close(all) })
				}
			}})
		}()
		go func() { // sender
			defer wg.Done()
			next := time.Now()
			for i := range nm {
				if interval > 0 {
					time.Sleep(time.Until(next)) // pacing the load is the point here
					next = next.Add(interval)
				}
				id := fmt.Sprintf("%s-%d", p.s.Username(), i)
				t0 := time.Now()
				smu.Lock()
				sentAt[id] = t0
				smu.Unlock()
				if _, err := p.s.SendWithID(ctx, id, p.r.Username(), id+" hello"); err != nil {
					mu.Lock()
					firstErr = cmp.Or(firstErr, err)
					mu.Unlock()
					return
				}
				mu.Lock()
				ackLat = append(ackLat, ms(time.Since(t0)))
				mu.Unlock()
			}
			select {
			case <-all:
			case <-time.After(60 * time.Second):
				mu.Lock()
				lost += nm - len(got)
				mu.Unlock()
			}
		}()
	}
	wg.Wait() // each sender returns once its receiver has everything (or gave up)
	elapsed := time.Since(start)
	stopRecv()
	rwg.Wait()
	if firstErr != nil {
		return firstErr
	}
	res := pairsResult{Pairs: np, Messages: np * nm, Lost: lost, Duplicates: dups, Rate: rate, Idle: idleN, E2EE: true,
		MsgsPerSec: float64(np*nm) / elapsed.Seconds(),
		AckP50Ms:   pct(ackLat, 0.50), AckP99Ms: pct(ackLat, 0.99),
		DeliverP50Ms: pct(deliverLat, 0.50), DeliverP99Ms: pct(deliverLat, 0.99), DeliverP999: pct(deliverLat, 0.999)}
	if asJSON {
		return json.NewEncoder(os.Stdout).Encode(res)
	}
	printPairs(res)
	return nil
}
