package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	nethttp "net/http"
	"net/http/pprof"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"userapi"
	"userapi/auth"
	"userapi/cache"
	"userapi/http"
	"userapi/internal/redact"
	"userapi/internal/redisurl"
	"userapi/ratelimit"
)

func newLogger(c *config, w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return nil, fmt.Errorf("%w: --log-level %q", errUsage, c.LogLevel)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.LogFormat {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("%w: --log-format %q is not text or json", errUsage, c.LogFormat)
}

// serve runs the service until ctx is cancelled. The start-up order:
//
//  1. configuration, checked before anything starts
//  2. listeners (public, debug), over a store and an authenticator that
//     answer 503 until they are ready, so /readyz says why it is not
//  3. the database store, waited for
//  4. the cache over it, and authentication over its api_keys table
//  5. serving, until ctx ends or a listener fails
//  6. shutdown: drain the listeners, then (deferred) close authentication,
//     the cache and the store, in the reverse order of their start
func serve(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c, fs, err := parseServe(args, getenv, stderr)
	if err != nil {
		return err
	}
	log, err := newLogger(c, stdout)
	if err != nil {
		return err
	}
	mode, err := c.checkServe()
	if err != nil {
		return err
	}
	dump(log, fs)
	setMemoryLimit(c, mode, getenv)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	limiter, err := rateLimiter(c, log, reg)
	if err != nil {
		return err
	}
	if limiter != nil {
		defer limiter.Close()
	}

	late := &lateStore{replicas: len(c.Replicas) > 0}
	lateAuth := &lateAuth{}
	ls, err := startListeners(c, late, lateAuth, limiter, reg, log)
	if err != nil {
		return err
	}

	store, err := openStoreWaiting(ctx, c, c.Migrate, log)
	if err != nil && ctx.Err() != nil {
		return ls.shutdown() // stopped while waiting: a normal stop
	}
	if err != nil {
		return errors.Join(fmt.Errorf("open database: %w", err), ls.shutdown())
	}
	defer store.Close()
	if len(c.Replicas) > 0 {
		log.Info("cache fills and lists may read from replicas that have replayed what they need",
			"replicas", c.Replicas.String(), "max_lag", c.MaxLag)
	}
	if m, ok := store.(interface{ RegisterMetrics(prometheus.Registerer) }); ok {
		m.RegisterMetrics(reg)
	}
	cached, err := startCache(ctx, c, store, mode, reg, log)
	if err != nil {
		return errors.Join(err, ls.shutdown())
	}
	defer cached.Close()
	if c.Auth == "on" {
		a, err := startAuth(ctx, c, store, ls.addr, log, stderr)
		if err != nil {
			return errors.Join(err, ls.shutdown())
		}
		defer a.Close()
		lateAuth.set(a)
	}
	late.set(cached)
	log.Info("database open", "db", redact.URL(c.DB))

	select {
	case err := <-ls.errc:
		return errors.Join(err, ls.shutdown())
	case <-ctx.Done():
	}
	return ls.shutdown()
}

// parseServe parses the flags (and USERAPI_* variables) of `userapi serve`.
func parseServe(args []string, getenv func(string) string, stderr io.Writer) (*config, *flag.FlagSet, error) {
	c := &config{}
	fs := newFlagSet("serve", stderr)
	c.serveFlags(fs)
	if err := parseArgs(fs, args, getenv); err != nil {
		return nil, nil, err
	}
	return c, fs, nil
}

// checkServe refuses configurations that cannot work, before anything
// starts, and returns the cache mode.
func (c *config) checkServe() (cache.Mode, error) {
	mode, err := cache.ParseMode(c.Cache)
	if err != nil {
		return "", fmt.Errorf("%w: --cache: %v", errUsage, err)
	}
	if (mode == cache.ModeRedis || mode == cache.ModeTiered) && c.Redis == "" {
		return "", fmt.Errorf("%w: --cache %s needs --redis", errUsage, mode)
	}
	if c.Redis != "" {
		if _, err := redisurl.Parse(c.Redis); err != nil {
			return "", fmt.Errorf("%w: --redis: %v", errUsage, err)
		}
	}
	if _, err := c.trustedProxies(); err != nil {
		return "", fmt.Errorf("%w: %v", errUsage, err)
	}
	if _, err := backend(c.DB); err != nil {
		return "", err
	}
	if c.Auth != "on" && c.Auth != "off" {
		return "", fmt.Errorf("%w: --auth %q is not on or off", errUsage, c.Auth)
	}
	jwt := c.JWKSURL != "" || c.JWTPublicKey != ""
	if jwt && (c.JWKSURL != "" && c.JWTPublicKey != "" || c.JWTIssuer == "" || c.JWTAudience == "") {
		return "", fmt.Errorf("%w: bearer JWTs need one of --jwt-jwks-url and --jwt-public-key, and --jwt-issuer and --jwt-audience", errUsage)
	}
	return mode, nil
}

// setMemoryLimit sets the collector's soft limit. The heap is mostly the
// local cache. A soft memory limit of its budget plus 48 MiB (unless
// GOMEMLIMIT is set) makes the collector run before garbage doubles the
// heap, keeping the resident size within the budget plus 64 MiB (the rest
// is stacks and runtime metadata).
func setMemoryLimit(c *config, mode cache.Mode, getenv func(string) string) {
	if getenv("GOMEMLIMIT") == "" && mode != cache.ModeOff && mode != cache.ModeRedis {
		debug.SetMemoryLimit(c.CacheBytes + 48<<20)
	}
}

// listeners are the running public and debug servers.
type listeners struct {
	addr     string     // the public listener's address
	errc     chan error // a listener that failed
	shutdown func() error
}

// startListeners starts the public listener over store and, unless
// --auth off, authn; and the debug listener when configured. They come up
// before the database is open, answering 503 until it is, so /readyz says
// 503 (not "connection refused") while start-up waits for the database.
func startListeners(c *config, store *lateStore, authn *lateAuth, limiter ratelimit.Limiter, reg *prometheus.Registry, log *slog.Logger) (*listeners, error) {
	proxies, _ := c.trustedProxies() // checked by checkServe
	opts := http.Options{
		MaxBodyBytes:   c.MaxBody,
		ReadTimeout:    c.ReadTimeout,
		WriteTimeout:   c.WriteTimeout,
		IdleTimeout:    c.IdleTimeout,
		RequestTimeout: c.RequestTimeout,
		DrainDelay:     c.DrainDelay,
		PublicMetrics:  c.PublicMetrics,
		Metrics:        reg,
		TrustedProxies: proxies,
		Logger:         log,
		Registerer:     reg,
		RateLimit:      ratelimit.Limit{Rate: c.RateLimit, Burst: c.RateBurst},
		RateLimiter:    limiter,
		MaxConns:       c.MaxConns,
		MaxConnsPerIP:  c.MaxConnsPerIP,
	}
	if c.Auth == "on" {
		opts.Auth, opts.Keys = authn, authn
	} else {
		log.Warn("authentication is off (--auth off): anyone who reaches the listener can read, change and delete every user; use it for benchmarks only")
	}
	srv := http.NewServer(store, opts)
	ln, err := net.Listen("tcp", c.Addr)
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	l := &listeners{addr: ln.Addr().String(), errc: make(chan error, 2)}
	go func() { l.errc <- srv.Serve(ln) }()
	log.Info("listening", "addr", "http://"+ln.Addr().String())

	var dbg *nethttp.Server
	if c.DebugAddr != "" {
		dln, err := net.Listen("tcp", c.DebugAddr)
		if err != nil {
			srv.Shutdown(context.Background())
			return nil, fmt.Errorf("debug listen: %w", err)
		}
		dbg = &nethttp.Server{Handler: debugMux(reg), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := dbg.Serve(dln); !errors.Is(err, nethttp.ErrServerClosed) {
				l.errc <- fmt.Errorf("debug server: %w", err)
			}
		}()
		log.Info("debug listener", "addr", "http://"+dln.Addr().String())
	}
	// shutdown drains the public listener first (the debug one keeps
	// serving metrics and profiles meanwhile), then closes the debug one.
	l.shutdown = func() error {
		log.Info("shutting down", "drain_delay", c.DrainDelay, "timeout", c.ShutdownTimeout)
		sctx, cancel := context.WithTimeout(context.Background(), c.ShutdownTimeout)
		defer cancel()
		err := srv.Shutdown(sctx)
		if dbg != nil {
			dbg.Shutdown(sctx)
		}
		if err != nil {
			return fmt.Errorf("shutdown: %w", err)
		}
		log.Info("stopped")
		return nil
	}
	return l, nil
}

// startCache starts the cache in mode over store, with the store's change
// stream when --change-stream allows.
func startCache(ctx context.Context, c *config, store userapi.Store, mode cache.Mode, reg prometheus.Registerer, log *slog.Logger) (*cache.Store, error) {
	feed, err := changeFeed(ctx, c, store, string(mode), log)
	if err != nil {
		return nil, err
	}
	dbBound, admit := shedding(c, store, log, reg)
	cached, err := cache.New(ctx, dbBound, cache.Config{
		Mode:          mode,
		Coalesce:      c.Coalesce,
		LocalBytes:    c.CacheBytes,
		TTL:           c.CacheTTL,
		NegativeTTL:   c.NegativeTTL,
		RedisURL:      c.Redis,
		RedisTimeout:  c.RedisTimeout,
		KeyPrefix:     c.RedisPrefix,
		MaxBatch:      c.MaxBatch,
		Loaders:       c.Loaders,
		ReplicaMaxLag: c.MaxLag,
		Changes:       feed,
		Admit:         admit,
		Logger:        log,
		Registerer:    reg,
	})
	if err != nil {
		return nil, fmt.Errorf("start cache: %w", err)
	}
	return cached, nil
}

// startAuth starts authentication over store's api_keys table. On the
// first start of a deployment (no key at all) it creates an admin key and
// prints it once on stderr, so a newcomer can use the service.
func startAuth(ctx context.Context, c *config, store userapi.Store, addr string, log *slog.Logger, stderr io.Writer) (*auth.Authenticator, error) {
	keys, ok := store.(userapi.KeyStore)
	if !ok {
		return nil, fmt.Errorf("the %s store has no api keys", kindOf(c))
	}
	a, err := auth.New(ctx, keys, c.authConfig(log))
	if err != nil {
		return nil, fmt.Errorf("start authentication: %w", err)
	}
	if c.BootstrapKey {
		if err := bootstrapKey(ctx, a, addr, log, stderr); err != nil {
			a.Close()
			return nil, err
		}
	}
	return a, nil
}

// bootstrapKey creates the first key when the table is empty. Instances
// started at the same moment on a new database may each create one; each
// is printed by the instance that made it and listed by `userapi keys list`.
func bootstrapKey(ctx context.Context, a *auth.Authenticator, addr string, log *slog.Logger, stderr io.Writer) error {
	existing, err := a.List(ctx)
	if err != nil {
		return fmt.Errorf("list api keys: %w", err)
	}
	if len(existing) > 0 {
		return nil
	}
	secret, k, err := a.Create(ctx, userapi.KeyCreate{Name: "first admin key", Scopes: userapi.ScopeAll})
	if err != nil {
		return fmt.Errorf("create the first api key: %w", err)
	}
	// The secret goes to stderr only, never through the logger.
	fmt.Fprintf(stderr, "\n"+
		"  Created the first API key (id %d, scopes %s). It is shown only this once:\n\n"+
		"    %s\n\n"+
		"  Use it as a bearer credential, for example:\n"+
		"    curl -H 'Authorization: Bearer %s' http://%s/users\n"+
		"  Create narrower keys with `userapi keys create` or POST /admin/keys.\n\n",
		k.ID, k.Scopes, secret, secret, addr)
	log.Info("created the first api key and printed it once on stderr", "key_id", k.ID, "scopes", k.Scopes.String())
	return nil
}

// debugMux serves pprof and metrics on the debug listener, which is off by
// default and meant for loopback or an operator network only. It mounts
// no expvar (/debug/vars publishes the raw command line) and nothing of
// http.DefaultServeMux, where net/http/pprof and expvar register
// themselves.
func debugMux(reg *prometheus.Registry) *nethttp.ServeMux {
	mux := nethttp.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}

// cmdline is pprof.Cmdline (the NUL-separated command line) with the
// passwords in URLs redacted, as in the logged configuration: a database or
// Redis URL given as a flag would otherwise be readable here.
func cmdline(w nethttp.ResponseWriter, _ *nethttp.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.WriteString(w, strings.Join(redact.Args(os.Args), "\x00"))
}
