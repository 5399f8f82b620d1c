package main

// group mode: fan-out to G members × D devices, spread over worker
// processes (a process may open at most 20,000 files here).
//
//	ferry-bench --server URL group --members 1024 --devices 2 [--messages 3] [--procs 2] [--json]
//
// The coordinator (this process) starts the workers (this binary again, mode
// group-worker). Each worker registers its share of the member accounts,
// links D-1 more devices to each (the server must allow that many link codes
// per IP: ferryd --link-start-rate/--link-start-burst), keeps every device
// connected and acking, and prints one JSON line when ready and one when it
// has seen every message on every device (or gave up). The coordinator then
// registers the sender, which is one more member with one device, creates
// the group, sends the messages one after another, and reports the time to
// ✓ and to the last device's delivery of each (clocks are comparable: the
// processes share one machine).

import (
	"bufio"
	"cmp"
	"context"
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

type groupResult struct {
	Members        int     `json:"members"` // recipient accounts (the sender is one more member)
	DevicesPer     int     `json:"devices_per_member"`
	Recipients     int     `json:"recipient_devices"`
	Messages       int     `json:"messages"`
	Procs          int     `json:"procs"`
	SetupMs        float64 `json:"setup_ms"`
	AckMs          float64 `json:"ack_ms"`           // median over the messages: send → ✓
	LastDeliveryMs float64 `json:"last_delivery_ms"` // median over the messages: send → the last device has it
	AckMaxMs       float64 `json:"ack_max_ms"`
	LastMaxMs      float64 `json:"last_delivery_max_ms"`
	Delivered      int     `json:"delivered"` // distinct (device, message) pairs
	Lost           int     `json:"lost"`
	Duplicates     int     `json:"duplicates"`
}

// workerLine is what a worker prints: first Ready, then Done.
type workerLine struct {
	Ready bool   `json:"ready,omitempty"`
	Error string `json:"error,omitempty"`
	Done  bool   `json:"done,omitempty"`
	// With Done: per client message id, the latest arrival (unix ns) over
	// the worker's devices, and counts.
	Last       map[string]int64 `json:"last,omitempty"`
	Delivered  int              `json:"delivered"`
	Missing    int              `json:"missing"`
	Duplicates int              `json:"duplicates"`
}

func groupBench(server string, args []string) error {
	fs := flag.NewFlagSet("group", flag.ContinueOnError)
	g := fs.Int("members", 64, "recipient member accounts")
	d := fs.Int("devices", 2, "devices per recipient member (the first is its primary)")
	m := fs.Int("messages", 3, "group messages, sent one after another")
	size := fs.Int("size", 160, "ciphertext bytes")
	procs := fs.Int("procs", 0, "worker processes (0: one per 8,000 devices)")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up after this")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *g < 1 || *d < 1 || *m < 1 {
		return errors.New("group: --members, --devices and --messages must be at least 1")
	}
	if *procs <= 0 {
		*procs = (*g**d + 7999) / 8000
	}
	*procs = min(*procs, *g)
	if *g**d / *procs > 19000 {
		return fmt.Errorf("group: %d devices per process is over the 20,000-file limit: raise --procs", *g**d / *procs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	run := hex.EncodeToString(randBytes(3))
	names := make([]string, *g)
	for i := range names {
		names[i] = fmt.Sprintf("bg%s_%d", run, i)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	start := time.Now()
	type worker struct {
		cmd   *exec.Cmd
		lines *bufio.Scanner
	}
	var ws []worker
	defer func() {
		for _, w := range ws {
			_ = w.cmd.Process.Kill()
			_ = w.cmd.Wait()
		}
	}()
	per := (*g + *procs - 1) / *procs
	for from := 0; from < *g; from += per {
		to := min(from+per, *g)
		cmd := exec.CommandContext(ctx, self, "--server", server, "group-worker", "--run", run,
			"--from", strconv.Itoa(from), "--to", strconv.Itoa(to), "--devices", strconv.Itoa(*d),
			"--messages", strconv.Itoa(*m), "--timeout", timeout.String())
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return err
		}
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		ws = append(ws, worker{cmd, sc})
	}
	read := func(w worker) (workerLine, error) {
		var l workerLine
		if !w.lines.Scan() {
			return l, fmt.Errorf("group: a worker exited: %v", cmp.Or(w.lines.Err(), io.ErrUnexpectedEOF))
		}
		if err := json.Unmarshal(w.lines.Bytes(), &l); err != nil {
			return l, fmt.Errorf("group: bad worker line: %w", err)
		}
		if l.Error != "" {
			return l, fmt.Errorf("group: worker: %s", l.Error)
		}
		return l, nil
	}
	for _, w := range ws {
		if _, err := read(w); err != nil {
			return err
		}
	}
	sender, err := newDevice(ctx, server, "bg"+run+"_s")
	if err != nil {
		return err
	}
	defer sender.conn.Close()
	r, err := sender.conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GroupCreate{GroupCreate: &wirepb.GroupCreate{
		Name: "bench", Members: names}}})
	if err != nil {
		return fmt.Errorf("group: create: %w", err)
	}
	info := r.GetGroup()
	view := wire.GroupViewHash(info, wire.DeviceAddr{Account: sender.name, Device: 1})
	setup := time.Since(start)
	go func() { // the sender's own inbox (the group update): ack it
		for ev := range sender.conn.Events() {
			if env := ev.GetEnvelope(); env != nil {
				go sender.conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
			}
		}
	}()
	payload := randBytes(*size)
	sent := make(map[string]int64, *m)
	var acks []float64
	for i := range *m {
		id := fmt.Sprintf("g%s-%d", run, i)
		t0 := time.Now()
		sent[id] = t0.UnixNano()
		if _, err := sender.conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GroupSend{GroupSend: &wirepb.GroupSend{
			ClientMsgId: id, GroupId: info.GroupId, MembershipVersion: info.Version, ViewHash: view,
			Type: wirepb.EnvelopeType_SENDER_KEY_MESSAGE, Content: payload}}}); err != nil {
			return fmt.Errorf("group: send: %w", err)
		}
		acks = append(acks, ms(time.Since(t0)))
	}
	res := groupResult{Members: *g, DevicesPer: *d, Recipients: *g * *d, Messages: *m, Procs: len(ws), SetupMs: ms(setup)}
	last := make(map[string]int64, *m)
	for _, w := range ws {
		l, err := read(w)
		if err != nil {
			return err
		}
		res.Delivered += l.Delivered
		res.Lost += l.Missing
		res.Duplicates += l.Duplicates
		for id, t := range l.Last {
			last[id] = max(last[id], t)
		}
	}
	var lasts []float64
	for id, t0 := range sent {
		if t, ok := last[id]; ok {
			lasts = append(lasts, float64(t-t0)/1e6)
		}
	}
	res.AckMs, res.AckMaxMs = pct(acks, 0.5), pct(acks, 1)
	res.LastDeliveryMs, res.LastMaxMs = pct(lasts, 0.5), pct(lasts, 1)
	if *asJSON {
		return json.NewEncoder(os.Stdout).Encode(res)
	}
	fmt.Printf("group: %d members × %d devices = %d recipient devices, %d messages, %d worker processes (setup %.0f ms)\n",
		res.Members, res.DevicesPer, res.Recipients, res.Messages, res.Procs, res.SetupMs)
	fmt.Printf("send→✓              median %.2f ms  max %.2f ms\n", res.AckMs, res.AckMaxMs)
	fmt.Printf("send→last delivery  median %.2f ms  max %.2f ms\n", res.LastDeliveryMs, res.LastMaxMs)
	fmt.Printf("delivered %d, lost %d, duplicates %d\n", res.Delivered, res.Lost, res.Duplicates)
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// groupWorker holds members [from, to) with D devices each and reports.
func groupWorker(server string, args []string) (err error) {
	fs := flag.NewFlagSet("group-worker", flag.ContinueOnError)
	run := fs.String("run", "", "run id (names the accounts)")
	from := fs.Int("from", 0, "first member index")
	to := fs.Int("to", 0, "member index after the last")
	d := fs.Int("devices", 1, "devices per member")
	m := fs.Int("messages", 1, "group messages to wait for")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up after this")
	if err := fs.Parse(args); err != nil {
		return err
	}
	out := json.NewEncoder(os.Stdout)
	defer func() {
		if err != nil {
			_ = out.Encode(workerLine{Error: err.Error()})
			err = nil
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var (
		mu     sync.Mutex
		conns  []*client.Conn
		recvs  []*receiver
		wg     sync.WaitGroup
		errSet error
	)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	sem := make(chan struct{}, 16)
	for i := *from; i < *to; i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			cs, err := memberDevices(ctx, server, fmt.Sprintf("bg%s_%d", *run, i), *d)
			mu.Lock()
			defer mu.Unlock()
			conns = append(conns, cs...)
			if err != nil && errSet == nil {
				errSet = err
			}
		}()
	}
	wg.Wait()
	if errSet != nil {
		return errSet
	}
	for _, c := range conns {
		recvs = append(recvs, &receiver{conn: c, want: *m, seen: map[string]bool{}, done: make(chan struct{})})
	}
	for _, r := range recvs {
		go r.run(ctx)
	}
	if err := out.Encode(workerLine{Ready: true}); err != nil {
		return err
	}
	line := workerLine{Done: true, Last: map[string]int64{}}
	for _, r := range recvs {
		select {
		case <-r.done:
		case <-ctx.Done():
		}
		r.mu.Lock()
		line.Delivered += len(r.seen)
		line.Missing += max(0, *m-len(r.seen))
		line.Duplicates += r.dups
		for id, t := range r.at {
			line.Last[id] = max(line.Last[id], t)
		}
		r.mu.Unlock()
	}
	return out.Encode(line)
}

// memberDevices registers an account and links n-1 more devices to it, and
// returns every device's authenticated connection.
func memberDevices(ctx context.Context, server, name string, n int) ([]*client.Conn, error) {
	p, err := newDevice(ctx, server, name)
	if err != nil {
		return nil, err
	}
	conns := []*client.Conn{p.conn}
	for range n - 1 {
		c, err := linkDevice(ctx, server, p)
		if err != nil {
			return conns, err
		}
		conns = append(conns, c)
	}
	return conns, nil
}

// linkDevice links one more device to p's account at the protocol level
// (the bench has no Signal keys: the sealed material is random bytes, which
// the server cannot tell apart) and returns its authenticated connection.
func linkDevice(ctx context.Context, server string, p *device) (*client.Conn, error) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	id, _ := ecdh.X25519().GenerateKey(rand.Reader)
	identity := append([]byte{0x05}, id.PublicKey().Bytes()...)
	if identity[32]&0x80 != 0 {
		identity[32] &= 0x7f // the server wants a canonical key
	}
	eph, _ := ecdh.X25519().GenerateKey(rand.Reader)
	// A link code lives on the node that serves the account (in a cluster
	// LinkStart names it, and other nodes redirect there).
	var r *wirepb.Response
	conn, _, err := client.DialAs(ctx, cmp.Or(p.url, server), benchDial, func(conn *client.Conn) (err error) {
		r, err = conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_LinkStart{LinkStart: &wirepb.LinkStart{
			DeviceKey: key.Public().(ed25519.PublicKey), RegistrationId: p.reg, IdentityKey: identity, EphemeralKey: eph.PublicKey().Bytes(),
			Account: p.name}}})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("link start for %s: %w", p.name, err)
	}
	a, err := p.conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ApproveLink{ApproveLink: &wirepb.ApproveLink{
		CodeId: r.GetLinkStart().CodeId, EphemeralKey: eph.PublicKey().Bytes(), Sealed: randBytes(64)}}})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("approve link for %s: %w", p.name, err)
	}
	for ap := (*wirepb.LinkApproved)(nil); ap == nil; {
		select {
		case ev, ok := <-conn.Events():
			if !ok {
				return nil, fmt.Errorf("link of %s: %w", p.name, conn.Err())
			}
			ap = ev.GetLinkApproved()
		case <-ctx.Done():
			conn.Close()
			return nil, ctx.Err()
		}
	}
	if _, err := conn.Auth(ctx, p.name, a.GetApproveLink().DeviceId, key, false); err != nil {
		conn.Close()
		return nil, fmt.Errorf("auth linked device of %s: %w", p.name, err)
	}
	return conn, nil
}

// receiver acks everything one device gets and records each group
// message's first arrival.
type receiver struct {
	conn *client.Conn
	want int
	done chan struct{}

	mu   sync.Mutex
	seen map[string]bool
	at   map[string]int64
	dups int
}

func (r *receiver) run(ctx context.Context) {
	closed := false
	for {
		select {
		case ev, ok := <-r.conn.Events():
			if !ok {
				return
			}
			env := ev.GetEnvelope()
			if env == nil {
				continue
			}
			now := time.Now().UnixNano()
			go r.conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
			if env.Type != wirepb.EnvelopeType_SENDER_KEY_MESSAGE {
				continue // the group update
			}
			r.mu.Lock()
			if r.seen[env.ClientMsgId] {
				r.dups++
			} else {
				r.seen[env.ClientMsgId] = true
				if r.at == nil {
					r.at = map[string]int64{}
				}
				r.at[env.ClientMsgId] = now
			}
			if len(r.seen) >= r.want && !closed {
				closed = true
				close(r.done)
			}
			r.mu.Unlock()
		case <-ctx.Done():
			return
		}
	}
}
