// Package ratelimit keeps per-client request budgets (SPEC.md "Security and
// limits"): a token bucket per client identity, refilled at Limit.Rate
// requests a second and holding at most Limit.Burst.
//
// Two Limiters implement it. Local keeps the buckets in this process
// (golang.org/x/time/rate). Redis keeps one GCRA bucket per client in Redis,
// so the budget holds across every instance, and hands tokens out to the
// instances in small leases so that a request rarely waits for Redis; when
// Redis is down or slow it fails open to a Local bucket of the budget divided
// by the number of instances it last saw. docs/limits.md compares the two.
package ratelimit

import (
	"math"
	"time"
)

// Limit is a token bucket: Rate requests a second on average, at most Burst
// at once. A zero Rate means unlimited.
type Limit struct {
	Rate  float64
	Burst int
}

// Unlimited reports whether l limits nothing.
func (l Limit) Unlimited() bool { return l.Rate <= 0 }

// burst is Burst, at least 1: a bucket that holds no token would refuse
// every request, which is what Rate 0 is not.
func (l Limit) burst() int { return max(l.Burst, 1) }

// Window is how long an empty bucket takes to fill again: Burst / Rate,
// rounded up to whole seconds (at least 1), as the RateLimit-Policy field's
// w parameter wants it.
func (l Limit) Window() int {
	if l.Unlimited() {
		return 0
	}
	return max(1, int(math.Ceil(float64(l.burst())/l.Rate)))
}

// Decision is the answer for one request.
type Decision struct {
	Allowed bool
	// Remaining is how many more requests the client may send now.
	Remaining int
	// Reset is how long until the client's bucket is full again.
	Reset time.Duration
	// RetryAfter is, for a refused request, how long until the next one
	// can be allowed.
	RetryAfter time.Duration
}

// Limiter decides whether a client may make a request now. Allow is called
// on every request and must be cheap; it is safe for concurrent use.
type Limiter interface {
	// Allow takes one token from key's bucket under limit l.
	Allow(key string, l Limit) Decision
	// Close releases the limiter's goroutines and connections.
	Close() error
}

// seconds converts a token count deficit into a duration at rate r.
func seconds(tokens, r float64) time.Duration {
	return time.Duration(tokens / r * float64(time.Second))
}
