package inbox

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/ferryhq/ferry/wire"
)

// TestReadersNeverSeeAGap is the test of design invariant 2: many writers
// append to overlapping devices while one reader per device follows its
// inbox with Range(after cursor), woken by OnAppend like a relay session.
// A reader must only ever see ids cursor+1, cursor+2, ... (no acks or expiry
// here, so a jump means it could skip a message that commits later), and in
// the end every reader must have seen each message sent to its device
// exactly once.
func TestReadersNeverSeeAGap(t *testing.T) {
	const writers, sendsPerWriter, readLimit = 16, 40, 3
	devs := []wire.DeviceAddr{alice1, alice2, bob1, bob2, carol1}
	wake := make(map[wire.DeviceAddr]chan struct{}, len(devs))
	for _, d := range devs {
		wake[d] = make(chan struct{}, 1)
	}
	s, _ := newStore(t, Options{MaxGroup: 8, OnAppend: func(ds []wire.DeviceAddr) {
		for _, d := range ds {
			select {
			case wake[d] <- struct{}{}:
			default: // a wake-up is pending already
			}
		}
	}})
	ctx := context.Background()

	var mu sync.Mutex
	sent := map[wire.DeviceAddr]map[string]bool{} // device -> contents sent to it
	for _, d := range devs {
		sent[d] = map[string]bool{}
	}
	writersDone := make(chan struct{})
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for n := range sendsPerWriter {
				var to []wire.DeviceAddr
				for _, i := range rng.Perm(len(devs))[:1+rng.IntN(3)] {
					to = append(to, devs[i])
				}
				text := fmt.Sprintf("w%d-%d", w, n)
				if _, err := s.Append(ctx, send(alice1, text, fmt.Sprint("conv", w%3), text, to...)); err != nil {
					t.Errorf("Append: %v", err)
					return
				}
				mu.Lock()
				for _, d := range to {
					sent[d][text] = true
				}
				mu.Unlock()
			}
		})
	}

	type seen struct {
		cursor   uint64
		contents map[string]int
	}
	results := make(map[wire.DeviceAddr]*seen, len(devs))
	var readers sync.WaitGroup
	for _, dev := range devs {
		r := &seen{contents: map[string]int{}}
		results[dev] = r
		readers.Go(func() {
			done := false
			for {
				items, err := s.Range(ctx, dev, r.cursor, readLimit)
				if err != nil {
					t.Errorf("Range: %v", err)
					return
				}
				for _, it := range items {
					if it.ID != r.cursor+1 {
						t.Errorf("%s: read id %d after cursor %d: a gap", dev, it.ID, r.cursor)
					}
					r.cursor = it.ID
					r.contents[string(it.Env.Content)]++
				}
				if len(items) > 0 {
					continue
				}
				if done {
					return // drained after every writer returned
				}
				select {
				case <-wake[dev]:
				case <-writersDone:
					done = true
				}
			}
		})
	}
	wg.Wait()
	close(writersDone)
	readers.Wait()

	total := 0
	for _, dev := range devs {
		r := results[dev]
		if r.cursor != uint64(len(sent[dev])) {
			t.Errorf("%s: reader ended at id %d, %d entries were sent", dev, r.cursor, len(sent[dev]))
		}
		for text := range sent[dev] {
			if r.contents[text] != 1 {
				t.Errorf("%s: %s seen %d times", dev, text, r.contents[text])
			}
		}
		total += len(sent[dev])
	}
	if total == 0 {
		t.Fatal("nothing was sent")
	}
}
