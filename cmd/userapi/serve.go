package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	nethttp "net/http"
	"net/http/pprof"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"userapi/cache"
	"userapi/http"
	"userapi/internal/redact"
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

// serve runs the service until ctx is cancelled, then drains in-flight
// requests and closes the cache and the database pool, in that order.
func serve(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	var c config
	fs := newFlagSet("serve", stderr)
	c.serveFlags(fs)
	if err := parseArgs(fs, args, getenv); err != nil {
		return err
	}
	log, err := newLogger(&c, stdout)
	if err != nil {
		return err
	}
	mode, err := cache.ParseMode(c.Cache)
	if err != nil {
		return fmt.Errorf("%w: --cache: %v", errUsage, err)
	}
	if (mode == cache.ModeRedis || mode == cache.ModeTiered) && c.Redis == "" {
		return fmt.Errorf("%w: --cache %s needs --redis", errUsage, mode)
	}
	proxies, err := c.trustedProxies()
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if _, err := backend(c.DB); err != nil {
		return err
	}
	dump(log, fs)

	// The heap is mostly the local cache. A soft memory limit of its budget
	// plus 48 MiB (unless GOMEMLIMIT is set) makes the collector run
	// before garbage doubles the heap, keeping the resident size within
	// the budget plus 64 MiB (the rest is stacks and runtime metadata).
	if getenv("GOMEMLIMIT") == "" && mode != cache.ModeOff && mode != cache.ModeRedis {
		debug.SetMemoryLimit(c.CacheBytes + 48<<20)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	limiter, err := rateLimiter(&c, log, reg)
	if err != nil {
		return err
	}
	if limiter != nil {
		defer limiter.Close()
	}

	// The listeners come up first, over a store that answers 503 until the
	// database is open, so /readyz says 503 (not "connection refused")
	// while start-up waits for the database.
	late := &lateStore{}
	srv := http.NewServer(late, http.Options{
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
	})
	ln, err := net.Listen("tcp", c.Addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(ln) }()
	log.Info("listening", "addr", "http://"+ln.Addr().String())

	var debug *nethttp.Server
	if c.DebugAddr != "" {
		dln, err := net.Listen("tcp", c.DebugAddr)
		if err != nil {
			srv.Shutdown(context.Background())
			return fmt.Errorf("debug listen: %w", err)
		}
		debug = &nethttp.Server{Handler: debugMux(reg), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := debug.Serve(dln); !errors.Is(err, nethttp.ErrServerClosed) {
				errc <- fmt.Errorf("debug server: %w", err)
			}
		}()
		log.Info("debug listener", "addr", "http://"+dln.Addr().String())
	}
	// shutdown drains the public listener first (the debug one keeps
	// serving metrics and profiles meanwhile), then closes the debug one.
	shutdown := func() error {
		log.Info("shutting down", "drain_delay", c.DrainDelay, "timeout", c.ShutdownTimeout)
		sctx, cancel := context.WithTimeout(context.Background(), c.ShutdownTimeout)
		defer cancel()
		err := srv.Shutdown(sctx)
		if debug != nil {
			debug.Shutdown(sctx)
		}
		if err != nil {
			return fmt.Errorf("shutdown: %w", err)
		}
		log.Info("stopped")
		return nil
	}

	store, err := openStoreWaiting(ctx, &c, c.Migrate, log)
	if err != nil && ctx.Err() != nil {
		return shutdown() // stopped while waiting: a normal stop
	}
	if err != nil {
		return errors.Join(fmt.Errorf("open database: %w", err), shutdown())
	}
	defer store.Close()
	if m, ok := store.(interface{ RegisterMetrics(prometheus.Registerer) }); ok {
		m.RegisterMetrics(reg)
	}
	feed, err := changeFeed(ctx, &c, store, string(mode), log)
	if err != nil {
		return errors.Join(err, shutdown())
	}
	dbBound, admit := shedding(&c, store, log, reg)
	cached, err := cache.New(ctx, dbBound, cache.Config{
		Mode:         mode,
		Coalesce:     c.Coalesce,
		LocalBytes:   c.CacheBytes,
		TTL:          c.CacheTTL,
		NegativeTTL:  c.NegativeTTL,
		RedisURL:     c.Redis,
		RedisTimeout: c.RedisTimeout,
		KeyPrefix:    c.RedisPrefix,
		MaxBatch:     c.MaxBatch,
		Loaders:      c.Loaders,
		Changes:      feed,
		Admit:        admit,
		Logger:       log,
		Registerer:   reg,
	})
	if err != nil {
		return errors.Join(fmt.Errorf("start cache: %w", err), shutdown())
	}
	defer cached.Close()
	late.set(cached)
	log.Info("database open", "db", redact.URL(c.DB))

	select {
	case err := <-errc:
		return errors.Join(err, shutdown())
	case <-ctx.Done():
	}
	return shutdown()
}

// debugMux serves pprof and metrics on the debug listener, which is off by
// default and meant for loopback or an operator network only.
func debugMux(reg *prometheus.Registry) *nethttp.ServeMux {
	mux := nethttp.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}
