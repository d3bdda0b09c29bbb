// Package http serves the users API of SPEC.md ("HTTP API") over a
// userapi.Store on fasthttp. It is the only package that imports fasthttp.
//
// routes.go lists every route and the middleware chain; user.go holds the
// handlers; problem.go maps every error to one status and writes it as
// RFC 9457 problem+json. openapi.json, embedded and served at /openapi.json,
// documents the same surface, and a test keeps the two in sync.
package http

import (
	"context"
	_ "embed"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"

	"userapi"
	"userapi/ratelimit"
)

//go:embed openapi.json
var openAPIDocument []byte

// Defaults for zero Options fields.
const (
	// DefaultMaxBodyBytes bounds a request body: a user is under 1 KiB of
	// JSON, so 64 KiB leaves room for any honest client and refuses floods.
	DefaultMaxBodyBytes = 64 << 10

	// DefaultReadTimeout bounds reading one request, headers and body, so
	// a slow or stalled client cannot hold a connection and its buffers.
	DefaultReadTimeout = 10 * time.Second

	// DefaultWriteTimeout bounds writing one response to a client that
	// does not read.
	DefaultWriteTimeout = 10 * time.Second

	// DefaultIdleTimeout is how long a keep-alive connection may wait for
	// its next request. It is longer than nginx's upstream keepalive_timeout
	// (60s) so that the proxy, not the service, closes idle upstream
	// connections: a server-side close racing a reused connection makes
	// nginx see a reset on a request.
	DefaultIdleTimeout = 90 * time.Second

	// DefaultRequestTimeout is the deadline of every handler's context. It
	// is above the stores' default query timeout (2s), so a dead database
	// shows up as the store's 503 and not as a cut-off request, and below
	// the proxy's read timeout, so the client gets our problem+json.
	DefaultRequestTimeout = 5 * time.Second

	// DefaultGzipMinBytes is the smallest body worth compressing: below
	// about 1 KiB the gzip header and the CPU cost outweigh the savings,
	// so single users (≈200 bytes) are never compressed; lists are.
	DefaultGzipMinBytes = 1 << 10
)

// Options configure a Server. The zero value is usable.
type Options struct {
	// MaxBodyBytes is the largest accepted request body; larger ones get
	// 413. 0 means DefaultMaxBodyBytes.
	MaxBodyBytes int

	// Timeouts of the fasthttp server; 0 means the Default* constants.
	ReadTimeout, WriteTimeout, IdleTimeout time.Duration

	// RequestTimeout is the deadline of the context every handler passes
	// to the store; 0 means DefaultRequestTimeout. When it passes the
	// request gets 503 with Retry-After.
	RequestTimeout time.Duration

	// PublicMetrics serves Metrics at GET /metrics on this listener.
	PublicMetrics bool
	// Metrics is what /metrics serves. When nil and Registerer is also a
	// Gatherer (a *prometheus.Registry), that is served.
	Metrics prometheus.Gatherer

	// Auth, when set, authenticates every request to a route with a
	// scope (all but /livez, /readyz, /openapi.json and /metrics) before
	// its handler runs. nil serves without authentication (--auth off).
	Auth Authenticator
	// Keys, when set, serves the /admin/keys routes (scope admin).
	Keys KeyAdmin

	// TrustedProxies are the peers whose X-Forwarded-For is believed when
	// logging the client address. Empty trusts nobody.
	TrustedProxies []netip.Prefix

	// Logger receives internal errors (500), outages (503), recovered
	// panics, and at debug level one line per request. nil discards.
	Logger *slog.Logger

	// Registerer receives the userapi_http_* metrics. nil means a private
	// registry (metrics are kept but not exposed).
	Registerer prometheus.Registerer

	// GzipMinBytes is the smallest response body that is compressed when
	// the client accepts gzip; 0 means DefaultGzipMinBytes.
	GzipMinBytes int

	// DrainDelay is how long Shutdown keeps serving before it closes
	// connections: /readyz answers 503 and every response carries
	// Connection: close, so a balancer stops picking this instance and
	// retires its keep-alive connections after a finished exchange rather
	// than racing a request against the close (a POST written to a
	// connection that closes under it cannot be retried safely). 0 closes
	// at once.
	DrainDelay time.Duration

	// RateLimit is the budget of every client (see rateClient in
	// limits.go); a zero Rate turns rate limiting off. Requests over it get
	// 429 with Retry-After; /livez and /readyz are never limited.
	RateLimit ratelimit.Limit
	// RateLimiter keeps the budgets; nil means a ratelimit.Local one
	// (each instance on its own). The caller closes it.
	RateLimiter ratelimit.Limiter

	// MaxConns and MaxConnsPerIP cap open connections in total and per
	// client address (trusted proxies excepted); 0 means no cap. See
	// DefaultMaxConns and DefaultMaxConnsPerIP for sane values.
	MaxConns, MaxConnsPerIP int
}

// Server serves the API over a Store. Create it with NewServer.
type Server struct {
	store   userapi.Store
	encoded userapi.EncodedReader // store's fast read path, nil if it has none
	// replicas: the store may read from replicas, so requests carry a
	// read-your-writes session (session.go).
	replicas bool
	opts     Options
	log      *slog.Logger
	metrics  *metrics

	policy    atomic.Pointer[policyField] // RateLimit-Policy of the last limit
	draining  atomic.Bool                 // set by Shutdown: answer with Connection: close
	ready     atomic.Pointer[func(context.Context) error]
	readiness atomic.Int32 // last /readyz result (readyUnknown, …), to log only changes
	requestID requestIDs
	deadlines deadlines

	router  router
	handler fasthttp.RequestHandler
	srv     *fasthttp.Server
}

// NewServer returns a Server over store. It panics only when opts.Registerer
// already holds different collectors under the userapi_http_* names, or
// when a rate limit is set without a limiter and one cannot be made.
func NewServer(store userapi.Store, opts Options) *Server {
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if opts.ReadTimeout <= 0 {
		opts.ReadTimeout = DefaultReadTimeout
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = DefaultWriteTimeout
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = DefaultIdleTimeout
	}
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = DefaultRequestTimeout
	}
	if opts.GzipMinBytes <= 0 {
		opts.GzipMinBytes = DefaultGzipMinBytes
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Registerer == nil {
		opts.Registerer = prometheus.NewRegistry()
	}
	if opts.Metrics == nil {
		if g, ok := opts.Registerer.(prometheus.Gatherer); ok {
			opts.Metrics = g
		}
	}
	if !opts.RateLimit.Unlimited() && opts.RateLimiter == nil {
		l, err := ratelimit.NewLocal(0)
		if err != nil {
			panic("http: " + err.Error())
		}
		opts.RateLimiter = l
	}
	s := &Server{
		store:   store,
		opts:    opts,
		log:     opts.Logger,
		metrics: newMetrics(opts.Registerer),
	}
	s.requestID.init()
	s.deadlines.timeout = opts.RequestTimeout
	s.encoded, _ = store.(userapi.EncodedReader)
	if rr, ok := store.(userapi.ReplicaReader); ok && rr.ReadsReplicas() {
		s.replicas = true
	}
	ping := store.Ping
	s.ready.Store(&ping)
	s.router = s.newRouter()
	s.handler = s.serve
	s.srv = &fasthttp.Server{
		Handler:      s.handler,
		ErrorHandler: s.serveParseError,
		// No Server header: it tells attackers the stack and clients
		// nothing they need.
		Name:                  "",
		NoDefaultServerHeader: true,
		ReadTimeout:           opts.ReadTimeout,
		WriteTimeout:          opts.WriteTimeout,
		IdleTimeout:           opts.IdleTimeout,
		// fasthttp refuses a larger body before reading it (413 via
		// serveParseError); the handlers check again for callers of
		// Handler that bypass this server.
		MaxRequestBodySize: opts.MaxBodyBytes,
		// Tell clients that are mid-keep-alive during a drain to
		// reconnect (to another instance behind the balancer).
		CloseOnShutdown: true,
		// Every body the service sends has its own Content-Type; 204 and
		// 304 must not get fasthttp's default text/plain.
		NoDefaultContentType: true,
		// The API takes no forms; do not parse multipart bodies.
		DisablePreParseMultipartForm: true,
		Logger:                       fasthttpLogger{s.log},
	}
	return s
}

// SetReady replaces the readiness check behind /readyz, which is
// store.Ping by default. It may be called while serving.
func (s *Server) SetReady(ready func(ctx context.Context) error) {
	if ready == nil {
		ready = s.store.Ping
	}
	s.ready.Store(&ready)
}

// Handler returns the whole request chain (see routes.go), for serving
// with another fasthttp.Server or for tests.
func (s *Server) Handler() fasthttp.RequestHandler { return s.handler }

// Serve accepts connections on ln until Shutdown. It returns nil after
// Shutdown and the accept error otherwise.
// Connections beyond MaxConns or MaxConnsPerIP are answered and closed at
// accept.
func (s *Server) Serve(ln net.Listener) error { return s.srv.Serve(s.capConns(ln)) }

// Shutdown drains the server: for DrainDelay (bounded by ctx) it keeps
// serving with /readyz failing and Connection: close on every response,
// then stops accepting, closes idle connections, and waits for in-flight
// requests to finish. When ctx ends first it returns ctx.Err() and leaves
// the remaining connections to finish on their own.
func (s *Server) Shutdown(ctx context.Context) error {
	s.draining.Store(true)
	if s.opts.DrainDelay > 0 {
		t := time.NewTimer(s.opts.DrainDelay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
	return s.srv.ShutdownWithContext(ctx)
}

// fasthttpLogger routes fasthttp's own messages (connection errors) to slog.
type fasthttpLogger struct{ log *slog.Logger }

func (l fasthttpLogger) Printf(format string, args ...any) {
	if l.log.Enabled(context.Background(), slog.LevelDebug) {
		l.log.Debug("fasthttp", "msg", fmt.Sprintf(format, args...))
	}
}
