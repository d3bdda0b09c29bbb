// Package cache is a read-through cache in front of a userapi.Store. It
// implements userapi.Store itself (a decorator: the HTTP layer cannot tell it
// from a database) and userapi.EncodedReader, so a hit returns the user's JSON
// bytes, encoded once when the entry was filled, with no JSON work.
//
// The read path is local tier (otter, bounded by bytes) → Redis tier (rueidis,
// short deadlines behind a circuit breaker) → database, through the loader,
// which coalesces concurrent misses of one id into one load and batches
// misses of different ids into one Redis round trip and one store.GetUsers
// call. Every write commits first, then installs a
// versioned tombstone locally and in Redis and notifies the other instances
// before it returns; fills are guarded by version so a fill that read a row
// before a write can never install it after the write. docs/cache.md describes
// the design and its guarantees.
package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/rueidis"

	"userapi"
	"userapi/internal/panics"
	"userapi/internal/redisurl"
)

// Mode selects the cache tiers.
type Mode string

// The cache modes.
const (
	// ModeOff caches nothing; with Config.Coalesce the loader still
	// coalesces and batches reads.
	ModeOff Mode = "off"
	// ModeLocal caches in process only. It is coherent for one instance:
	// with several instances behind a balancer, another instance's write
	// reaches this one's cache only when the entry expires (Config.TTL).
	ModeLocal Mode = "local"
	// ModeRedis caches in Redis only, shared by all instances.
	ModeRedis Mode = "redis"
	// ModeTiered puts the local tier in front of Redis; writes notify every
	// instance over a Redis channel.
	ModeTiered Mode = "tiered"
)

// ParseMode parses "off", "local", "redis" or "tiered".
func ParseMode(s string) (Mode, error) {
	switch m := Mode(strings.ToLower(strings.TrimSpace(s))); m {
	case ModeOff, ModeLocal, ModeRedis, ModeTiered:
		return m, nil
	}
	return "", fmt.Errorf("cache mode %q is not off, local, redis or tiered", s)
}

func (m Mode) hasLocal() bool { return m == ModeLocal || m == ModeTiered }
func (m Mode) hasRedis() bool { return m == ModeRedis || m == ModeTiered }

// Defaults of Config's zero fields.
const (
	// DefaultLocalBytes is the local tier's budget: about a million typical
	// users (~200 bytes of JSON plus ~80 bytes of bookkeeping each).
	DefaultLocalBytes = 256 << 20
	// DefaultTTL bounds how long an entry lives without being invalidated.
	// Writes invalidate explicitly, so the TTL only matters for entries
	// nobody writes (memory turnover) and as the last line of defence when
	// an invalidation was lost (local mode with several instances, a writer
	// cut off from Redis).
	DefaultTTL = 5 * time.Minute
	// DefaultNegativeTTL is short: an absent id is usually a mistake or a
	// scan, and a create clears the entry anyway.
	DefaultNegativeTTL = 10 * time.Second
	// DefaultTombstoneTTL must outlive any fill that could have read the row
	// before the write that left the tombstone: a fill older than half of
	// it is dropped (see fillDeadline), and a store call ends within its
	// query timeout (2 s by default), so 10 s leaves a wide margin.
	DefaultTombstoneTTL = 10 * time.Second
	// DefaultRedisTimeout is the deadline of each Redis call. A local
	// round trip takes ~0.1 ms; 50 ms is far beyond a healthy Redis and
	// still a small fraction of a request's budget, so a sick Redis costs
	// each request at most this much before the breaker opens and requests
	// stop waiting for it at all.
	DefaultRedisTimeout = 50 * time.Millisecond
	// DefaultMaxBatch bounds the ids of one store.GetUsers: large enough to
	// absorb a burst of misses in one round trip, small enough that one
	// query stays short (an index lookup per id) and far below SQLite's
	// 32766 bound parameters.
	DefaultMaxBatch = 128
	// DefaultLoadTimeout is the deadline of one batch load; stores apply
	// their own, shorter query timeout, so this is only a backstop.
	DefaultLoadTimeout = 5 * time.Second
	// DefaultPendingMax bounds the invalidations remembered while Redis is
	// unreachable; past it the whole Redis namespace is dropped on recovery
	// instead (a new key generation).
	DefaultPendingMax = 100_000
	// DefaultKeyPrefix starts every Redis key and the notice channel.
	DefaultKeyPrefix = "userapi:"
)

// Config configures a Store. Zero fields take the defaults above.
type Config struct {
	Mode Mode
	// Coalesce makes concurrent misses share one load per id and batches
	// misses of different ids; without it every miss is its own
	// store.GetUser (the "no coalescing" step of the benchmark ladder).
	Coalesce bool
	// LocalBytes bounds the local tier by the bytes of its entries.
	LocalBytes int64
	// TTL and NegativeTTL are the lifetimes of entries for present and
	// absent ids; each entry gets ±10% jitter so entries filled together do
	// not expire together.
	TTL, NegativeTTL time.Duration
	// TombstoneTTL is how long a write's tombstone guards against stale
	// fills (see DefaultTombstoneTTL).
	TombstoneTTL time.Duration

	// RedisURL ("redis://host:port/db", a cluster's seeds
	// "redis://h1:p1,h2:p2", or a Sentinel set
	// "redis-sentinel://s1:p1,s2:p2/master"; see internal/redisurl) is
	// used when Redis is nil and the
	// mode needs Redis. The client made from it is closed by Close.
	RedisURL string
	// Redis is a client to use instead of RedisURL (tests inject one). It
	// must use RESP3 (the default); Close does not close it.
	Redis rueidis.Client
	// RedisTimeout is the deadline of each Redis call.
	RedisTimeout time.Duration
	// KeyPrefix starts every Redis key and the notice channel, so
	// deployments (and test runs) sharing one Redis never collide.
	KeyPrefix string

	// MaxBatch bounds the ids in one store.GetUsers.
	MaxBatch int
	// Loaders is the number of batch loads that may run at once. The
	// default is one per two CPUs and at least 2 (max(2, GOMAXPROCS/2)),
	// capped by the store's pool size when it reports one (PoolSize()
	// int). A load beyond the first starts only with a batch of at least
	// 16 ids (see minParallel): one multi-key query costs the database and
	// this process far less than as many small ones, and before that rule
	// more loaders only split the batches (uncached uniform reads over 1M
	// PostgreSQL rows with 64 connections on 2 cores: ~69k req/s with 1
	// loader, average batch 16 ids; ~62k with 2, 7 ids; ~31k with 8, 2
	// ids). With it, a second load keeps the database busy while the
	// first one's round trip is under way.
	Loaders int
	// LoadTimeout is the deadline of one batch load.
	LoadTimeout time.Duration
	// ReplicaMaxLag is how far behind the primary a replica that serves
	// reads may be (the store's bound, postgres.Options.ReplicaMaxLag;
	// default 1 s; less than half of TombstoneTTL). After the Redis tier moves to a new key generation,
	// whose empty keys hold none of the tombstones that tell a replica's
	// old row from the current one, batches read the primary for twice
	// this long.
	ReplicaMaxLag time.Duration
	// Admit, when set, admits each read the loader takes (one per
	// request, before it joins a load or waits for a batch) or refuses it
	// with the error the read then returns; done is called when the read
	// has its result. It is the load shedder's hook (package shed): the
	// loader hides the reads waiting for a batch from the store below it.
	Admit func(ctx context.Context) (done func(), err error)
	// PendingMax bounds the remembered invalidations (see DefaultPendingMax).
	PendingMax int

	// Changes, when set, is the database's change stream: every committed
	// change, whoever made it, invalidates every tier as a write through
	// the cache does (see followChanges).
	Changes userapi.ChangeFeed

	Logger     *slog.Logger
	Registerer prometheus.Registerer // nil: metrics are kept but not registered

	// Knobs for tests; zero means the production value.
	heartbeat      time.Duration                         // notice-channel heartbeat interval
	channelTimeout time.Duration                         // channel is down after this long without our own heartbeat
	probeInterval  time.Duration                         // Redis health probes while the breaker is open
	onNotice       func(id, version int64, at time.Time) // called for every invalidation notice received
}

// Channel liveness and recovery timing (see Config's test knobs).
const (
	// heartbeatInterval: each instance publishes a heartbeat on the notice
	// channel this often and expects to hear its own.
	heartbeatInterval = 250 * time.Millisecond
	// channelTimeout: without our own heartbeat for this long the channel
	// is taken as down (the local tier stops serving) even though the
	// connection looks open: Redis is stalled or the network dropped. It is
	// several intervals so that a loaded scheduler does not flap the local
	// tier; a closed connection is noticed at once, without waiting.
	channelTimeout = 2 * time.Second
	// probeInterval: how often a Redis with an open breaker is probed.
	probeInterval = 250 * time.Millisecond
)

// poisonVersion is the tombstone version of a deleted row and of a write
// whose outcome is unknown (a timeout after the commit may have happened):
// it is above every real version, so no fill is accepted until the
// tombstone expires. It is a power of two so Redis's Lua (doubles) holds it
// exactly.
const poisonVersion = 1 << 62

// releaseVersion is the "version" of the invalidation that ends a write
// which changed nothing (refused by the database): it resolves the write's
// intent and guards nothing else.
const releaseVersion = 0

// Store is the caching decorator. It is safe for concurrent use.
type Store struct {
	store userapi.Store
	cfg   Config
	log   *slog.Logger
	m     *metrics
	local *localTier // nil unless the mode has a local tier
	// replicas: the store below may read from replicas (ReadsReplicas),
	// so reads carry session tokens (see carriesToken, replica.go).
	replicas bool
	redis    *redisTier // nil unless the mode has Redis
	loader   *loader    // nil unless cfg.Coalesce

	// state is the epoch of the notice channel: it goes up by one on every
	// transition, and is odd while the channel is up. The local tier serves
	// an entry only if the entry was filled in the current epoch, so every
	// entry filled before the channel went down, or by a fill that straddled
	// a transition, is dead: that is the flush on reconnect, without a race
	// against fills in flight. In local mode there is no channel and state
	// stays 1.
	state epoch

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed atomic.Bool
}

var (
	_ userapi.Store         = (*Store)(nil)
	_ userapi.EncodedReader = (*Store)(nil)
	_ userapi.ReplicaReader = (*Store)(nil)
)

// New returns a Store in front of store. With Mode off and Coalesce off it
// is a thin pass-through. It fails when the configuration is invalid or the
// Redis URL cannot be parsed; an unreachable Redis is not an error (the
// cache fails open and starts using Redis when it answers).
func New(ctx context.Context, store userapi.Store, cfg Config) (*Store, error) {
	if cfg.Mode == "" {
		cfg.Mode = ModeOff
	}
	if _, err := ParseMode(string(cfg.Mode)); err != nil {
		return nil, err
	}
	if cfg.LocalBytes <= 0 {
		cfg.LocalBytes = DefaultLocalBytes
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.NegativeTTL <= 0 {
		cfg.NegativeTTL = DefaultNegativeTTL
	}
	if cfg.TombstoneTTL <= 0 {
		cfg.TombstoneTTL = DefaultTombstoneTTL
	}
	if cfg.RedisTimeout <= 0 {
		cfg.RedisTimeout = DefaultRedisTimeout
	}
	if cfg.KeyPrefix == "" {
		cfg.KeyPrefix = DefaultKeyPrefix
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = DefaultMaxBatch
	}
	if cfg.Loaders <= 0 {
		cfg.Loaders = max(2, runtime.GOMAXPROCS(0)/2)
		if p, ok := store.(interface{ PoolSize() int }); ok && p.PoolSize() > 0 {
			cfg.Loaders = min(cfg.Loaders, p.PoolSize())
		}
	}
	if cfg.LoadTimeout <= 0 {
		cfg.LoadTimeout = DefaultLoadTimeout
	}
	if cfg.ReplicaMaxLag <= 0 {
		cfg.ReplicaMaxLag = time.Second
	}
	// A replica read may miss a write acknowledged up to ReplicaMaxLag
	// before it, and its fill may land up to half the tombstone's life
	// after (older fills are dropped): the write's tombstone must still be
	// there to refuse it.
	if rr, ok := store.(userapi.ReplicaReader); ok && rr.ReadsReplicas() && cfg.ReplicaMaxLag >= cfg.TombstoneTTL/2 {
		return nil, fmt.Errorf("cache: a replica lag bound of %v needs tombstones that live more than twice as long (%v)", cfg.ReplicaMaxLag, cfg.TombstoneTTL)
	}
	if cfg.PendingMax <= 0 {
		cfg.PendingMax = DefaultPendingMax
	}
	if cfg.heartbeat <= 0 {
		cfg.heartbeat = heartbeatInterval
	}
	if cfg.channelTimeout <= 0 {
		cfg.channelTimeout = channelTimeout
	}
	if cfg.probeInterval <= 0 {
		cfg.probeInterval = probeInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}

	s := &Store{store: store, cfg: cfg, log: cfg.Logger.With("component", "cache")}
	s.replicas = s.ReadsReplicas()
	s.m = newMetrics()
	s.ctx, s.cancel = context.WithCancel(context.WithoutCancel(ctx))
	s.state.Store(1) // up: the local mode has no channel to wait for

	if cfg.Mode.hasLocal() {
		l, err := newLocalTier(cfg.LocalBytes)
		if err != nil {
			s.cancel()
			return nil, fmt.Errorf("new cache: %w", err)
		}
		s.local = l
	}
	if cfg.Mode.hasRedis() {
		var opt *rueidis.ClientOption
		if cfg.Redis == nil {
			if cfg.RedisURL == "" {
				s.cancel()
				return nil, fmt.Errorf("new cache: mode %s needs a Redis URL", cfg.Mode)
			}
			o, err := redisurl.Parse(cfg.RedisURL)
			if err != nil {
				s.cancel()
				return nil, fmt.Errorf("new cache: redis url: %w", err)
			}
			// No server-assisted client cache on this client (the local
			// tier is ours), so no tracking; no retries: we fail open
			// instead of waiting; short dial and write deadlines, so a
			// stalled Redis is noticed without TCP keepalive.
			redisurl.Prepare(&o)
			opt = &o
		}
		s.redis = newRedisTier(redisDeps{
			ctx:    s.ctx,
			wg:     &s.wg,
			log:    s.log,
			cfg:    &s.cfg,
			m:      s.m,
			state:  &s.state,
			events: s,
		}, cfg.Redis, opt)
		if cfg.Mode == ModeTiered {
			s.state.Store(0) // down until the notice channel is subscribed
		}
	}
	if cfg.Coalesce {
		s.loader = newLoader(loaderDeps{
			ctx:       s.ctx,
			log:       s.log,
			admit:     cfg.Admit,
			coalesced: s.m.coalesced,
			resolve:   s.resolve,
			replicas:  s.replicas,
		}, cfg.Loaders, cfg.MaxBatch)
	}
	s.m.register(s, cfg.Registerer)
	if s.redis != nil {
		s.redis.start()
	}
	if cfg.Changes != nil && (s.local != nil || s.redis != nil) {
		s.wg.Go(panics.Loop(s.ctx, s.log, "change_stream", func() { s.followChanges(cfg.Changes) }))
	}
	return s, nil
}

// Close stops the loader and the Redis goroutines and closes the Redis
// client if New made it. It does not close the decorated store: its owner
// opened it and closes it, after Close.
func (s *Store) Close() error {
	if !s.closed.CompareAndSwap(false, true) {
		return nil
	}
	s.cancel()
	if s.loader != nil {
		s.loader.stop()
	}
	s.wg.Wait()
	if s.redis != nil {
		s.redis.close()
	}
	return nil
}

// Ping reports the database's health. Redis is not checked: the cache fails
// open, so a Redis outage does not make the service unready.
func (s *Store) Ping(ctx context.Context) error { return s.store.Ping(ctx) }

// carriesToken reports whether the read carries a session token
// (userapi.Session.After) while the store reads replicas. Such a read skips
// the local tier: the token may name a write another instance acknowledged
// whose notice has not arrived here yet, while Redis took its tombstone
// before it was acknowledged, and the loader reads the database at the
// token's position at least.
func (s *Store) carriesToken(ctx context.Context) bool {
	if !s.replicas {
		return false
	}
	sess := userapi.SessionFrom(ctx)
	return sess != nil && sess.After > 0
}

// ReadsReplicas reports whether the store below reads from replicas
// (userapi.ReplicaReader), so the HTTP layer carries session tokens.
func (s *Store) ReadsReplicas() bool {
	rr, ok := s.store.(userapi.ReplicaReader)
	return ok && rr.ReadsReplicas()
}

// ListUsers is not cached: pages change with every create and delete.
func (s *Store) ListUsers(ctx context.Context, f userapi.UserFilter) ([]*userapi.User, error) {
	return s.store.ListUsers(ctx, f)
}

// GetUsers goes to the store: it is the multi-key load the loader itself
// uses, and its callers (none on the request path) want the rows.
func (s *Store) GetUsers(ctx context.Context, ids []int64) ([]*userapi.User, error) {
	return s.store.GetUsers(ctx, ids)
}

// GetUserEncoded returns the user's encoded JSON and version from the first
// tier that has it, else loads it; ErrNotFound when the id does not exist
// (absent ids are cached for NegativeTTL), and an error wrapping
// ErrUnavailable when the database is needed and unreachable.
func (s *Store) GetUserEncoded(ctx context.Context, id int64) (userapi.Encoded, error) {
	if s.local != nil {
		st := s.state.Load()
		if st&1 == 1 && !s.carriesToken(ctx) {
			if e, ok := s.local.get(id); ok && e.epoch == st {
				switch e.kind {
				case kindValue:
					s.m.localHit.Inc()
					return userapi.Encoded{ID: id, Version: e.version, JSON: e.json}, nil
				case kindAbsent:
					s.m.localNegHit.Inc()
					return userapi.Encoded{}, fmt.Errorf("get user %d: %w", id, userapi.ErrNotFound)
				}
			}
			s.m.localMiss.Inc()
		} else {
			s.m.localBypass.Inc()
		}
	}
	if s.redis != nil && s.loader == nil {
		// Without the loader each miss asks Redis on its own; the loader
		// asks for a whole batch of misses at once (lookupRedis).
		if enc, found, err := s.redisLookup(ctx, id); err == nil {
			if found {
				return enc, nil
			}
			if enc.Version == -1 {
				return userapi.Encoded{}, fmt.Errorf("get user %d: %w", id, userapi.ErrNotFound)
			}
		}
	}
	return s.load(ctx, id)
}

// redisLookup reads the Redis tier. found reports a value; a cached absence
// is reported as found=false with enc.Version == -1; err != nil means Redis
// could not be asked (skipped or failed) and the caller goes on to the
// database.
func (s *Store) redisLookup(ctx context.Context, id int64) (enc userapi.Encoded, found bool, err error) {
	r := s.redis
	// The local epoch before readable: a flush between the two (an owed
	// move, startAfresh) then refuses this lookup's local fill.
	st := s.state.Load()
	if !r.readable(id) {
		s.m.redisSkip.Inc()
		return enc, false, errRedisSkipped
	}
	start := time.Now()
	e, err := r.get(ctx, id)
	if err != nil {
		s.m.redisError.Inc()
		return enc, false, err
	}
	if e == nil || e.kind.guards() {
		s.m.redisMiss.Inc()
		return enc, false, nil
	}
	if s.local != nil {
		e.epoch = st
		if s.fillLocal(id, e, start) == fillStale {
			// The local tier knows of a newer write (a tombstone from
			// this instance or a notice from another) than Redis holds:
			// Redis missed that invalidation, so ask the database.
			s.m.redisMiss.Inc()
			return enc, false, nil
		}
	}
	if e.kind == kindAbsent {
		s.m.redisNegHit.Inc()
		return userapi.Encoded{Version: -1}, false, nil
	}
	s.m.redisHit.Inc()
	return userapi.Encoded{ID: id, Version: e.version, JSON: e.json}, true, nil
}

var errRedisSkipped = errors.New("redis tier skipped")

// lookupRedis is redisLookup for a batch of the loader's calls, in one
// round trip: the calls Redis answers (a value or a cached absence) get
// their result and are appended to hits, the others to rest. rs is the
// moment before the lookup: a Redis entry's local copy is filled under its
// epoch, as redisLookup fills under the epoch read before its GET.
func (s *Store) lookupRedis(batch []*call, rs readStart, hits, rest []*call) ([]*call, []*call) {
	r := s.redis
	ask := make([]*call, 0, len(batch))
	ids := make([]int64, 0, len(batch))
	for _, c := range batch {
		if !r.readable(c.id) {
			s.m.redisSkip.Inc()
			rest = append(rest, c)
			continue
		}
		ask = append(ask, c)
		ids = append(ids, c.id)
	}
	if len(ask) == 0 {
		return hits, rest
	}
	res, err := r.getMany(s.ctx, ids, r.timeout)
	if err != nil {
		s.m.redisError.Add(float64(len(ask)))
		return hits, append(rest, ask...)
	}
	for i, c := range ask {
		e := res[i].e
		switch {
		case res[i].err != nil:
			s.m.redisError.Inc()
			rest = append(rest, c)
			continue
		case e == nil || e.kind.guards():
			s.m.redisMiss.Inc()
			c.checked = true
			if e != nil {
				c.guard = e
			}
			rest = append(rest, c)
			continue
		}
		if s.local != nil {
			e.epoch = rs.state
			if s.fillLocal(c.id, e, rs.at) == fillStale {
				// The local tier knows of a newer write than Redis
				// holds (see redisLookup): ask the database.
				s.m.redisMiss.Inc()
				rest = append(rest, c)
				continue
			}
		}
		if e.kind == kindAbsent {
			s.m.redisNegHit.Inc()
			c.err = userapi.ErrNotFound
		} else {
			s.m.redisHit.Inc()
			c.enc = userapi.Encoded{ID: c.id, Version: e.version, JSON: e.json}
		}
		hits = append(hits, c)
	}
	return hits, rest
}

// load fetches id from the database, through the loader when coalescing,
// and fills the tiers.
func (s *Store) load(ctx context.Context, id int64) (userapi.Encoded, error) {
	if s.loader != nil {
		c, err := s.loader.load(ctx, id)
		if err != nil {
			return userapi.Encoded{}, err
		}
		if c.err != nil {
			return userapi.Encoded{}, fmt.Errorf("get user %d: %w", id, c.err)
		}
		return c.enc, nil
	}
	rs := s.begin()
	u, err := s.store.GetUser(ctx, id)
	if err != nil {
		if errors.Is(err, userapi.ErrNotFound) {
			s.fill([]loaded{{id: id}}, rs, false)
		}
		return userapi.Encoded{}, err
	}
	enc := u.Encode()
	s.fill([]loaded{{id: id, enc: &enc}}, rs, false)
	return enc, nil
}

// GetUser returns the user, or ErrNotFound. It reads through the cache like
// GetUserEncoded and decodes the cached JSON. When the store reads replicas,
// a session asking for the primary (userapi.Session.Primary, an If-Match
// check) is read from the store, past the tiers and the loader.
func (s *Store) GetUser(ctx context.Context, id int64) (*userapi.User, error) {
	if s.replicas {
		if sess := userapi.SessionFrom(ctx); sess != nil && sess.Primary {
			// A check that must see the primary (If-Match): neither
			// the tiers nor a replica may answer it.
			return s.store.GetUser(ctx, id)
		}
	}
	if s.local == nil && s.redis == nil {
		if s.loader == nil {
			return s.store.GetUser(ctx, id)
		}
		c, err := s.loader.load(ctx, id)
		if err != nil {
			return nil, err
		}
		if c.err != nil {
			return nil, fmt.Errorf("get user %d: %w", id, c.err)
		}
		u := *c.user // each caller gets its own copy
		return &u, nil
	}
	enc, err := s.GetUserEncoded(ctx, id)
	if err != nil {
		return nil, err
	}
	return decodeUser(enc.JSON)
}

// decodeUser parses the JSON that User.AppendJSON wrote.
func decodeUser(b []byte) (*userapi.User, error) {
	var j struct {
		ID        int64     `json:"id"`
		Email     string    `json:"email"`
		Name      string    `json:"name"`
		CreatedAt time.Time `json:"created_at"`
		UpdatedAt time.Time `json:"updated_at"`
		Version   int64     `json:"version"`
	}
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, fmt.Errorf("decode cached user: %w", err)
	}
	return &userapi.User{
		ID: j.ID, Email: j.Email, Name: j.Name,
		CreatedAt: j.CreatedAt.UTC(), UpdatedAt: j.UpdatedAt.UTC(), Version: j.Version,
	}, nil
}

// loaded is one id's result of a database read, for fill: enc is nil when
// the id does not exist.
type loaded struct {
	id  int64
	enc *userapi.Encoded
}

// readStart is what a fill must know about the moment its database read
// began.
type readStart struct {
	state  uint64 // the notice channel's epoch (Store.state)
	health uint64 // the Redis tier's health (redisTier.health)
	at     time.Time
}

// resolve is the miss path of one loader batch: the calls Redis can answer
// go to early at once, with one round trip for the whole batch; the rest
// are read with one store.GetUsers. Every caller is woken as soon as its
// result is known and in the local tier: a Redis fill of database results
// does not hold them (see fill).
func (s *Store) resolve(batch []*call, buf *batchBuf, early func(answered, rest []*call)) {
	rs := s.begin()
	hits, rest := buf.hits[:0], buf.rest[:0]
	if s.redis != nil {
		hits, rest = s.lookupRedis(batch, rs, hits, rest)
		early(hits, rest)
	} else {
		rest = append(rest, batch...)
	}
	if len(rest) == 0 {
		return
	}
	ids := buf.ids[:0]
	for _, c := range rest {
		ids = append(ids, c.id)
	}
	s.m.batchSize.Observe(float64(len(rest)))
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.LoadTimeout)
	defer cancel()
	var users []*userapi.User
	var err error
	if s.replicas {
		users, err = s.loadRouted(ctx, rest, ids)
	} else {
		users, err = s.store.GetUsers(ctx, ids)
	}
	if err != nil {
		s.m.loadErrors.Inc()
		if errors.Is(err, context.Canceled) && s.ctx.Err() != nil {
			err = errClosed
		}
	} else {
		s.m.loads.Inc()
	}
	// Fill the local tier before waking the callers, so that a read that
	// follows a finished read finds the entry. Redis is filled after, by
	// the filler; without a local tier the next read looks in Redis, so
	// Redis is filled first.
	rows := setResults(rest, users, err)
	if err == nil {
		s.fill(rows, rs, s.local != nil)
	}
}

func (s *Store) begin() readStart {
	rs := readStart{state: s.state.Load(), at: time.Now()}
	if s.redis != nil {
		rs.health = s.redis.health.Load()
	}
	return rs
}

// fill installs database results in the tiers. A local fill is accepted
// only if the channel epoch has not changed since the read began, a Redis
// fill only if Redis has been usable throughout, and no fill is attempted
// once the read is older than half the tombstone TTL, since a tombstone
// that should reject it may have expired by then.
//
// The local tier is filled at once. With later, Redis is filled by the
// Redis tier's filler goroutine (redisTier.fillLater), under the same
// checks when it is sent, so the caller can answer its readers first.
func (s *Store) fill(rows []loaded, rs readStart, later bool) {
	if s.local == nil && s.redis == nil {
		return
	}
	st, start := rs.state, rs.at
	if time.Since(start) > s.cfg.TombstoneTTL/2 {
		s.m.fillLate.Add(float64(len(rows)))
		return
	}
	entries := make([]*entry, len(rows))
	for i, r := range rows {
		if r.enc != nil {
			entries[i] = &entry{kind: kindValue, version: r.enc.Version, json: r.enc.JSON, epoch: st, ttl: jitter(s.cfg.TTL)}
		} else {
			entries[i] = &entry{kind: kindAbsent, epoch: st, ttl: jitter(s.cfg.NegativeTTL)}
		}
	}
	if s.local != nil {
		for i, r := range rows {
			s.fillLocal(r.id, entries[i], start)
		}
	}
	if s.redis != nil {
		ids := make([]int64, len(rows))
		for i, r := range rows {
			ids[i] = r.id
		}
		if later {
			s.redis.fillLater(fillJob{ids: ids, entries: entries, health: rs.health, at: start})
		} else {
			s.redis.fill(s.ctx, ids, entries, rs.health)
		}
	}
}

// fillLocal installs e (its epoch set to the epoch read before the data
// was) unless the tier holds something newer.
func (s *Store) fillLocal(id int64, e *entry, start time.Time) fillResult {
	if time.Since(start) > s.cfg.TombstoneTTL/2 {
		s.m.fillLate.Inc()
		return fillSkipped
	}
	r := s.local.fill(id, e, &s.state)
	switch r {
	case fillInstalled:
		s.m.fillLocalInstalled.Inc()
	case fillStale:
		s.m.fillLocalStale.Inc()
	case fillUnchanged:
		s.m.fillLocalUnchanged.Inc()
	case fillSkipped:
		s.m.fillLocalSkipped.Inc()
	}
	return r
}

// jitter returns d ±10%, so entries filled together expire apart.
func jitter(d time.Duration) time.Duration {
	return d - d/10 + rand.N(d/5+1)
}

// CreateUser creates the user, then clears a cached absence of its id: a
// tombstone of version 1 rejects any fill that read the id as absent before
// the create. A replay changes nothing and invalidates nothing.
func (s *Store) CreateUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	u, replayed, err := s.store.CreateUser(ctx, in)
	if err != nil || replayed {
		return u, replayed, err
	}
	s.invalidate(ctx, u.ID, u.Version)
	return u, false, nil
}

// UpdateUser updates the user, then invalidates its cached versions before
// returning. When the outcome is unknown (a timeout may hide a commit) it
// invalidates with a poison tombstone that rejects every fill until it
// expires, and so it does when the row is not found: a writer that died
// between a delete's commit and its invalidation (a retried DELETE is then
// answered 404) must not leave the row cached until its TTL. A write the
// database refused releases its intent.
func (s *Store) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	s.intend(ctx, id)
	u, err := s.store.UpdateUser(ctx, id, upd)
	if err != nil {
		s.invalidate(ctx, id, failedWriteVersion(err))
		return nil, err
	}
	s.invalidate(ctx, id, u.Version)
	return u, nil
}

// DeleteUser deletes the user, then invalidates it with a poison tombstone
// (the deleted version is not known, and no version of a deleted row may be
// filled again). After the tombstone expires the id is cached as absent. A
// delete answered 404 invalidates too (see UpdateUser).
func (s *Store) DeleteUser(ctx context.Context, id int64, ifVersion int64) error {
	s.intend(ctx, id)
	err := s.store.DeleteUser(ctx, id, ifVersion)
	if err == nil {
		s.invalidate(ctx, id, poisonVersion)
	} else {
		s.invalidate(ctx, id, failedWriteVersion(err))
	}
	return err
}

// failedWriteVersion is the invalidation a failed update or delete ends
// with: poison when the row may have changed or is gone, else a release.
func failedWriteVersion(err error) int64 {
	if maybeCommitted(err) || errors.Is(err, userapi.ErrNotFound) {
		return poisonVersion
	}
	return releaseVersion
}

// maybeCommitted reports whether a failed write may nevertheless have
// changed the row: anything but the store's definite refusals.
func maybeCommitted(err error) bool {
	var verr *userapi.ValidationError
	switch {
	case errors.Is(err, userapi.ErrNotFound),
		errors.Is(err, userapi.ErrVersionMismatch),
		errors.Is(err, userapi.ErrEmailTaken),
		errors.Is(err, userapi.ErrIdempotencyMismatch),
		// Shed before it started: the write never reached the database.
		errors.Is(err, userapi.ErrOverloaded),
		errors.As(err, &verr):
		return false
	}
	return true
}

// intend announces a write of id before it reaches the database: Redis
// and, through the notice, every other instance's local tier hold an intent
// that rejects fills and is not served until the write's invalidation
// replaces it. A writer that dies between its commit and its invalidation
// (a crash, a kill) so leaves no old version cached: the intent expires
// after TombstoneTTL, and by then every read that could have seen the old
// row is too old to fill. Only the tiers other instances share need it: a
// dead writer's own local tier dies with it. Without Redis at hand the
// write goes on unannounced, as every write did before intents.
func (s *Store) intend(ctx context.Context, id int64) {
	if s.redis != nil {
		s.redis.intend(context.WithoutCancel(ctx), id)
	}
}

// invalidate makes every tier forget versions of id below version, before
// the write returns: a read that starts after it on this instance goes to
// the database (or finds a newer fill), and the other instances get a
// notice. Redis failures do not fail the write (it has committed): the
// invalidation is remembered and applied when Redis is back, before Redis is
// read again. A release (releaseVersion) only resolves the write's intent.
func (s *Store) invalidate(ctx context.Context, id, version int64) {
	if s.loader != nil && version != releaseVersion {
		// A load already in flight may have read the old row; later reads
		// must not join it.
		s.loader.forget(id)
	}
	if s.local != nil {
		s.local.tombstone(id, version, s.cfg.TombstoneTTL)
	}
	if s.redis != nil {
		// The write has committed: finish the invalidation even if the
		// client has gone.
		s.redis.invalidate(context.WithoutCancel(ctx), id, version)
	}
}

// onNotice applies another instance's (or our own) invalidation notice.
func (s *Store) onNotice(id, version int64) {
	s.m.invReceived.Inc()
	if s.loader != nil && version != releaseVersion {
		s.loader.forget(id)
	}
	if s.local != nil {
		s.local.tombstone(id, version, s.cfg.TombstoneTTL)
	}
	if s.cfg.onNotice != nil {
		s.cfg.onNotice(id, version, time.Now())
	}
}

// onIntent applies another instance's (or our own) intent notice.
func (s *Store) onIntent(id int64) {
	s.m.intentsReceived.Inc()
	if s.loader != nil {
		// A load in flight may finish after the commit with the old row.
		s.loader.forget(id)
	}
	if s.local != nil {
		s.local.intent(id, s.cfg.TombstoneTTL)
	}
}

// channelDown marks the notice channel down: the local tier stops serving
// and no local fill started before is accepted.
func (s *Store) channelDown() {
	s.state.set(false)
	s.m.channelUp.Set(0)
}

// channelUp marks the channel up after a (re)subscription. Entries filled
// before are dead by epoch; dropping them frees their memory.
func (s *Store) channelUp() {
	if !s.state.set(true) {
		return
	}
	if s.local != nil {
		s.local.flush()
	}
	s.m.channelUp.Set(1)
}

// flushLocal starts a new epoch without taking the channel down: every
// local entry filled before is dead, and so is every fill in flight.
func (s *Store) flushLocal() {
	if s.local != nil && s.state.renew() {
		s.local.flush()
	}
}

// followChanges keeps following the database's change stream until Close.
// The stream's own leader election lets one instance in a deployment apply
// it; the others wait in FollowChanges to take over.
func (s *Store) followChanges(feed userapi.ChangeFeed) {
	const maxBackoff = time.Second // bounds the catch-up after an outage
	backoff := 50 * time.Millisecond
	var lastErr string
	for s.ctx.Err() == nil {
		err := s.follow(feed)
		if s.ctx.Err() != nil {
			return
		}
		s.m.changesInterrupted.Inc()
		if msg := fmt.Sprint(err); msg != lastErr {
			s.log.Warn("change stream interrupted, retrying", "err", err)
			lastErr = msg
		}
		s.sleep(backoff)
		backoff = min(2*backoff, maxBackoff)
	}
}

// follow runs feed.FollowChanges once. A panic in it (in the stream's
// decoding, or in applying a change) is its error, and followChanges retries
// as after any failure: the change being applied was not acknowledged, so
// it comes again.
func (s *Store) follow(feed userapi.ChangeFeed) (err error) {
	defer panics.Recover(s.log, "change_stream", &err)
	return feed.FollowChanges(s.ctx, s.applyChanges, s.missedChanges)
}

func (s *Store) sleep(d time.Duration) {
	select {
	case <-s.ctx.Done():
	case <-time.After(d):
	}
}

// applyChanges invalidates every tier for committed changes, as the writes
// that made them would have: a tombstone at the new version (poison for a
// delete) locally, in Redis and, by the notice, on every instance. It
// returns nil only once Redis has taken every tombstone, so the stream
// acknowledges nothing that some instance may not have heard of.
func (s *Store) applyChanges(ctx context.Context, changes []userapi.Change) error {
	ids := make([]int64, len(changes))
	versions := make([]int64, len(changes))
	for i, c := range changes {
		ids[i], versions[i] = c.ID, c.Version
		if c.Deleted {
			versions[i] = poisonVersion
		}
		if s.loader != nil {
			s.loader.forget(c.ID)
		}
		if s.local != nil {
			s.local.tombstone(c.ID, versions[i], s.cfg.TombstoneTTL)
		}
	}
	if s.redis != nil {
		if err := s.redis.invalidateMany(ctx, ids, versions); err != nil {
			return err
		}
	}
	now := time.Now()
	for _, c := range changes {
		if !c.Committed.IsZero() {
			s.m.changeLag.Observe(now.Sub(c.Committed).Seconds())
		}
	}
	s.m.changesApplied.Add(float64(len(changes)))
	return nil
}

// missedChanges starts every tier afresh: changes may have been committed
// that no one invalidated.
func (s *Store) missedChanges(ctx context.Context) error {
	s.m.changesMissed.Inc()
	if s.redis != nil {
		return s.redis.startAfresh(ctx)
	}
	s.flushLocal()
	return nil
}
