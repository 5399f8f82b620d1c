package presence

import (
	"context"
	"slices"
	"testing"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// FuzzRequests: whatever a client puts in SetPresencePrivacy or a
// subscription list, the checks never panic, an accepted allowlist is
// sorted, unique and valid, and an accepted list is within the bound.
func FuzzRequests(f *testing.F) {
	for _, m := range []proto.Message{
		&wirepb.SetPresencePrivacy{Visibility: wirepb.PresenceVisibility_ALLOWLIST, Allow: []string{"carol", "alice", "alice"}},
		&wirepb.SetPresencePrivacy{Visibility: wirepb.PresenceVisibility_NOBODY},
		&wirepb.SetPresencePrivacy{Visibility: 9, Allow: []string{"X"}},
	} {
		b, _ := proto.Marshal(m)
		f.Add(b)
	}
	f.Add([]byte{})
	tr := NewTracker(nil, Options{FlapWindow: -1, MaxSubscriptions: 8})
	defer tr.Close()
	f.Fuzz(func(t *testing.T, b []byte) {
		var m wirepb.SetPresencePrivacy
		if proto.Unmarshal(b, &m) != nil {
			return
		}
		if p, err := NormalizePrivacy(m.Visibility, m.Allow); err == nil {
			if !slices.IsSorted(p.Allow) || len(slices.Compact(slices.Clone(p.Allow))) != len(p.Allow) {
				t.Fatalf("allowlist %v not sorted and unique", p.Allow)
			}
			for _, a := range p.Allow {
				if device.ValidateUsername(a) != nil {
					t.Fatalf("accepted bad name %q", a)
				}
				_ = Visible(p, "bob", a)
			}
		}
		got, err := tr.Get(context.Background(), "alice", m.Allow)
		if err == nil && (len(got) > 8 || len(got) > len(m.Allow)) {
			t.Fatalf("answered %d of %d names over the bound", len(got), len(m.Allow))
		}
	})
}
