package cluster

import (
	"errors"
	"fmt"
	"net/url"

	"github.com/redis/go-redis/v9"
)

// ErrRedisURL wraps a --redis URL that does not parse.
var ErrRedisURL = errors.New("cluster: bad redis URL")

// NewRedis returns a client for a --redis URL, go-redis's own URL forms:
//
//	redis://[user:pass@]host:port[/db]                     one Redis (rediss:// for TLS)
//	redis://host:port?master_name=NAME&addr=host2:port2    Sentinel set (the hosts are sentinels)
//	redis://host:port?addr=host2:port2&addr=host3:port3    Redis Cluster (seed nodes)
//	redis://host:port?cluster=1                            Redis Cluster from one seed node
//
// Other query parameters are go-redis options (dial_timeout=3s, …).
func NewRedis(raw string) (redis.UniversalClient, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrRedisURL, err)
	}
	q := u.Query()
	forceCluster := q.Get("cluster") == "1" || q.Get("cluster") == "true"
	q.Del("cluster")
	u.RawQuery = q.Encode()
	switch {
	case q.Get("master_name") != "":
		o, err := redis.ParseFailoverURL(u.String())
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrRedisURL, err)
		}
		return redis.NewFailoverClient(o), nil
	case forceCluster || len(q["addr"]) > 0:
		o, err := redis.ParseClusterURL(u.String())
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrRedisURL, err)
		}
		return redis.NewClusterClient(o), nil
	default:
		o, err := redis.ParseURL(u.String())
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrRedisURL, err)
		}
		return redis.NewClient(o), nil
	}
}
