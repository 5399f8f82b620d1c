package relay

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"golang.org/x/time/rate"
)

// BenchmarkSendDeliver measures one message's trip on loopback through a
// real TCP WebSocket and a Pebble store on disk (fsync included): Send →
// synced commit → ✓, and Send → envelope read by the recipient. One message
// in flight at a time, so it is latency, not throughput.
func BenchmarkSendDeliver(b *testing.B) {
	db, err := store.Open(b.TempDir(), store.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	var srv *Server
	ib, err := inbox.New(db, inbox.Options{SweepInterval: -1, OnAppend: func(d []wire.DeviceAddr) { srv.OnAppend(d) }})
	if err != nil {
		b.Fatal(err)
	}
	defer ib.Close()
	srv = New(Config{Logger: slog.New(slog.DiscardHandler), SendRate: rate.Inf}, Deps{Accounts: device.New(db, device.Options{}),
		Prekeys: keys.New(db, keys.Options{}), Inbox: ib})
	hs := httptest.NewServer(srv.Handler())
	defer hs.Close()
	url := "ws" + strings.TrimPrefix(hs.URL, "http")
	ctx := context.Background()
	reg := func(name string) *client.Conn {
		_, key, _ := ed25519.GenerateKey(rand.Reader)
		c, err := client.Dial(ctx, url, client.DialOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Register(ctx, name, key, 7); err != nil {
			b.Fatal(err)
		}
		return c
	}
	alice, bob := reg("alice"), reg("bob")
	defer alice.Close()
	defer bob.Close()
	payload := make([]byte, 160)
	var ackLat, delLat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		_, err := alice.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
			ClientMsgId: fmt.Sprint("m", i), To: "bob", Ciphertexts: []*wirepb.DeviceCiphertext{{
				Username: "bob", DeviceId: 1, RegistrationId: 7, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: payload}}}}})
		if err != nil {
			b.Fatal(err)
		}
		ackLat = append(ackLat, time.Since(t0))
		for {
			ev := <-bob.Events()
			if env := ev.GetEnvelope(); env != nil {
				delLat = append(delLat, time.Since(t0))
				go bob.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
				break
			}
		}
	}
	b.StopTimer()
	q := func(xs []time.Duration, p float64) float64 {
		slices.Sort(xs)
		return float64(xs[min(len(xs)-1, int(p*float64(len(xs))))].Microseconds()) / 1000
	}
	b.ReportMetric(q(ackLat, 0.5), "ack-p50-ms")
	b.ReportMetric(q(ackLat, 0.99), "ack-p99-ms")
	b.ReportMetric(q(delLat, 0.5), "deliver-p50-ms")
	b.ReportMetric(q(delLat, 0.99), "deliver-p99-ms")
}
