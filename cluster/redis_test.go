package cluster

import (
	"errors"
	"testing"

	"github.com/redis/go-redis/v9"
)

func TestNewRedis(t *testing.T) {
	for name, tc := range map[string]struct {
		url  string
		kind string // "client", "cluster", or "" for an error
	}{
		"single":        {"redis://127.0.0.1:6400/2", "client"},
		"tls":           {"rediss://user:pw@redis.example:6380", "client"},
		"sentinel":      {"redis://127.0.0.1:26379?master_name=ferry&addr=127.0.0.1:26380", "client"},
		"cluster seeds": {"redis://127.0.0.1:7000?addr=127.0.0.1:7001&addr=127.0.0.1:7002", "cluster"},
		"cluster one":   {"redis://127.0.0.1:7000?cluster=1", "cluster"},
		"bad scheme":    {"http://127.0.0.1:6379", ""},
		"bad option":    {"redis://127.0.0.1:6379?no_such_option=1", ""},
	} {
		t.Run(name, func(t *testing.T) {
			c, err := NewRedis(tc.url)
			if tc.kind == "" {
				if !errors.Is(err, ErrRedisURL) {
					t.Fatalf("NewRedis(%q) = %v, want ErrRedisURL", tc.url, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_, isCluster := c.(*redis.ClusterClient)
			if isCluster != (tc.kind == "cluster") {
				t.Fatalf("NewRedis(%q) is %T, want %s", tc.url, c, tc.kind)
			}
		})
	}
}
