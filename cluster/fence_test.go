package cluster

import (
	"errors"
	"testing"
	"time"
)

func TestFence(t *testing.T) {
	clk := &testClock{}
	f := NewFence(clk.now)
	f.grant(3, 7, clk.now().Add(time.Second))

	for name, tc := range map[string]struct {
		shard ShardID
		epoch uint64
		ok    bool
	}{
		"held":        {3, 7, true},
		"older epoch": {3, 6, false},
		"newer epoch": {3, 8, false},
		"not held":    {4, 7, false},
	} {
		t.Run(name, func(t *testing.T) {
			err := f.Check(tc.shard, tc.epoch)
			if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrFenced)) {
				t.Fatalf("Check(%d, %d) = %v, want ok=%v", tc.shard, tc.epoch, err, tc.ok)
			}
		})
	}
	if e, ok := f.Epoch(3); !ok || e != 7 {
		t.Fatalf("Epoch(3) = %d, %v", e, ok)
	}

	// An older renewal's deadline never shortens a newer one's.
	f.grant(3, 7, clk.now().Add(time.Millisecond))
	clk.jump(500 * time.Millisecond)
	if err := f.Check(3, 7); err != nil {
		t.Fatalf("after an out-of-order renewal: %v", err)
	}

	// A pause past the deadline fails the check with no Redis involved.
	clk.jump(600 * time.Millisecond)
	if err := f.Check(3, 7); !errors.Is(err, ErrFenced) {
		t.Fatalf("after the deadline: %v, want ErrFenced", err)
	}
	if _, ok := f.Epoch(3); ok {
		t.Fatal("Epoch passes after the deadline")
	}
	if len(f.Held()) != 0 {
		t.Fatalf("Held after the deadline = %v", f.Held())
	}

	f.grant(5, 1, clk.now().Add(time.Second))
	f.revoke(5)
	if err := f.Check(5, 1); !errors.Is(err, ErrFenced) {
		t.Fatalf("after revoke: %v", err)
	}
}

func FuzzParseLease(f *testing.F) {
	for _, s := range []string{"a|b|1", "node-1|abc|18446744073709551615", "|x|1", "a|b|0", "a|b|c|1", "A|b|1", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		l, err := parseLease(1, v)
		if err != nil {
			if !errors.Is(err, ErrBadLease) {
				t.Fatalf("error %v does not wrap ErrBadLease", err)
			}
			return
		}
		// What parses prints back to a value that parses to the same lease.
		if l2, err := parseLease(1, leaseValue(l.Holder, l.Epoch)); err != nil || l2 != l {
			t.Fatalf("%q parsed to %+v, which does not round-trip: %+v, %v", v, l, l2, err)
		}
	})
}

func FuzzShardRecord(f *testing.F) {
	f.Add(ShardRecord{Seen: 9, Home: 3}.encode())
	f.Add([]byte{1, 2})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeShardRecord(b)
		if err != nil {
			return
		}
		if string(r.encode()) != string(b) {
			t.Fatalf("%x decodes to %+v, encodes to %x", b, r, r.encode())
		}
	})
}

// BenchmarkFenceCheck is the cost the fence adds to each write (twice).
func BenchmarkFenceCheck(b *testing.B) {
	f := NewFence(nil)
	for s := range ShardID(256) {
		f.grant(s, 1, time.Now().Add(time.Hour))
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		var s ShardID
		for pb.Next() {
			if err := f.Check(s%256, 1); err != nil {
				b.Fatal(err)
			}
			s++
		}
	})
}
