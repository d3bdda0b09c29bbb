package ratelimit

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/maypok86/otter/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/rueidis"

	"userapi/internal/redisurl"
)

// takeScript is GCRA (the generic cell rate algorithm, a token bucket kept
// as one timestamp): the key holds the theoretical arrival time (TAT) of
// the client's next request in microseconds of Redis's clock. A bucket of
// burst B refilled every T µs holds (now + B*T - TAT) / T tokens. The
// script takes up to n of them at once (a lease, see Redis.Allow), so one
// round trip serves several requests.
// KEYS[1] the client's key; ARGV[1] T, the µs per token; ARGV[2] B;
// ARGV[3] n.
// Returns {granted, remaining, µs until a token is free, µs until full}.
const takeScript = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local B = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local g = math.min(tonumber(ARGV[3]), math.floor((now + B * T - tat) / T))
if g > 0 then
  tat = tat + g * T
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
else
  g = 0
end
local left = math.floor((now + B * T - tat) / T)
local wait = 0
if left < 1 then wait = tat - (B - 1) * T - now end
return {g, left, wait, tat - now}
`

// presenceScript records this instance as alive and counts the instances
// seen within the last ARGV[2] ms, which a divided budget is split by.
// KEYS[1] the instances' sorted set; ARGV[1] this instance's id.
const presenceScript = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
`

// Mode is how a Redis limiter spends a client's budget.
type Mode string

const (
	// Shared keeps one bucket per client in Redis: the budget holds
	// across every instance however a client's requests are spread.
	Shared Mode = "shared"
	// Divided gives each instance a local bucket of the budget divided by
	// the number of live instances (counted in Redis): no Redis call per
	// client, and the budget holds when a balancer spreads each client's
	// requests evenly.
	Divided Mode = "divided"
)

// Defaults for zero RedisConfig fields, and the lease's constants.
const (
	// DefaultTimeout bounds every Redis call: a healthy Redis answers in
	// well under a millisecond; past this the request is decided by the
	// local fallback instead of waiting.
	DefaultTimeout = 20 * time.Millisecond

	// heartbeat is how often an instance renews its presence and, when
	// Redis is down, tries it again. Down, a limiter stays on its local
	// fallback for at most this long after Redis is back.
	heartbeat = time.Second
	// presenceTTL is how long an instance counts as alive without a
	// heartbeat: a few missed beats, so one slow call does not shrink the
	// count, and a dead instance stops counting within seconds.
	presenceTTL = 5 * time.Second
	// downAfter is how many takes in a row must fail before every client
	// moves to the local fallback: one slow call on a loaded machine
	// should not flap the whole limiter (each flap hands out a fresh
	// local burst on top of Redis's). A dead Redis fails fast, so the
	// few calls it takes cost nothing; a stalled one costs them Timeout.
	downAfter = 3
	// beatTimeout bounds a heartbeat's Redis call.
	beatTimeout = 500 * time.Millisecond

	// leaseWindow sizes a lease: the tokens a client earns in this long
	// (at most an eighth of its burst), so a client at its full rate costs
	// an instance at most 1/leaseWindow Redis calls a second.
	leaseWindow = 10 * time.Millisecond
	// leaseTTL is how long leased tokens stay usable. Tokens are taken
	// from the client's budget when leased, so an unused lease is budget
	// lost, never budget added: the cluster admits at most the budget.
	leaseTTL = time.Second
)

// RedisConfig configures a Redis limiter.
type RedisConfig struct {
	// URL of the Redis server (redis://host:6379/0), cluster
	// (redis://h1:p1,h2:p2) or Sentinel set
	// (redis-sentinel://s1:p1,s2:p2/master); see internal/redisurl.
	// Ignored when Client
	// is set.
	URL string
	// Client, when set, is used instead of dialling URL, and not closed.
	Client rueidis.Client
	// KeyPrefix prefixes every key ("userapi:" gives userapi:rl:<client>).
	KeyPrefix string
	// Mode is Shared (the default) or Divided.
	Mode Mode
	// Timeout bounds each Redis call; 0 means DefaultTimeout.
	Timeout time.Duration
	// MaxClients bounds the leases and the fallback's buckets; 0 means
	// DefaultMaxClients.
	MaxClients int
	// Logger receives Redis's transitions between up and down.
	Logger *slog.Logger
	// Registerer receives the userapi_ratelimit_* metrics; nil skips them.
	Registerer prometheus.Registerer
}

// Redis is a Limiter whose budgets hold across instances (see Mode). Each
// instance takes tokens from a client's bucket in Redis a lease at a time
// and spends them locally; a client that is out of tokens is refused
// locally until the bucket has a lease's worth again. While Redis is down
// or slower than Timeout, requests are decided by a Local bucket of the
// budget divided by the live instances last counted.
type Redis struct {
	cfg       RedisConfig
	log       *slog.Logger
	take      *rueidis.Lua
	presence  *rueidis.Lua
	clientOpt *rueidis.ClientOption // nil when the client was given
	client    atomic.Pointer[rueidis.Client]

	id        string       // this instance in the presence set
	up        atomic.Bool  // decisions are made in Redis
	failures  atomic.Int32 // takes failed in a row
	instances atomic.Int64 // live instances at the last heartbeat, ≥ 1
	leases    *otter.Cache[string, *lease]
	local     *Local

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	m      redisMetrics
}

// lease is what an instance holds of one client's Redis bucket.
type lease struct {
	mu       sync.Mutex
	tokens   int       // taken from Redis, not spent yet
	expires  time.Time // tokens left then are dropped
	left     int       // tokens left in Redis at the last take
	full     time.Time // when Redis's bucket is full again, per the last take
	refusing time.Time // out of tokens: refuse locally until then
	fetching bool      // a refill is under way
}

var _ Limiter = (*Redis)(nil)

// NewRedis returns a Redis limiter. It does not fail when Redis is
// unreachable: it starts on its local fallback and moves to Redis when
// Redis answers.
func NewRedis(cfg RedisConfig) (*Redis, error) {
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Mode == "" {
		cfg.Mode = Shared
	}
	if cfg.Mode != Shared && cfg.Mode != Divided {
		return nil, fmt.Errorf("ratelimit: mode %q is not shared or divided", cfg.Mode)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	local, err := NewLocal(cfg.MaxClients)
	if err != nil {
		return nil, err
	}
	leases, err := otter.New(&otter.Options[string, *lease]{
		// Bounded by count only, as Local's buckets: a lease carries its
		// own expiry (leaseTTL).
		MaximumSize: max(cfg.MaxClients, DefaultMaxClients),
	})
	if err != nil {
		return nil, fmt.Errorf("ratelimit: leases: %w", err)
	}
	var id [8]byte
	rand.Read(id[:])
	r := &Redis{
		cfg:      cfg,
		log:      cfg.Logger,
		take:     rueidis.NewLuaScript(takeScript),
		presence: rueidis.NewLuaScript(presenceScript),
		id:       hex.EncodeToString(id[:]),
		leases:   leases,
		local:    local,
		m:        newRedisMetrics(cfg.Registerer),
	}
	r.instances.Store(1)
	if cfg.Client != nil {
		r.client.Store(&cfg.Client)
	} else {
		o, err := redisurl.Parse(cfg.URL)
		if err != nil {
			return nil, fmt.Errorf("ratelimit: redis url: %w", err)
		}
		// No client-side caching (nothing here is read twice) and no
		// retries: a slow Redis is failed open, not waited for.
		redisurl.Prepare(&o)
		r.clientOpt = &o
	}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.beat() // up at once when Redis answers
	r.wg.Go(r.maintain)
	return r, nil
}

func (r *Redis) key(k string) string { return r.cfg.KeyPrefix + "rl:" + k }

// divided is l split over the live instances: the local fallback's limit.
func (r *Redis) divided(l Limit) Limit {
	n := float64(r.instances.Load())
	return Limit{Rate: l.Rate / n, Burst: max(1, int(math.Ceil(float64(l.burst())/n)))}
}

// leaseSize is how many tokens one Redis call takes for a client at l.
func leaseSize(l Limit) int {
	n := int(l.Rate * leaseWindow.Seconds())
	return min(max(n, 1), max(l.burst()/8, 1))
}

// Allow takes a token for key: from this instance's lease when it has one,
// else from Redis (one round trip), else, while Redis is down, from the
// local fallback.
func (r *Redis) Allow(key string, l Limit) Decision {
	if l.Unlimited() {
		return Decision{Allowed: true, Remaining: l.burst()}
	}
	if r.cfg.Mode == Divided || !r.up.Load() {
		r.m.local.Inc()
		return r.local.Allow(key, r.divided(l))
	}
	ls, ok := r.leases.GetIfPresent(key)
	if !ok {
		ls, _ = r.leases.SetIfAbsent(key, &lease{})
	}
	now := time.Now()
	ls.mu.Lock()
	if ls.tokens > 0 && now.Before(ls.expires) {
		ls.tokens--
		d := Decision{Allowed: true, Remaining: ls.left + ls.tokens, Reset: max(0, ls.full.Sub(now))}
		// Refill in the background before the lease runs out, so that a
		// steady client never waits for Redis.
		if ls.tokens <= leaseSize(l)/2 && !ls.fetching {
			ls.fetching = true
			r.wg.Go(func() { r.refill(key, ls, l) })
		}
		ls.mu.Unlock()
		return d
	}
	if now.Before(ls.refusing) {
		d := Decision{Reset: ls.full.Sub(now), RetryAfter: ls.refusing.Sub(now)}
		ls.mu.Unlock()
		r.m.refusedLocally.Inc()
		return d
	}
	ls.mu.Unlock()

	r.m.sync.Inc()
	g, err := r.takeTokens(key, l, leaseSize(l))
	if err != nil {
		r.takeFailed(err)
		r.m.local.Inc()
		return r.local.Allow(key, r.divided(l))
	}
	r.failures.Store(0)
	ls.mu.Lock()
	defer ls.mu.Unlock()
	r.record(ls, g, now)
	if g.granted == 0 {
		return Decision{Reset: ls.full.Sub(now), RetryAfter: max(g.wait, time.Microsecond)}
	}
	ls.tokens--
	return Decision{Allowed: true, Remaining: ls.left + ls.tokens, Reset: ls.full.Sub(now)}
}

// refill takes a lease in the background.
func (r *Redis) refill(key string, ls *lease, l Limit) {
	g, err := r.takeTokens(key, l, leaseSize(l))
	if err != nil {
		r.takeFailed(err)
	} else {
		r.failures.Store(0)
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.fetching = false
	if err == nil {
		r.record(ls, g, time.Now())
	}
}

// record adds a take's grant to the lease. A take that got nothing makes
// the instance refuse the client locally until a lease's worth of tokens
// is back in its bucket (not just one), so a client above its budget costs
// an instance at most one Redis call per lease, not one per request.
func (r *Redis) record(ls *lease, g grant, now time.Time) {
	if !now.Before(ls.expires) {
		ls.tokens = 0
	}
	ls.tokens += g.granted
	ls.expires = now.Add(leaseTTL)
	ls.left = g.left
	ls.full = now.Add(g.full)
	if g.granted == 0 {
		ls.refusing = now.Add(g.wait + g.perToken*time.Duration(g.want-1))
	}
}

// grant is takeScript's answer.
type grant struct {
	granted, left, want  int
	wait, full, perToken time.Duration
}

func (r *Redis) takeTokens(key string, l Limit, n int) (grant, error) {
	c := r.client.Load()
	if c == nil {
		return grant{}, errors.New("redis not connected")
	}
	perToken := max(1, int64(math.Round(1e6/l.Rate))) // µs
	ctx, cancel := context.WithTimeout(r.ctx, r.cfg.Timeout)
	defer cancel()
	vs, err := r.take.Exec(ctx, *c, []string{r.key(key)}, []string{
		strconv.FormatInt(perToken, 10), strconv.Itoa(l.burst()), strconv.Itoa(n),
	}).AsIntSlice()
	if err != nil {
		return grant{}, fmt.Errorf("take tokens: %w", err)
	}
	if len(vs) != 4 {
		return grant{}, fmt.Errorf("take tokens: %d values, want 4", len(vs))
	}
	r.m.takes.Inc()
	return grant{
		granted:  int(vs[0]),
		left:     max(0, int(vs[1])),
		want:     n,
		wait:     time.Duration(vs[2]) * time.Microsecond,
		full:     time.Duration(vs[3]) * time.Microsecond,
		perToken: time.Duration(perToken) * time.Microsecond,
	}, nil
}

// takeFailed counts a failed take; downAfter in a row move to the fallback.
func (r *Redis) takeFailed(err error) {
	r.m.errors.Inc()
	if r.failures.Add(1) >= downAfter {
		r.failed(err)
	}
}

// failed moves to the local fallback until the next heartbeat succeeds.
func (r *Redis) failed(err error) {
	if r.ctx.Err() != nil {
		return
	}
	r.failures.Store(0)
	if r.up.Swap(false) {
		r.m.up.Set(0)
		r.log.Warn("rate limits: redis failed, limiting locally with the budget divided by the instances",
			"instances", r.instances.Load(), "err", err)
	}
}

// maintain beats every heartbeat until Close.
func (r *Redis) maintain() {
	t := time.NewTicker(heartbeat)
	defer t.Stop()
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
			r.beat()
		}
	}
}

// beat connects if needed, renews this instance's presence and counts the
// live instances; success brings the limiter back to Redis.
func (r *Redis) beat() {
	if r.client.Load() == nil {
		c, err := rueidis.NewClient(*r.clientOpt)
		if err != nil {
			r.m.errors.Inc()
			r.failed(err)
			return
		}
		r.client.Store(&c)
	}
	// No request waits for a beat, so it may take longer than a take: a
	// beat that fails moves every client to the local fallback.
	ctx, cancel := context.WithTimeout(r.ctx, max(r.cfg.Timeout, beatTimeout))
	defer cancel()
	n, err := r.presence.Exec(ctx, *r.client.Load(), []string{r.cfg.KeyPrefix + "rl-instances"},
		[]string{r.id, strconv.FormatInt(presenceTTL.Milliseconds(), 10)}).AsInt64()
	if err != nil {
		r.m.errors.Inc()
		r.failed(fmt.Errorf("presence: %w", err))
		return
	}
	r.instances.Store(max(n, 1))
	r.m.instances.Set(float64(max(n, 1)))
	if !r.up.Swap(true) {
		r.m.up.Set(1)
		r.log.Info("rate limits: redis answers, budgets held across instances", "mode", r.cfg.Mode, "instances", n)
	}
}

// Instances is the number of live instances at the last heartbeat.
func (r *Redis) Instances() int { return int(r.instances.Load()) }

// Up reports whether decisions are made in Redis (false: locally).
func (r *Redis) Up() bool { return r.up.Load() }

// Close leaves the presence set and closes the client if NewRedis made it.
func (r *Redis) Close() error {
	if c := r.client.Load(); c != nil && r.up.Load() {
		ctx, cancel := context.WithTimeout(context.Background(), r.cfg.Timeout)
		(*c).Do(ctx, (*c).B().Zrem().Key(r.cfg.KeyPrefix+"rl-instances").Member(r.id).Build())
		cancel()
	}
	r.cancel()
	r.wg.Wait()
	if c := r.client.Load(); c != nil && r.clientOpt != nil {
		(*c).Close()
	}
	r.leases.StopAllGoroutines()
	return r.local.Close()
}

// redisMetrics are the userapi_ratelimit_* collectors.
type redisMetrics struct {
	up, instances                              prometheus.Gauge
	takes, sync, errors, local, refusedLocally prometheus.Counter
}

func newRedisMetrics(reg prometheus.Registerer) redisMetrics {
	m := redisMetrics{
		up: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "userapi_ratelimit_redis_up",
			Help: "1 while rate limits are decided in Redis, 0 while on the local fallback.",
		}),
		instances: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "userapi_ratelimit_instances",
			Help: "Live instances counted in Redis; the local fallback divides each budget by it.",
		}),
		takes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_ratelimit_redis_takes_total",
			Help: "Leases of tokens taken from Redis.",
		}),
		sync: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_ratelimit_redis_waits_total",
			Help: "Requests that waited for a Redis call (no lease in hand).",
		}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_ratelimit_redis_errors_total",
			Help: "Redis calls of the rate limiter that failed or timed out.",
		}),
		local: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_ratelimit_local_decisions_total",
			Help: "Requests decided by the local bucket (divided mode, or Redis down).",
		}),
		refusedLocally: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_ratelimit_refused_locally_total",
			Help: "Requests refused without a Redis call because the client's bucket was known to be empty.",
		}),
	}
	if reg != nil {
		m.up, m.instances = register(reg, m.up), register(reg, m.instances)
		m.takes, m.sync, m.errors = register(reg, m.takes), register(reg, m.sync), register(reg, m.errors)
		m.local, m.refusedLocally = register(reg, m.local), register(reg, m.refusedLocally)
	}
	return m
}

// register registers c, or returns the equal collector already registered
// (several limiters may share one registry, as tests do).
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic("ratelimit: register metrics: " + err.Error())
	}
	return c
}
