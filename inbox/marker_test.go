package inbox

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// mark is a DELIVERED marker from reader for to with key "k|"+conv+"|"+reader.
func mark(to, reader wire.DeviceAddr, conv string, seq uint64) Entry {
	return Entry{To: to, Coalesce: "delivered|" + conv + "|" + reader.String(),
		Env: &wirepb.Envelope{Sender: reader.Account, SenderDevice: reader.Device, Type: wirepb.EnvelopeType_RECEIPT,
			Receipt: &wirepb.Receipt{Kind: wirepb.ReceiptKind_DELIVERED, Username: reader.Account, DeviceId: reader.Device, To: "bob", Seq: seq}}}
}

// markerSeqs returns the receipt seqs of dev's entries, checking Depth too.
func markerSeqs(t *testing.T, s *Store, dev wire.DeviceAddr) []uint64 {
	t.Helper()
	items := rangeAll(t, s, dev)
	var seqs []uint64
	for _, it := range items {
		seqs = append(seqs, it.Env.GetReceipt().GetSeq())
	}
	if got := depth(t, s, dev); got != (depthWant{uint64(len(items)), sizes(items)}) {
		t.Errorf("%s: Depth %+v, want %d entries of %d bytes", dev, got, len(items), sizes(items))
	}
	return seqs
}

func mustMark(t *testing.T, s *Store, want int, es ...Entry) {
	t.Helper()
	n, err := s.AppendMarkers(context.Background(), es)
	if err != nil || n != want {
		t.Fatalf("AppendMarkers = %d, %v; want %d written", n, err, want)
	}
}

func TestMarkersCoalesceAcks(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, Options{})
	const n = 12
	for i := 1; i <= n; i++ {
		mustAppend(t, s, send(alice1, fmt.Sprint("m", i), "alice|bob", "hi", bob1))
	}
	// bob1 acks one message at a time; each ack leaves markers for both of
	// alice's devices in the same batch.
	for id := uint64(1); id <= n; id++ {
		follow := map[uint64][]Entry{id: {mark(alice1, bob1, "alice|bob", id), mark(alice2, bob1, "alice|bob", id)}}
		if del, err := s.Ack(ctx, bob1, []uint64{id}, follow); err != nil || len(del) != 1 {
			t.Fatalf("Ack(%d) = %v, %v", id, del, err)
		}
		for _, d := range []wire.DeviceAddr{alice1, alice2} {
			if got := markerSeqs(t, s, d); len(got) != 1 || got[0] != id {
				t.Fatalf("after ack %d %s holds markers %v, want [%d]", id, d, got, id)
			}
		}
	}
	// One ack of several ids with markers under each: the highest counts.
	for i := 1; i <= 3; i++ {
		mustAppend(t, s, send(alice1, fmt.Sprint("x", i), "alice|bob", "hi", bob1))
	}
	follow := map[uint64][]Entry{}
	for id := uint64(n + 1); id <= n+3; id++ {
		follow[id] = []Entry{mark(alice1, bob1, "alice|bob", id)}
	}
	if _, err := s.Ack(ctx, bob1, []uint64{n + 3, n + 1, n + 2}, follow); err != nil {
		t.Fatal(err)
	}
	if got := markerSeqs(t, s, alice1); len(got) != 1 || got[0] != n+3 {
		t.Errorf("alice1 markers %v, want [%d]", got, n+3)
	}
	// Another reader device, another key: its own marker.
	mustMark(t, s, 1, mark(alice1, bob2, "alice|bob", 2))
	if got := markerSeqs(t, s, alice1); len(got) != 2 {
		t.Errorf("alice1 markers %v, want two (one per reader device)", got)
	}
}

func TestMarkerLowerSeqNeverReplaces(t *testing.T) {
	s, _ := newStore(t, Options{})
	mustMark(t, s, 1, mark(alice1, bob1, "c", 5))
	mustMark(t, s, 0, mark(alice1, bob1, "c", 3))
	mustMark(t, s, 0, mark(alice1, bob1, "c", 5))
	if got := markerSeqs(t, s, alice1); len(got) != 1 || got[0] != 5 {
		t.Fatalf("markers %v, want [5]", got)
	}
	// Several of one key in one call: only the highest is written.
	mustMark(t, s, 1, mark(alice1, bob1, "c", 7), mark(alice1, bob1, "c", 9), mark(alice1, bob1, "c", 8))
	if got := markerSeqs(t, s, alice1); len(got) != 1 || got[0] != 9 {
		t.Fatalf("markers %v, want [9]", got)
	}
}

func TestMarkersConcurrent(t *testing.T) {
	s, _ := newStore(t, Options{})
	var wg sync.WaitGroup
	for i := 1; i <= 40; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.AppendMarkers(context.Background(), []Entry{mark(alice1, bob1, "c", uint64(i))}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got := markerSeqs(t, s, alice1); len(got) != 1 || got[0] != 40 {
		t.Fatalf("markers %v, want [40]", got)
	}
}

func TestMarkerAckedThenNew(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, Options{})
	mustMark(t, s, 1, mark(alice1, bob1, "c", 5))
	items := rangeAll(t, s, alice1)
	if _, err := s.Ack(ctx, alice1, itemIDs(items), nil); err != nil {
		t.Fatal(err)
	}
	// The index dangles; a new marker is written, even with a lower seq.
	mustMark(t, s, 1, mark(alice1, bob1, "c", 3))
	if got := markerSeqs(t, s, alice1); len(got) != 1 || got[0] != 3 {
		t.Fatalf("markers %v, want [3]", got)
	}
	mustMark(t, s, 1, mark(alice1, bob1, "c", 6))
	got := rangeAll(t, s, alice1)
	if ids := itemIDs(got); len(ids) != 1 || ids[0] != 3 || got[0].Env.Receipt.Seq != 6 {
		t.Fatalf("alice1 holds %v, want the marker with seq 6 as id 3", got)
	}
	// DeleteDevice drops the index too.
	if err := s.DeleteDevice(ctx, alice1); err != nil {
		t.Fatal(err)
	}
	mustMark(t, s, 1, mark(alice1, bob1, "c", 1))
	if got := markerSeqs(t, s, alice1); len(got) != 1 || got[0] != 1 {
		t.Fatalf("after DeleteDevice markers %v, want [1]", got)
	}
}

func TestMarkerSurvivesReopen(t *testing.T) {
	fs := vfs.NewMem()
	open := reopener(t, fs)
	s, db := open()
	mustMark(t, s, 1, mark(alice1, bob1, "c", 5))
	s.Close()
	db.Close()
	s, db = open()
	defer db.Close()
	defer s.Close()
	if got := markerSeqs(t, s, alice1); len(got) != 1 || got[0] != 5 {
		t.Fatalf("after reopen markers %v, want [5]", got)
	}
	mustMark(t, s, 0, mark(alice1, bob1, "c", 4))
	mustMark(t, s, 1, mark(alice1, bob1, "c", 8))
	if got := markerSeqs(t, s, alice1); len(got) != 1 || got[0] != 8 {
		t.Fatalf("markers %v, want [8]", got)
	}
}

func TestMarkerBadInput(t *testing.T) {
	s, _ := newStore(t, Options{})
	ctx := context.Background()
	plain := mark(alice1, bob1, "c", 1)
	plain.Coalesce = ""
	noReceipt := mark(alice1, bob1, "c", 1)
	noReceipt.Env.Receipt = nil
	for _, e := range []Entry{plain, noReceipt} {
		if _, err := s.AppendMarkers(ctx, []Entry{e}); wire.CodeOf(err) != wirepb.ErrorCode_BAD_REQUEST {
			t.Errorf("AppendMarkers(%+v) = %v, want BAD_REQUEST", e, err)
		}
	}
	if n, err := s.AppendMarkers(ctx, nil); n != 0 || err != nil {
		t.Errorf("AppendMarkers(nil) = %d, %v", n, err)
	}
}
