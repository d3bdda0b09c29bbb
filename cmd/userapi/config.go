package main

import (
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"userapi/auth"
	"userapi/cache"
	"userapi/http"
	"userapi/internal/redact"
	"userapi/postgres"
)

// envPrefix names the environment variables that back every flag:
// --pool-size is USERAPI_POOL_SIZE. Flags given on the command line win.
const envPrefix = "USERAPI_"

// config is the service's whole configuration, shared by the subcommands.
type config struct {
	Addr      string
	DB        string
	DBDirect  string
	Replicas  urlList
	MaxLag    time.Duration
	DBPool    bool
	PoolSize  int
	DBTimeout time.Duration
	DBWait    time.Duration
	Migrate   bool

	Redis        string
	RedisTimeout time.Duration
	Cache        string
	Coalesce     bool
	CacheBytes   int64
	CacheTTL     time.Duration
	NegativeTTL  time.Duration
	MaxBatch     int
	Loaders      int
	ChangeStream string
	ChangeSlot   string

	DebugAddr      string
	PublicMetrics  bool
	TrustedProxies string
	MaxBody        int

	ReadTimeout     time.Duration
	WriteTimeout    time.Duration
	IdleTimeout     time.Duration
	RequestTimeout  time.Duration
	ShutdownTimeout time.Duration
	DrainDelay      time.Duration
	RedisPrefix     string

	Auth             string
	BootstrapKey     bool
	KeyCheckInterval time.Duration
	JWKSURL          string
	JWTPublicKey     string
	JWTIssuer        string
	JWTAudience      string
	JWTAlgorithms    string
	JWTLeeway        time.Duration

	LogLevel  string
	LogFormat string

	RateLimit      float64 // requests a second; 0 is off
	RateBurst      int
	RateLimitStore string
	Shed           bool
	ShedMinLimit   uint
	ShedMaxWait    time.Duration
	MaxConns       int
	MaxConnsPerIP  int
}

// urlList is a repeatable URL flag; one value may hold several URLs
// separated by spaces (as an environment variable must).
type urlList []string

func (l *urlList) String() string {
	out := make([]string, len(*l))
	for i, u := range *l {
		out[i] = redact.URL(u)
	}
	return strings.Join(out, " ")
}

func (l *urlList) Set(v string) error {
	*l = append(*l, strings.Fields(v)...)
	return nil
}

// dbFlags registers the flags every subcommand that opens the database needs.
func (c *config) dbFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.DB, "db", "sqlite:userapi.db", "database URL: postgres://user@host:5432/db, mysql://user:pass@host:3306/db or sqlite:PATH")
	fs.StringVar(&c.DBDirect, "db-direct", "", "PostgreSQL's own URL when --db goes through PgBouncer in transaction mode: migrations and the change stream use it (empty: --db)")
	fs.BoolVar(&c.DBPool, "db-pool", true, "pool database connections (false opens one connection per query, for comparison)")
	fs.IntVar(&c.PoolSize, "pool-size", 0, "maximum pooled database connections (0: the store's default for this machine)")
	// 2s: a loaded pool answers in milliseconds; a dead database must turn
	// into a 503 well before the request deadline.
	fs.DurationVar(&c.DBTimeout, "db-timeout", 2*time.Second, "deadline of every database call")
	fs.DurationVar(&c.DBWait, "db-wait", 30*time.Second, "how long start-up waits for the database to become reachable")
}

// serveFlags registers the flags of `userapi serve`.
func (c *config) serveFlags(fs *flag.FlagSet) {
	c.dbFlags(fs)
	fs.Var(&c.Replicas, "db-replica", "URL of a PostgreSQL streaming replica that may serve cache fills and lists (repeatable; in the environment, separated by spaces)")
	// 1s: far below the cache's tombstone lifetime (10 s), see
	// postgres.DefaultReplicaMaxLag.
	fs.DurationVar(&c.MaxLag, "db-replica-max-lag", postgres.DefaultReplicaMaxLag, "a replica further behind the primary than this serves no reads (they go to the primary)")
	fs.StringVar(&c.Addr, "addr", "127.0.0.1:8080", "public listen address")
	fs.BoolVar(&c.Migrate, "migrate", false, "apply pending migrations at start (SQLite always does)")
	fs.StringVar(&c.Redis, "redis", "", "Redis URL: redis://host:6379/0, a cluster redis://h1:p1,h2:p2,h3:p3, or a Sentinel set redis-sentinel://s1:26379,s2:26379/mymaster (docs/deploy.md); needed by the redis and tiered caches")
	// 50ms: a healthy Redis on the same network answers in well under a
	// millisecond; waiting longer only adds latency before failing open.
	fs.StringVar(&c.RedisPrefix, "redis-prefix", cache.DefaultKeyPrefix, "prefix of every Redis key and channel, to share one Redis between deployments")
	fs.DurationVar(&c.RedisTimeout, "redis-timeout", cache.DefaultRedisTimeout, "deadline of every Redis call")
	fs.StringVar(&c.Cache, "cache", "local", "cache mode: off, local, redis or tiered")
	fs.BoolVar(&c.Coalesce, "coalesce", true, "coalesce concurrent loads of a key and batch misses into multi-key queries")
	fs.Int64Var(&c.CacheBytes, "cache-bytes", cache.DefaultLocalBytes, "byte budget of the in-process cache")
	fs.DurationVar(&c.CacheTTL, "cache-ttl", cache.DefaultTTL, "time to live of cached users (jittered ±10%)")
	fs.DurationVar(&c.NegativeTTL, "negative-ttl", cache.DefaultNegativeTTL, "time to live of cached absent ids")
	fs.IntVar(&c.MaxBatch, "max-batch", cache.DefaultMaxBatch, "most ids loaded by one multi-key query")
	fs.IntVar(&c.Loaders, "loaders", 0, "multi-key loads run at once (0: GOMAXPROCS/2, at least 2, at most the pool size)")
	fs.StringVar(&c.ChangeStream, "change-stream", "auto", "invalidate from the database's change stream, for writes made outside the service: auto (when the database can), on (refuse to start without), off")
	fs.StringVar(&c.ChangeSlot, "change-slot", "", "PostgreSQL replication slot and publication of the change stream (empty: userapi_<database>)")
	fs.StringVar(&c.DebugAddr, "debug-addr", "", "listen address of the debug server with pprof and metrics (empty: off)")
	fs.BoolVar(&c.PublicMetrics, "public-metrics", false, "also serve /metrics on the public listener")
	fs.StringVar(&c.TrustedProxies, "trusted-proxies", "", "comma-separated addresses or CIDRs whose X-Forwarded-For is trusted")
	fs.IntVar(&c.MaxBody, "max-body", http.DefaultMaxBodyBytes, "largest accepted request body in bytes")
	fs.DurationVar(&c.ReadTimeout, "read-timeout", http.DefaultReadTimeout, "time to read a whole request")
	fs.DurationVar(&c.WriteTimeout, "write-timeout", http.DefaultWriteTimeout, "time to write a whole response")
	fs.DurationVar(&c.IdleTimeout, "idle-timeout", http.DefaultIdleTimeout, "keep-alive idle time (above nginx's upstream keepalive_timeout)")
	fs.DurationVar(&c.RequestTimeout, "request-timeout", http.DefaultRequestTimeout, "deadline of one request's work")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", 15*time.Second, "how long shutdown drains in-flight requests")
	// 1s: long enough for a balancer to finish the exchanges it has started
	// on this instance's keep-alive connections and reconnect elsewhere.
	fs.DurationVar(&c.DrainDelay, "drain-delay", time.Second, "on shutdown, keep serving this long with /readyz failing and Connection: close")
	c.authFlags(fs)
	c.limitFlags(fs)
	c.logFlags(fs)
}

// authFlags registers the authentication flags of `userapi serve`
// (docs/security.md).
func (c *config) authFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Auth, "auth", "on", "authentication: on (API keys and, when configured, bearer JWTs) or off (for benchmarks only)")
	fs.BoolVar(&c.BootstrapKey, "bootstrap-key", true, "on the first start with an empty api_keys table, create an admin key and print it once on stderr")
	fs.DurationVar(&c.KeyCheckInterval, "key-check-interval", auth.DefaultRevisionInterval, "how often to check the api_keys table for revocations made elsewhere")
	fs.StringVar(&c.JWKSURL, "jwt-jwks-url", "", "JWKS URL of the identity provider whose bearer JWTs are accepted")
	fs.StringVar(&c.JWTPublicKey, "jwt-public-key", "", "PEM file with the public key that signs accepted bearer JWTs (instead of --jwt-jwks-url)")
	fs.StringVar(&c.JWTIssuer, "jwt-issuer", "", "required iss of bearer JWTs")
	fs.StringVar(&c.JWTAudience, "jwt-audience", "", "required aud of bearer JWTs")
	fs.StringVar(&c.JWTAlgorithms, "jwt-algorithms", auth.DefaultJWTAlgorithms, "accepted JWT signature algorithms, comma-separated (asymmetric only)")
	fs.DurationVar(&c.JWTLeeway, "jwt-leeway", auth.DefaultJWTLeeway, "clock skew tolerated on JWT exp and nbf")
}

// authConfig is the auth package's configuration from c.
func (c *config) authConfig(log *slog.Logger) auth.Config {
	return auth.Config{
		Keys: auth.KeysConfig{RevisionInterval: c.KeyCheckInterval, Logger: log},
		JWT: auth.JWTConfig{
			JWKSURL:       c.JWKSURL,
			PublicKeyFile: c.JWTPublicKey,
			Issuer:        c.JWTIssuer,
			Audience:      c.JWTAudience,
			Algorithms:    c.JWTAlgorithms,
			Leeway:        c.JWTLeeway,
		},
	}
}

func (c *config) logFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", "text", "log format: text or json")
}

// parse parses args into fs, then fills every flag not given on the command
// line from its USERAPI_* environment variable.
func parse(fs *flag.FlagSet, args []string, getenv func(string) string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		name := envName(f.Name)
		if v := getenv(name); v != "" {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", name, v, e)
			}
		}
	})
	return err
}

// envName is the environment variable of flag: USERAPI_<FLAG>, upper case,
// "-" as "_".
func envName(flag string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// trustedProxies parses the --trusted-proxies list.
func (c *config) trustedProxies() ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range strings.Split(c.TrustedProxies, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("--trusted-proxies: %q is not an address or CIDR", s)
		}
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// dump logs every flag's effective value, with secrets redacted
// (redact.Flag: passwords in URLs, flags named as secrets).
func dump(log *slog.Logger, fs *flag.FlagSet) {
	var attrs []any
	fs.VisitAll(func(f *flag.Flag) {
		attrs = append(attrs, slog.String(f.Name, redact.Flag(f.Name, f.Value.String())))
	})
	log.Info("config", attrs...)
}
