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

// BenchmarkAppendGroup measures one durable group message to 2,048
// recipient devices (1,024 accounts with 2 devices each) on the real disk:
// the body is stored once and each device gets a small entry referring to
// it. bytes/msg is the size of the committed batch (what goes to the WAL
// and later the memtable); it must not grow with body size × devices. The
// copies case is the same fan-out with one full envelope per device, as a
// 1:1 send would store it, for comparison.
func BenchmarkAppendGroup(b *testing.B) {
	const devices = 2048
	to := recipients(devices, 2)
	for _, bc := range []struct {
		name   string
		body   int
		copies bool
		inline int
	}{
		{"queued/body=160", 160, false, 0},
		{"queued/body=16KiB", 16 << 10, false, 0},
		{"inline/body=160", 160, false, devices},
		{"inline/body=16KiB", 16 << 10, false, devices},
		{"copies/body=160", 160, true, 0},
		{"copies/body=16KiB", 16 << 10, true, 0},
	} {
		b.Run(bc.name, func(b *testing.B) {
			db, err := store.Open(b.TempDir(), store.Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			c := &batchBytes{}
			s, err := New(db, Options{SweepInterval: -1, commit: c.commit, FanoutInline: bc.inline})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			content := make([]byte, bc.body)
			appendOne := func(i int) {
				id := strconv.Itoa(i)
				var err error
				if bc.copies {
					m := Send{Sender: alice1, ClientMsgID: id, Conversation: "g:" + testGroup, Entries: make([]Entry, len(to))}
					for j, d := range to {
						m.Entries[j] = Entry{To: d, Env: &wirepb.Envelope{Sender: "alice", SenderDevice: 1, GroupId: testGroup,
							Type: wirepb.EnvelopeType_SENDER_KEY_MESSAGE, Content: content, ClientMsgId: id}}
					}
					_, err = s.Append(context.Background(), m)
				} else {
					m := groupSend(alice1, id, "", to...)
					m.Body = content
					_, err = s.AppendGroup(context.Background(), m)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			appendOne(-1) // creates every device's meta
			waitFanout(b, s, db)
			c.n.Store(0)
			var ack time.Duration
			b.ResetTimer()
			for i := range b.N {
				t0 := time.Now()
				appendOne(i)
				ack += time.Since(t0)
			}
			waitFanout(b, s, db) // ns/op: until every entry is written
			b.StopTimer()
			b.ReportMetric(float64(ack.Microseconds())/1000/float64(b.N), "ack-ms/msg")
			b.ReportMetric(float64(c.n.Load())/float64(b.N), "bytes/msg")
			b.ReportMetric(float64(c.n.Load())/float64(b.N)/devices, "bytes/device")
		})
	}
}
