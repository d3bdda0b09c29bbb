package http

import (
	"math"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"

	"userapi/ratelimit"
)

// Defaults of the connection caps (Options.MaxConns, MaxConnsPerIP).
const (
	// DefaultMaxConns bounds open connections in total. A connection
	// costs fasthttp about 25 KiB (its goroutine, read and write buffers
	// and request context) whether it is busy or idle, so 2048 cost at
	// most some 50 MiB; the benchmarks use 64 to 256, nginx in front
	// keeps at most 128 idle per worker.
	DefaultMaxConns = 2048

	// DefaultMaxConnsPerIP bounds the connections of one client address,
	// so that one client cannot take all DefaultMaxConns: 256 is what the
	// heaviest benchmark opens from one address. Trusted proxies
	// (Options.TrustedProxies) carry many clients and are bounded only by
	// the total.
	DefaultMaxConnsPerIP = 256
)

// rateClient is the identity a request is rate limited under, and its
// budget. It is the one place that decides both: the client address (the
// peer, or behind a trusted proxy the nearest untrusted X-Forwarded-For hop,
// see clientAddr) with Options.RateLimit, or for an authenticated request
// the principal's ID with its own limit where its key sets one.
func (s *Server) rateClient(rc *fasthttp.RequestCtx) (string, ratelimit.Limit) {
	if p := PrincipalOf(rc); p != nil {
		l := s.opts.RateLimit
		if p.RateLimit > 0 {
			l.Rate = p.RateLimit
			if p.RateBurst > 0 {
				l.Burst = p.RateBurst
			} else {
				l.Burst = max(1, int(p.RateLimit))
			}
		}
		return p.ID, l
	}
	var buf [len("ip:") + len("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%") + 16]byte
	b := append(buf[:0], "ip:"...)
	return string(s.clientAddr(rc).AppendTo(b)), s.opts.RateLimit
}

// Rate limit header fields of draft-ietf-httpapi-ratelimit-headers-10
// (https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/),
// in its Structured Fields (RFC 9651) syntax: a List of one item, the
// policy's name as a String, with Integer parameters.
//
//	RateLimit-Policy: "client";q=2000;w=2   quota q per window w seconds
//	RateLimit: "client";r=1999;t=1          r left now, full again in t s
//
// A token bucket of rate R and burst B is the policy q=B per w=B/R seconds
// (rounded up): an idle client may send B requests at once and its quota
// comes back within w.
var (
	hRateLimitPolicy = []byte("RateLimit-Policy")
	hRateLimit       = []byte("RateLimit")
)

const ratePolicyName = `"client"`

// policyField caches the RateLimit-Policy value of the last limit seen: in
// practice every request carries the configured one.
type policyField struct {
	limit ratelimit.Limit
	value []byte
}

func (s *Server) policyValue(l ratelimit.Limit) []byte {
	if p := s.policy.Load(); p != nil && p.limit == l {
		return p.value
	}
	v := append([]byte(ratePolicyName), ";q="...)
	v = strconv.AppendInt(v, int64(max(l.Burst, 1)), 10)
	v = append(v, ";w="...)
	v = strconv.AppendInt(v, int64(l.Window()), 10)
	s.policy.Store(&policyField{limit: l, value: v})
	return v
}

// rateLimit takes a token for the request's client and sets the rate limit
// fields; a client out of tokens gets 429 with Retry-After.
// limit applies the rate limit to a request of ep, when it has one.
func (s *Server) limit(rc *fasthttp.RequestCtx, ep *endpoint) error {
	if !ep.limited || s.opts.RateLimiter == nil {
		return nil
	}
	return s.rateLimit(rc)
}

func (s *Server) rateLimit(rc *fasthttp.RequestCtx) error {
	id, l := s.rateClient(rc)
	if l.Unlimited() {
		return nil
	}
	d := s.opts.RateLimiter.Allow(id, l)
	h := &rc.Response.Header
	h.SetCanonical(hRateLimitPolicy, s.policyValue(l))
	var buf [64]byte
	v := append(buf[:0], ratePolicyName...)
	v = append(v, ";r="...)
	v = strconv.AppendInt(v, int64(d.Remaining), 10)
	v = append(v, ";t="...)
	v = strconv.AppendInt(v, ceilSeconds(d.Reset), 10)
	h.SetCanonical(hRateLimit, v)
	if d.Allowed {
		return nil
	}
	s.metrics.rateLimited.Inc()
	return &problem{
		Status:     fasthttp.StatusTooManyRequests,
		Type:       typeRateLimited,
		Title:      "Too many requests",
		Detail:     "This client has used up its request budget; retry after Retry-After seconds. RateLimit-Policy states the budget.",
		RetryAfter: int(max(1, ceilSeconds(d.RetryAfter))),
	}
}

// ceilSeconds is d in whole seconds, rounded up.
func ceilSeconds(d time.Duration) int64 {
	return int64(math.Ceil(d.Seconds()))
}

// capListener caps the connections it hands out, in total and per client
// address, so that idle or slow connections cannot take all memory or one
// client all connections. A connection over a cap is answered at once with
// a problem+json 503 (total) or 429 (per address) with Retry-After, and
// closed. fasthttp's own caps (Concurrency, MaxConnsPerIP) answer
// text/plain without Retry-After and cannot exempt a trusted proxy, which
// carries many clients over its connections.
type capListener struct {
	net.Listener
	s          *Server
	max, perIP int

	open atomic.Int64
	mu   sync.Mutex
	byIP map[netip.Addr]int
}

func (s *Server) capConns(ln net.Listener) net.Listener {
	if s.opts.MaxConns <= 0 && s.opts.MaxConnsPerIP <= 0 {
		return ln
	}
	return &capListener{Listener: ln, s: s, max: s.opts.MaxConns, perIP: s.opts.MaxConnsPerIP, byIP: map[netip.Addr]int{}}
}

// Accept returns the next connection within the caps, answering and
// closing the ones over them.
func (l *capListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip := netip.Addr{}
		if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
			ip = a.AddrPort().Addr().Unmap()
		}
		if n := l.open.Add(1); l.max > 0 && n > int64(l.max) {
			l.open.Add(-1)
			l.reject(c, "total", connsFull)
			continue
		}
		if l.perIP > 0 && ip.IsValid() && !l.s.trusted(ip) {
			l.mu.Lock()
			n := l.byIP[ip]
			if n >= l.perIP {
				l.mu.Unlock()
				l.open.Add(-1)
				l.reject(c, "per_ip", connsPerIPFull)
				continue
			}
			l.byIP[ip] = n + 1
			l.mu.Unlock()
		} else {
			ip = netip.Addr{} // not counted per address
		}
		l.s.metrics.connsOpen.Inc()
		return &cappedConn{Conn: c, l: l, ip: ip}, nil
	}
}

// Canned answers to connections over a cap: written before the request is
// read (there is no handler to run), so they are whole responses with
// Connection: close.
var (
	connsFull = cannedProblem(fasthttp.StatusServiceUnavailable,
		"The service has as many connections open as it allows; retry later.")
	connsPerIPFull = cannedProblem(fasthttp.StatusTooManyRequests,
		"This client address has as many connections open as the service allows; reuse one or retry later.")
)

func cannedProblem(status int, detail string) []byte {
	body := `{"type":"about:blank","title":"` + fasthttp.StatusMessage(status) +
		`","status":` + strconv.Itoa(status) + `,"detail":"` + detail + `"}`
	return []byte("HTTP/1.1 " + strconv.Itoa(status) + " " + fasthttp.StatusMessage(status) + "\r\n" +
		"Content-Type: application/problem+json\r\n" +
		"Retry-After: 1\r\n" +
		"Connection: close\r\n" +
		"Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body)
}

// rejectWriteTimeout bounds writing a canned answer in the accept loop: it
// fits any socket buffer, so this only matters for a peer already gone.
const rejectWriteTimeout = 10 * time.Millisecond

func (l *capListener) reject(c net.Conn, reason string, answer []byte) {
	l.s.metrics.connsRejected.WithLabelValues(reason).Inc()
	c.SetWriteDeadline(time.Now().Add(rejectWriteTimeout))
	c.Write(answer)
	c.Close()
}

// cappedConn gives its slots back on Close.
type cappedConn struct {
	net.Conn
	l      *capListener
	ip     netip.Addr // counted per address when valid
	closed atomic.Bool
}

func (c *cappedConn) Close() error {
	if c.closed.Swap(true) {
		return c.Conn.Close() // fasthttp closes twice on some paths; count once
	}
	c.l.open.Add(-1)
	c.l.s.metrics.connsOpen.Dec()
	if c.ip.IsValid() {
		c.l.mu.Lock()
		if n := c.l.byIP[c.ip] - 1; n > 0 {
			c.l.byIP[c.ip] = n
		} else {
			delete(c.l.byIP, c.ip)
		}
		c.l.mu.Unlock()
	}
	return c.Conn.Close()
}

// limitMetrics are the collectors of the limits; part of metrics.
func newLimitMetrics(reg prometheus.Registerer) (rateLimited prometheus.Counter, open prometheus.Gauge, rejected *prometheus.CounterVec) {
	rateLimited = register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: "userapi_http_rate_limited_total",
		Help: "Requests refused with 429 because their client was over its rate limit.",
	}))
	open = register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "userapi_http_connections_open",
		Help: "Client connections open now (counted when a connection cap is set).",
	}))
	rejected = register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "userapi_http_connections_rejected_total",
		Help: "Connections refused at accept by a cap: reason total (503) or per_ip (429).",
	}, []string{"reason"}))
	// Both series exist from the start, so rate() over them begins at zero
	// and not at the first refusal.
	rejected.WithLabelValues("total")
	rejected.WithLabelValues("per_ip")
	return
}
