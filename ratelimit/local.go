package ratelimit

import (
	"fmt"
	"time"

	"github.com/maypok86/otter/v2"
	"golang.org/x/time/rate"
)

// DefaultMaxClients bounds the buckets a Local limiter keeps. A bucket is
// about 200 bytes with its map entry, so 100,000 clients cost some 20 MiB;
// past it the least recently seen client's bucket is dropped, which only
// gives that client a full bucket again.
const DefaultMaxClients = 100_000

// Local keeps a token bucket per client in this process. Each instance of
// a cluster keeps its own, so a client spread over N instances gets up to N
// times its budget; Redis (or a Local limit divided by N) holds the budget
// across them.
type Local struct {
	buckets *otter.Cache[string, *bucket]
}

// bucket is one client's token bucket and the limit it was made for; a
// client whose limit changes gets a new bucket.
type bucket struct {
	limit Limit
	tb    *rate.Limiter
}

var _ Limiter = (*Local)(nil)

func newBucket(l Limit) *bucket {
	return &bucket{limit: l, tb: rate.NewLimiter(rate.Limit(l.Rate), l.burst())}
}

// NewLocal returns a Local limiter keeping at most maxClients buckets
// (DefaultMaxClients when 0).
func NewLocal(maxClients int) (*Local, error) {
	if maxClients <= 0 {
		maxClients = DefaultMaxClients
	}
	c, err := otter.New(&otter.Options[string, *bucket]{
		// Bounded by count only: an expiry refreshed on every access cost
		// a third of the limit's time on the hot path (otter's expiry
		// bookkeeping), and an idle client's bucket is full again after
		// its window anyway, so an old one is as good as a new one; the
		// size bound evicts the least useful when clients churn.
		MaximumSize: maxClients,
	})
	if err != nil {
		return nil, fmt.Errorf("ratelimit: local buckets: %w", err)
	}
	return &Local{buckets: c}, nil
}

// Allow takes a token from key's bucket.
func (l *Local) Allow(key string, lim Limit) Decision {
	if lim.Unlimited() {
		return Decision{Allowed: true, Remaining: lim.burst()}
	}
	b, ok := l.buckets.GetIfPresent(key)
	switch {
	case !ok:
		// A racing request may have made it first: use the one kept.
		b, _ = l.buckets.SetIfAbsent(key, newBucket(lim))
	case b.limit != lim:
		b = newBucket(lim)
		l.buckets.Set(key, b)
	}
	now := time.Now()
	allowed := b.tb.AllowN(now, 1)
	tokens := b.tb.TokensAt(now)
	d := Decision{
		Allowed:   allowed,
		Remaining: max(0, int(tokens)),
		Reset:     seconds(float64(lim.burst())-tokens, lim.Rate),
	}
	if !allowed {
		d.RetryAfter = seconds(1-tokens, lim.Rate)
	}
	return d
}

// Close stops the bucket map's maintenance.
func (l *Local) Close() error {
	l.buckets.StopAllGoroutines()
	return nil
}
