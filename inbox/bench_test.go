package inbox

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"github.com/prometheus/client_golang/prometheus"
)

// BenchmarkAppendSync measures durable appends on the real disk: each op is
// one Send (dedup record, conversation seq, one ~200-byte envelope) to one
// of 10,000 devices, from 1, 16 or 256 concurrent writers. Concurrent
// writers share fsyncs through group commit; ops/group is the mean number
// of ops per commit.
func BenchmarkAppendSync(b *testing.B) {
	const devices, senders = 10000, 1000
	content := make([]byte, 160) // one padding bucket of ciphertext
	for _, writers := range []int{1, 16, 256} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			db, err := store.Open(b.TempDir(), store.Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			reg := prometheus.NewRegistry()
			s, err := New(db, Options{SweepInterval: -1, Registerer: reg})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			sendN := func(i int) Send {
				from := wire.DeviceAddr{Account: "sender" + strconv.Itoa(i%senders), Device: 1}
				to := wire.DeviceAddr{Account: "user" + strconv.Itoa(i%devices), Device: 1}
				id := strconv.Itoa(i)
				return Send{Sender: from, ClientMsgID: id, Conversation: from.Account + "|" + to.Account,
					Entries: []Entry{{To: to, Env: &wirepb.Envelope{Sender: from.Account, SenderDevice: 1,
						To: to.Account, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: content, ClientMsgId: id}}}}
			}

			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			start := time.Now()
			for range writers {
				wg.Go(func() {
					for i := int(next.Add(1) - 1); i < b.N; i = int(next.Add(1) - 1) {
						if _, err := s.Append(context.Background(), sendN(i)); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()

			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "appends/s")
			ops, groups := metricValue(b, reg, "ferry_inbox_commit_group_ops", nil)
			b.ReportMetric(ops/float64(groups), "ops/group")
			items, err := s.Range(context.Background(), wire.DeviceAddr{Account: "user0", Device: 1}, 0, 1)
			if err != nil || len(items) != 1 {
				b.Fatalf("user0 inbox: %v, %v", items, err)
			}
			b.ReportMetric(float64(items[0].Size), "bytes/entry")
		})
	}
}
