// Package shed sheds database-bound work under overload (SPEC.md "Security
// and limits"): an adaptive concurrency limit (failsafe-go's adaptive
// limiter) on the requests that reach the database. While the database
// keeps up, the limit grows with the load; when the requests' latency rises
// above its recent baseline because work is queueing, the limit comes down,
// and work beyond it fails at once with userapi.ErrOverloaded (503 with
// Retry-After), so the admitted requests keep their latency and the
// database its throughput instead of everyone waiting in one long queue.
//
// Store applies the limit to a store's per-request calls, between the cache
// and the database, so cache hits never meet it. The cache's loader gathers
// concurrent misses into multi-key loads, hiding the waiting requests from
// the store below it; it admits each miss with Limiter.Admit instead
// (cache.Config.Admit), and Store lets the multi-key loads through.
package shed

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/failsafe-go/failsafe-go/adaptivelimiter"
	"github.com/prometheus/client_golang/prometheus"

	"userapi"
)

// Defaults of Config. The limit counts requests waiting on the database,
// not connections: with batching, one query serves many of them.
const (
	// DefaultMinLimit keeps some work admitted whatever the latency says:
	// a database that is merely slow still serves its pool's worth.
	DefaultMinLimit = 16
	// DefaultInitialLimit is where the limit starts: the benchmarks' 64
	// connections fit, and it grows from there as long as latency holds.
	// Without Config.InitialLimit the limit starts at initialPerMin times
	// the minimum, which is this for the default minimum.
	DefaultInitialLimit = initialPerMin * DefaultMinLimit
	initialPerMin       = 4
	// DefaultMaxLimit bounds the limit at what one instance's loaders can
	// keep the database busy with (2 loads of up to 128 ids): more
	// admitted reads only wait longer for a batch.
	DefaultMaxLimit = 256
	// DefaultWindow is how often the limit is reconsidered (at least 50
	// samples). The library's 1 s default moves too slowly for an open
	// flood: at 3× capacity the queue grows by two seconds of work every
	// second.
	DefaultWindow = 100 * time.Millisecond
	// DefaultMaxWait bounds the wait for a place when the limit is full.
	// A short wait is backpressure: the client's connection is held, so a
	// client that waits for its answers slows down instead of coming back
	// at once with the next request, whose refusal would cost the instance
	// about as much CPU as a cached read. Past it the request is refused.
	// The wait adds to the latency of the requests it admits and of the
	// refusals, so it is kept below a fast query's time: at 20 ms, an
	// admitted read over a 5 ms database took 4 × its unloaded p99 and a
	// refusal 21 ms.
	DefaultMaxWait = 2 * time.Millisecond
	// queueFactor: up to this many times the limit may wait; beyond,
	// refusals rise until twice that, where every newcomer is refused.
	queueFactor = 2
)

// Config configures a Limiter; zero fields take the defaults above.
type Config struct {
	MinLimit, InitialLimit, MaxLimit uint
	Window                           time.Duration
	// MaxWait is how long a request may wait for a place when the limit
	// is full (0: DefaultMaxWait; < 0: never, refuse at once).
	MaxWait time.Duration
	// Logger receives the limit's changes at debug level.
	Logger *slog.Logger
	// Registerer receives the userapi_shed_* metrics; nil skips them.
	Registerer prometheus.Registerer
}

// Limiter is the adaptive limit. It is safe for concurrent use.
type Limiter struct {
	al       adaptivelimiter.AdaptiveLimiter[any]
	maxWait  time.Duration
	rejected prometheus.Counter
}

// errShed is what a refused request fails with.
var errShed = fmt.Errorf("shed: database-bound work at its limit: %w", userapi.ErrOverloaded)

// New returns a Limiter.
func New(cfg Config) *Limiter {
	if cfg.MinLimit == 0 {
		cfg.MinLimit = DefaultMinLimit
	}
	if cfg.MaxLimit == 0 {
		cfg.MaxLimit = max(DefaultMaxLimit, cfg.MinLimit)
	}
	if cfg.InitialLimit == 0 {
		// An adaptive limit learns its latency baseline from its first
		// samples: one that starts far above what the database can take
		// at once learns a queue as the baseline, and does not come down
		// when started under a flood.
		cfg.InitialLimit = cfg.MaxLimit
		if cfg.MinLimit <= cfg.MaxLimit/initialPerMin {
			cfg.InitialLimit = initialPerMin * cfg.MinLimit
		}
	}
	if cfg.Window <= 0 {
		cfg.Window = DefaultWindow
	}
	if cfg.MaxWait == 0 {
		cfg.MaxWait = DefaultMaxWait
	}
	b := adaptivelimiter.NewBuilder[any]().
		WithLimits(cfg.MinLimit, cfg.MaxLimit, cfg.InitialLimit).
		WithRecentWindow(cfg.Window, 10*cfg.Window, 50)
	if cfg.MaxWait > 0 {
		b = b.WithQueueing(queueFactor, 2*queueFactor).WithMaxWaitTime(cfg.MaxWait)
	}
	if cfg.Logger != nil {
		b = b.WithLogger(cfg.Logger)
	}
	l := &Limiter{
		al:      b.Build(),
		maxWait: max(cfg.MaxWait, 0),
		rejected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_shed_rejected_total",
			Help: "Database-bound requests refused with 503 because the adaptive limit was reached.",
		}),
	}
	if reg := cfg.Registerer; reg != nil {
		register(reg, l.rejected)
		register(reg, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "userapi_shed_limit",
			Help: "The adaptive limit: database-bound requests admitted at once.",
		}, func() float64 { return float64(l.al.Limit()) }))
		register(reg, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "userapi_shed_inflight",
			Help: "Database-bound requests admitted and not finished.",
		}, func() float64 { return float64(l.al.Inflight()) }))
	}
	return l
}

func register(reg prometheus.Registerer, c prometheus.Collector) {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			panic("shed: register metrics: " + err.Error())
		}
	}
}

// Admit admits one request's database-bound work, or refuses it at once
// with an error wrapping userapi.ErrOverloaded. done must be called exactly
// once when the work is over; its time feeds the limit.
func (l *Limiter) Admit(ctx context.Context) (done func(), err error) {
	p, err := l.al.AcquirePermitWithMaxWait(ctx, l.maxWait)
	if err != nil {
		if errors.Is(err, adaptivelimiter.ErrExceeded) {
			l.rejected.Inc()
			return nil, errShed
		}
		return nil, fmt.Errorf("shed: %w: %w", userapi.ErrUnavailable, err)
	}
	return p.Record, nil
}

// Limit is the current limit.
func (l *Limiter) Limit() int { return l.al.Limit() }

// Inflight is the work admitted and not done.
func (l *Limiter) Inflight() int { return l.al.Inflight() }
