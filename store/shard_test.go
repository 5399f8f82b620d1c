package store

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/store/storepb"
)

func TestConversationOwner(t *testing.T) {
	gid := "00112233445566778899aabbccddeeff"
	tests := []struct {
		conv string
		want Owner
		ok   bool
	}{
		{"d:alice:bob", Owner{Account: "alice"}, true},
		{"d:bob:alice", Owner{Account: "alice"}, true}, // the lower name, whatever the order
		{"g:" + gid, Owner{Group: string([]byte{0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff})}, true},
		{"g:" + gid[2:], Owner{}, false},
		{"g:zz" + gid[2:], Owner{}, false},
		{"d:alice", Owner{}, false},
		{"d::bob", Owner{}, false},
		{"d:a:b:c", Owner{}, false},
		{"x:alice:bob", Owner{}, false},
		{"", Owner{}, false},
	}
	for _, tc := range tests {
		got, ok := ConversationOwner(tc.conv)
		if got != tc.want || ok != tc.ok {
			t.Errorf("ConversationOwner(%q) = %+v, %v; want %+v, %v", tc.conv, got, ok, tc.want, tc.ok)
		}
	}
}

func TestAccountOf(t *testing.T) {
	tests := []struct {
		key  string
		n    int
		sep  bool
		want string
		ok   bool
	}{
		{"aalice", 1, false, "alice", true},
		{"a", 1, false, "", false},
		{"aal\x00ice", 1, false, "", false},
		{"palice\x00\x00\x00\x00\x01", 1, true, "alice", true},
		{"palice", 1, true, "", false},
		{"p\x00\x00\x00\x00\x01", 1, true, "", false},
		{"ksbob\x00\x00\x00\x00\x02", 2, true, "bob", true},
	}
	for _, tc := range tests {
		got, ok := AccountOf([]byte(tc.key), tc.n, tc.sep)
		if got.Account != tc.want || ok != tc.ok || got.Group != "" {
			t.Errorf("AccountOf(%q) = %+v, %v; want %q, %v", tc.key, got, ok, tc.want, tc.ok)
		}
	}
}

func TestShardFilterOwns(t *testing.T) {
	f := ShardFilter{Account: func(u string) bool { return u == "alice" }, Group: func(id []byte) bool { return string(id) == "G" }}
	tests := []struct {
		o    Owner
		want bool
	}{
		{Owner{Account: "alice"}, true},
		{Owner{Account: "bob"}, false},
		{Owner{Group: "G"}, true},
		{Owner{Group: "H"}, false},
		{Owner{}, false},
	}
	for _, tc := range tests {
		if got := f.Owns(tc.o); got != tc.want {
			t.Errorf("Owns(%+v) = %v", tc.o, got)
		}
		if (ShardFilter{}).Owns(tc.o) {
			t.Errorf("the zero filter owns %+v", tc.o)
		}
	}
}

// testKeys is a key space like push's: 'p' username 0x00 rest.
var testKeys = &KeySpace{
	Store:    "test",
	Prefixes: [][]byte{{PrefixPush}},
	Owner:    func(k []byte) (Owner, bool) { return AccountOf(k, 1, true) },
	Clear: func(_ pebble.Reader, o Owner) ([][2][]byte, error) {
		return [][2][]byte{PrefixRange(append([]byte{PrefixPush}, o.Account+"\x00"...))}, nil
	},
}

func TestKeysMove(t *testing.T) {
	ctx := context.Background()
	src, dst := mustMem(t), mustMem(t)
	for _, k := range []string{"palice\x00a", "palice\x00b", "palicex\x00a", "pbob\x00a", "qalice"} {
		if err := src.Set([]byte(k), []byte("v"+k), nil); err != nil {
			t.Fatal(err)
		}
	}
	// The target holds a stale record of alice: the import removes it.
	if err := dst.Set([]byte("palice\x00z"), []byte("stale"), nil); err != nil {
		t.Fatal(err)
	}
	f := ShardFilter{Account: func(u string) bool { return u == "alice" }}
	var recs []*storepb.ShardRecord
	if err := ExportKeys(ctx, src, testKeys, f, func(r *storepb.ShardRecord) error { recs = append(recs, r); return nil }); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := ImportKeys(ctx, dst, testKeys, recs); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := DropKeys(ctx, src, testKeys, f); err != nil {
		t.Fatal(err)
	}
	keys := func(db *pebble.DB) string {
		var ks []string
		for _, kv := range must(Dump(db)) {
			ks = append(ks, string(kv.Key))
		}
		return strings.Join(ks, " ")
	}
	if got, want := keys(dst), "palice\x00a palice\x00b"; got != want {
		t.Errorf("target: %q, want %q", got, want)
	}
	if got, want := keys(src), "palicex\x00a pbob\x00a qalice"; got != want {
		t.Errorf("source: %q, want %q", got, want)
	}
	for _, bad := range []*storepb.ShardRecord{
		{Store: "other", Key: []byte("palice\x00a")},
		{Store: "test", Key: []byte("qalice")},
		{Store: "test", Key: []byte("palice")},
	} {
		if _, err := ImportKeys(ctx, dst, testKeys, []*storepb.ShardRecord{bad}); !errors.Is(err, ErrShardRecord) {
			t.Errorf("import of %v: %v, want ErrShardRecord", bad, err)
		}
	}
}

func mustMem(t *testing.T) *pebble.DB {
	t.Helper()
	db, err := OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// FuzzConversationOwner: an owner is exactly one account (the lower name
// of a "d:" key) or one 16-byte group.
func FuzzConversationOwner(f *testing.F) {
	for _, s := range []string{"d:alice:bob", "g:00112233445566778899aabbccddeeff", "d::", "g:"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, conv string) {
		o, ok := ConversationOwner(conv)
		if !ok {
			if o != (Owner{}) {
				t.Fatalf("not ok but %+v", o)
			}
			return
		}
		switch {
		case o.Account != "" && o.Group == "":
			a, b, _ := strings.Cut(conv[2:], ":")
			if !strings.HasPrefix(conv, "d:") || o.Account != min(a, b) {
				t.Fatalf("%q: %+v", conv, o)
			}
		case o.Group != "" && o.Account == "":
			if !strings.HasPrefix(conv, "g:") || len(o.Group) != GroupIDSize {
				t.Fatalf("%q: %+v", conv, o)
			}
		default:
			t.Fatalf("%q: %+v", conv, o)
		}
	})
}
