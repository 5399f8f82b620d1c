package client

import (
	"context"
	"testing"
	"time"
)

func TestServerURL(t *testing.T) {
	tests := map[string]struct {
		in, want string
		err      bool
	}{
		"ws host":         {in: "ws://127.0.0.1:7600", want: "ws://127.0.0.1:7600/v1/ws"},
		"wss with slash":  {in: "wss://chat.example/", want: "wss://chat.example/v1/ws"},
		"http becomes ws": {in: "http://h:1", want: "ws://h:1/v1/ws"},
		"https → wss":     {in: "https://h", want: "wss://h/v1/ws"},
		"explicit path":   {in: "ws://h/custom", want: "ws://h/custom"},
		"no scheme":       {in: "127.0.0.1:7600", err: true},
		"bad scheme":      {in: "ftp://h", err: true},
		"empty":           {in: "", err: true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ServerURL(tc.in)
			if (err != nil) != tc.err || got != tc.want {
				t.Fatalf("ServerURL(%q) = %q, %v; want %q (error %v)", tc.in, got, err, tc.want, tc.err)
			}
		})
	}
}

func TestBackoffGrowsWithJitterAndResets(t *testing.T) {
	b := Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	for n := range 12 {
		hi := min(time.Second, 100*time.Millisecond<<n)
		d := b.Next()
		if d < 50*time.Millisecond || d > hi {
			t.Fatalf("wait %d = %v, want in [50ms, %v]", n, d, hi)
		}
	}
	// Jitter: many draws at the cap are not all equal.
	seen := map[time.Duration]bool{}
	for range 20 {
		seen[b.Next()] = true
	}
	if len(seen) < 5 {
		t.Fatalf("only %d distinct waits: no jitter", len(seen))
	}
	b.Reset()
	if d := b.Next(); d > 100*time.Millisecond {
		t.Fatalf("after Reset wait = %v, want <= Min", d)
	}
}

// TestWaitRetryAfter: a dial refused with Retry-After (429 over the per-IP
// connection limit) waits at least that long; an ended context stops the
// wait at once.
func TestWaitRetryAfter(t *testing.T) {
	var bo Backoff
	start := time.Now()
	if err := waitRetryAfter(context.Background(), &DialError{StatusCode: 429, RetryAfter: 30 * time.Millisecond}, &bo); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 30*time.Millisecond {
		t.Fatalf("waited %v, Retry-After was 30ms", d)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := waitRetryAfter(ctx, &DialError{StatusCode: 429, RetryAfter: time.Hour}, &bo); err == nil {
		t.Fatal("an ended context did not stop the wait")
	}
}
