package http

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttpadaptor"
)

// metrics are the userapi_http_* collectors.
type metrics struct {
	requests *prometheus.CounterVec   // route, method, status
	duration *prometheus.HistogramVec // route, method
	inFlight prometheus.Gauge

	rateLimited   prometheus.Counter
	connsOpen     prometheus.Gauge
	connsRejected *prometheus.CounterVec // reason
}

// durationBuckets span a local-cache hit (tens of µs) to a request that
// hits the deadline (seconds).
var durationBuckets = []float64{
	0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "userapi_http_requests_total",
			Help: "HTTP requests answered, by route template, method and status code.",
		}, []string{"route", "method", "status"})),
		duration: register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "userapi_http_request_duration_seconds",
			Help:    "Time from reading a request to handing its response to the connection, by route template and method.",
			Buckets: durationBuckets,
		}, []string{"route", "method"})),
		inFlight: register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "userapi_http_requests_in_flight",
			Help: "Requests being handled now.",
		})),
	}
	m.rateLimited, m.connsOpen, m.connsRejected = newLimitMetrics(reg)
	return m
}

// register registers c, or returns the equal collector already registered
// (several Servers may share one registry, as tests do).
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic("http: register metrics: " + err.Error())
	}
	return c
}

// knownStatuses are the codes the service answers with. Their counters are
// resolved once per route and method and then reused, so counting a
// request does not allocate; other codes take the slower labelled lookup.
var knownStatuses = [...]int{200, 201, 204, 304, 400, 404, 405, 408, 409, 412, 413, 415, 422, 429, 431, 500, 503}

func statusIndex(code int) int {
	for i, c := range knownStatuses {
		if c == code {
			return i
		}
	}
	return -1
}

// routeMetrics holds one route and method's children of the vectors,
// resolved on first use so that combinations never requested do not show
// up as zero series.
type routeMetrics struct {
	route, method string
	m             *metrics
	duration      atomic.Pointer[prometheus.Observer]
	counts        [len(knownStatuses)]atomic.Pointer[prometheus.Counter]
}

func (m *metrics) route(route, method string) *routeMetrics {
	return &routeMetrics{route: route, method: method, m: m}
}

func (r *routeMetrics) observe(status int, elapsed time.Duration) {
	o := r.duration.Load()
	if o == nil {
		h := r.m.duration.WithLabelValues(r.route, r.method)
		o = &h
		r.duration.Store(o) // a racing store holds the same child
	}
	(*o).Observe(elapsed.Seconds())

	i := statusIndex(status)
	if i < 0 {
		r.m.requests.WithLabelValues(r.route, r.method, strconv.Itoa(status)).Inc()
		return
	}
	c := r.counts[i].Load()
	if c == nil {
		cc := r.m.requests.WithLabelValues(r.route, r.method, strconv.Itoa(status))
		c = &cc
		r.counts[i].Store(c)
	}
	(*c).Inc()
}

// promMetrics serves Options.Metrics in the Prometheus text format (or
// protobuf when asked). promhttp does its own gzip.
func (s *Server) promMetrics() handlerFunc {
	h := fasthttpadaptor.NewFastHTTPHandler(promhttp.HandlerFor(s.opts.Metrics, promhttp.HandlerOpts{
		ErrorLog:      slogPrinter{s},
		ErrorHandling: promhttp.ContinueOnError,
	}))
	return func(rc *fasthttp.RequestCtx, _ context.Context) error {
		h(rc)
		return nil
	}
}

// slogPrinter adapts promhttp's error log to slog.
type slogPrinter struct{ s *Server }

func (p slogPrinter) Println(v ...any) {
	p.s.log.Warn("metrics gathering", "err", fmt.Sprint(v...))
}
