package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"userapi"
	"userapi/cache"
	"userapi/http"
	"userapi/ratelimit"
	"userapi/shed"
)

// Defaults of the rate limit flags. 1000 requests a second per client is
// far above what an interactive client or a well-behaved batch job sends,
// and a small share of one instance's capacity (~10k uncached reads a
// second on 2 cores), so no single client can take an instance down; a burst
// of 2000 (two seconds' worth) lets a client catch up after a pause without
// a 429.
const (
	defaultRateLimit = 1000
	defaultRateBurst = 2000
)

// limitFlags registers the flags of rate limits, load shedding and
// connection caps.
func (c *config) limitFlags(fs *flag.FlagSet) {
	c.RateLimit = defaultRateLimit
	fs.Var((*rateFlag)(&c.RateLimit), "rate-limit", "requests a second each client may make on average (0 or off: no rate limit)")
	fs.IntVar(&c.RateBurst, "rate-burst", defaultRateBurst, "requests a client may make at once (its token bucket's size)")
	fs.StringVar(&c.RateLimitStore, "rate-limit-store", "auto", "where budgets are kept: redis (one budget across instances, failing open to local), local (each instance the budget divided by the live instances counted in Redis, or all of it without Redis), auto (redis when --redis is set)")
	fs.BoolVar(&c.Shed, "shed", true, "shed database-bound requests beyond an adaptive concurrency limit with 503 (cache hits are never shed)")
	fs.UintVar(&c.ShedMinLimit, "shed-min-limit", 0, "the fewest database-bound requests the adaptive limit admits at once (0: a batch, --max-batch; with --coalesce=false the limit is at most the pool's connections)")
	fs.DurationVar(&c.ShedMaxWait, "shed-max-wait", shed.DefaultMaxWait, "how long a request may wait for a place under the limit before its 503 (-1ns: refuse at once)")
	fs.IntVar(&c.MaxConns, "max-conns", http.DefaultMaxConns, "most open client connections (0: no cap)")
	fs.IntVar(&c.MaxConnsPerIP, "max-conns-per-ip", http.DefaultMaxConnsPerIP, "most open connections per client address, trusted proxies excepted (0: no cap)")
}

// rateFlag is a requests-a-second value that also takes "off" (0).
type rateFlag float64

func (r *rateFlag) String() string { return strconv.FormatFloat(float64(*r), 'g', -1, 64) }

func (r *rateFlag) Set(s string) error {
	if s == "off" {
		*r = 0
		return nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v < 0 {
		return fmt.Errorf("%q is not a rate (requests a second) or off", s)
	}
	*r = rateFlag(v)
	return nil
}

// rateLimiter returns the limiter --rate-limit-store asks for, or nil when
// rate limits are off.
func rateLimiter(c *config, log *slog.Logger, reg prometheus.Registerer) (ratelimit.Limiter, error) {
	if c.RateLimit <= 0 {
		return nil, nil
	}
	mode := ratelimit.Shared
	switch c.RateLimitStore {
	case "auto", "redis":
		if c.Redis == "" {
			if c.RateLimitStore == "redis" {
				return nil, fmt.Errorf("%w: --rate-limit-store redis needs --redis", errUsage)
			}
			return ratelimit.NewLocal(0)
		}
	case "local":
		if c.Redis == "" {
			return ratelimit.NewLocal(0)
		}
		mode = ratelimit.Divided
	default:
		return nil, fmt.Errorf("%w: --rate-limit-store %q is not auto, redis or local", errUsage, c.RateLimitStore)
	}
	return ratelimit.NewRedis(ratelimit.RedisConfig{
		URL:        c.Redis,
		KeyPrefix:  c.RedisPrefix,
		Mode:       mode,
		Timeout:    c.RedisTimeout,
		Logger:     log,
		Registerer: reg,
	})
}

// shedding puts the load shedder between the cache and store when --shed
// is on; admit is the cache loader's hook (cache.Config.Admit), nil when off.
//
// The limit's bounds follow the database's unit of work. Without
// coalescing every admitted read is a query of its own on its own
// connection: beyond the pool's connections an admitted request only waits
// in the pool's queue, where the limit cannot see it, and its latency grows
// by a whole query per connection's worth; so the limit is at most the
// connections. With coalescing one query carries up to --max-batch misses:
// a limit below a batch refuses reads that would have ridden in a query
// already being made, so --shed-min-limit 0 (the default) means a batch.
func shedding(c *config, store userapi.Store, log *slog.Logger, reg prometheus.Registerer) (userapi.Store, func(context.Context) (func(), error)) {
	if !c.Shed {
		return store, nil
	}
	cfg := shed.Config{MinLimit: c.ShedMinLimit, MaxWait: c.ShedMaxWait, Logger: log, Registerer: reg}
	if cfg.MinLimit == 0 && c.Coalesce {
		cfg.MinLimit = uint(cache.DefaultMaxBatch)
		if c.MaxBatch > 0 {
			cfg.MinLimit = uint(c.MaxBatch)
		}
	}
	// An uncoalesced read is a GetUser, which reads the primary: its
	// pool is what the limit is about, replicas or not.
	if p, ok := store.(interface{ PoolSize() int }); ok && p.PoolSize() > 0 && !c.Coalesce {
		cfg.MaxLimit = uint(p.PoolSize())
		if cfg.MinLimit == 0 || cfg.MinLimit > cfg.MaxLimit {
			cfg.MinLimit = cfg.MaxLimit
		}
	}
	l := shed.New(cfg)
	return shed.NewStore(store, l), l.Admit
}
