package main

// storm mode: N devices connected, every one dropped at once, one message
// queued for each while they are away, then every device reconnects with
// the client SDK's backoff (jittered). Reports the time until all are back
// and drained, and the server's peak resident memory (sampled from its
// /metrics every 20 ms).
//
//	ferry-bench --server URL storm N [--json]

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/wire/wirepb"
)

type stormResult struct {
	Devices        int     `json:"devices"`
	BackMs         float64 `json:"back_ms"`    // from the drop to the last device authenticated again
	DrainedMs      float64 `json:"drained_ms"` // from the drop to the last queued message received
	Reconnects     int     `json:"reconnect_attempts"`
	PeakRSSBytes   float64 `json:"peak_server_rss_bytes"`
	BeforeRSSBytes float64 `json:"server_rss_before_bytes"`
	Lost           int     `json:"lost"`
}

func storm(server string, args []string) error {
	fs := flag.NewFlagSet("storm", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print one JSON object")
	minWait := fs.Duration("backoff-min", 100*time.Millisecond, "the client backoff's first wait")
	if len(args) == 0 {
		return errors.New("usage: ferry-bench --server URL storm N [--backoff-min D] [--json]")
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n <= 0 || n > 9000 {
		return fmt.Errorf("storm: N must be 1..9000 per process (each device needs two sockets here during the storm), got %q", args[0])
	}
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	metricsURL, err := metricsURLOf(server)
	if err != nil {
		return err
	}
	run := hex.EncodeToString(randBytes(3))
	type dev struct {
		d   *device
		key ed25519.PrivateKey
	}
	devs := make([]dev, n)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for i := range devs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			d, key, err := newDeviceKey(ctx, server, fmt.Sprintf("bst%s_%d", run, i))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				firstErr = cmp.Or(firstErr, err)
				return
			}
			devs[i] = dev{d, key}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	sender, err := newDevice(ctx, server, "bst"+run+"_s")
	if err != nil {
		return err
	}
	defer sender.conn.Close()
	before, _, err := scrape(ctx, metricsURL)
	if err != nil {
		return err
	}

	// The drop: every connection at once.
	drop := time.Now()
	for _, d := range devs {
		d.d.conn.Close()
	}
	// One message for each while they are away (the sender is not dropped).
	payload := randBytes(160)
	for i, d := range devs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			_, err := sender.conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
				ClientMsgId: fmt.Sprint("st", i), To: d.d.name, Ciphertexts: []*wirepb.DeviceCiphertext{{
					Username: d.d.name, DeviceId: 1, RegistrationId: d.d.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: payload}}}}})
			if err != nil {
				mu.Lock()
				firstErr = cmp.Or(firstErr, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}

	// Peak memory while they come back.
	var peak atomic.Uint64
	sampling, stopSampling := context.WithCancel(ctx)
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			if rss, _, err := scrape(sampling, metricsURL); err == nil && uint64(rss) > peak.Load() {
				peak.Store(uint64(rss))
			}
			select {
			case <-sampling.Done():
				return
			case <-t.C:
			}
		}
	}()

	var backNs, drainedNs atomic.Int64
	var attempts, lost atomic.Int64
	conns := make([]*client.Conn, n)
	for i, d := range devs {
		wg.Go(func() {
			b := client.Backoff{Min: *minWait}
			var conn *client.Conn
			for ctx.Err() == nil {
				if err := b.Wait(ctx); err != nil {
					break
				}
				attempts.Add(1)
				c, err := dialAuth(ctx, server, d.d.name, d.key)
				if err != nil {
					continue
				}
				conn = c
				break
			}
			if conn == nil {
				lost.Add(1)
				return
			}
			conns[i] = conn
			maxStore(&backNs, int64(time.Since(drop)))
			for {
				select {
				case ev, ok := <-conn.Events():
					if !ok {
						lost.Add(1)
						return
					}
					if env := ev.GetEnvelope(); env != nil && env.Type == wirepb.EnvelopeType_SIGNAL_MESSAGE {
						maxStore(&drainedNs, int64(time.Since(drop)))
						go conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
						return
					}
				case <-ctx.Done():
					lost.Add(1)
					return
				}
			}
		})
	}
	wg.Wait()
	stopSampling()
	<-sampled
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	res := stormResult{Devices: n, BackMs: float64(backNs.Load()) / 1e6, DrainedMs: float64(drainedNs.Load()) / 1e6,
		Reconnects: int(attempts.Load()), PeakRSSBytes: float64(peak.Load()), BeforeRSSBytes: before, Lost: int(lost.Load())}
	if *asJSON {
		return json.NewEncoder(os.Stdout).Encode(res)
	}
	fmt.Printf("storm: %d devices dropped at once, back after %.0f ms, drained after %.0f ms (%d connect attempts), lost %d\n",
		res.Devices, res.BackMs, res.DrainedMs, res.Reconnects, res.Lost)
	fmt.Printf("server memory: %.1f MiB before, peak %.1f MiB\n", res.BeforeRSSBytes/(1<<20), res.PeakRSSBytes/(1<<20))
	return nil
}

func maxStore(v *atomic.Int64, x int64) {
	for {
		old := v.Load()
		if x <= old || v.CompareAndSwap(old, x) {
			return
		}
	}
}
