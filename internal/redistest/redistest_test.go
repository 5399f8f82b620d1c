package redistest

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestRestartIsEmpty(t *testing.T) {
	s := Start(t)
	if s.Addr() == "127.0.0.1:6379" {
		t.Fatal("uses the machine's own Redis port")
	}
	c := redis.NewClient(&redis.Options{Addr: s.Addr(), MaxRetries: 3})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	addr := s.Addr()
	s.Restart()
	if s.Addr() != addr {
		t.Fatalf("restart moved from %s to %s", addr, s.Addr())
	}
	n, err := c.DBSize(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("restarted Redis holds %d keys", n)
	}
	s.Kill()
	s.Kill() // twice is fine
	if err := ping(addr); err == nil {
		t.Fatal("Redis answers after Kill")
	}
}
