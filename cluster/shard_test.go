package cluster

import (
	"errors"
	"testing"
)

// TestShardMapStable pins the hash: changing it would move every account
// of a running cluster to another shard.
func TestShardMapStable(t *testing.T) {
	m, err := NewShardMap(256)
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		user string
		want ShardID
	}{
		"alice": {"alice", 73},
		"bob":   {"bob", 59},
		"empty": {"", 153},
		"long":  {"user_with_a_long_name_0123456789", 192},
	} {
		t.Run(name, func(t *testing.T) {
			if got := m.Account(tc.user); got != tc.want {
				t.Fatalf("Account(%q) = %d, want %d", tc.user, got, tc.want)
			}
		})
	}
	var g [16]byte
	for i := range g {
		g[i] = byte(i)
	}
	if got := m.Group(g); got != 247 {
		t.Fatalf("Group(00..0f) = %d, want %d", got, 247)
	}
}

func TestShardMapRange(t *testing.T) {
	for _, n := range []int{0, -1, MaxShards + 1} {
		if _, err := NewShardMap(n); !errors.Is(err, ErrShardCount) {
			t.Errorf("NewShardMap(%d) = %v, want ErrShardCount", n, err)
		}
	}
	m, _ := NewShardMap(7)
	seen := map[ShardID]bool{}
	for i := range 1000 {
		s := m.Account("u" + string(rune('a'+i%26)) + string(rune('a'+i/26%26)) + string(rune('a'+i/676)))
		if int(s) >= 7 {
			t.Fatalf("shard %d out of range", s)
		}
		seen[s] = true
	}
	if len(seen) != 7 {
		t.Fatalf("1000 accounts hit only %d of 7 shards", len(seen))
	}
}
