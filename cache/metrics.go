package cache

import (
	"github.com/prometheus/client_golang/prometheus"

	"userapi/internal/panics"
)

// metrics are the cache's collectors, resolved to plain counters up front so
// the hot path does no label lookups.
type metrics struct {
	lookups *prometheus.CounterVec
	fills   *prometheus.CounterVec

	localHit, localNegHit, localMiss, localBypass           prometheus.Counter
	redisHit, redisNegHit, redisMiss, redisError, redisSkip prometheus.Counter

	fillLocalInstalled, fillLocalStale, fillLocalUnchanged, fillLocalSkipped prometheus.Counter
	fillRedisInstalled, fillRedisStale, fillRedisUnchanged, fillRedisSkipped prometheus.Counter
	fillLate                                                                 prometheus.Counter

	coalesced         prometheus.Counter
	batchSize         prometheus.Histogram
	loads, loadErrors prometheus.Counter

	breakerState prometheus.Gauge
	channelUp    prometheus.Gauge

	invSent, invReceived, invFailed prometheus.Counter
	intentsSent, intentsReceived    prometheus.Counter

	changesApplied, changesMissed prometheus.Counter
	changesInterrupted            prometheus.Counter
	changeLag                     prometheus.Histogram

	replicaRereads prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "userapi_cache_lookups_total",
			Help: "Cache lookups by tier and result: hit, negative_hit (a cached absence), miss, error, or bypass/skip (tier not usable: local while the notice channel is down or for a read with a session token, redis while unhealthy or the id has an invalidation pending).",
		}, []string{"tier", "result"}),
		fills: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "userapi_cache_fills_total",
			Help: "Version-guarded fills by tier and result: installed, stale (rejected: the tier holds a newer version or a write's tombstone or intent), unchanged, skipped (tier unusable or the channel epoch changed), late (the read was too old to fill).",
		}, []string{"tier", "result"}),
		coalesced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_cache_coalesced_waiters_total",
			Help: "Misses that joined a load of the same id already in flight instead of querying the database.",
		}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "userapi_cache_batch_size",
			Help:    "Ids per database load (store.GetUsers) of the loader.",
			Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128, 256, 512},
		}),
		loads: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_cache_loads_total",
			Help: "Database loads (store.GetUsers calls) made by the loader.",
		}),
		loadErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_cache_load_errors_total",
			Help: "Database loads of the loader that failed.",
		}),
		breakerState: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "userapi_cache_redis_breaker_state",
			Help: "Redis circuit breaker: 0 closed (Redis in use), 1 half-open, 2 open (failing open to the database).",
		}),
		channelUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "userapi_cache_notice_channel_up",
			Help: "1 while the invalidation channel is subscribed and our heartbeats come back; while 0 the local tier is bypassed.",
		}),
		invSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_cache_invalidations_sent_total",
			Help: "Write invalidations applied to Redis (tombstone and notice).",
		}),
		invReceived: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_cache_invalidations_received_total",
			Help: "Invalidation notices received on the channel (including our own).",
		}),
		invFailed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_cache_invalidations_failed_total",
			Help: "Write invalidations that Redis did not take at once; they are remembered and applied before Redis is read again.",
		}),
		changesApplied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_change_stream_applied_total",
			Help: "Committed changes from the database's change stream applied to every tier (by the instance leading the stream).",
		}),
		changesMissed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_change_stream_missed_total",
			Help: "Times the change stream may have lost changes (a new slot, a truncate, a pruned change table) and every tier started afresh.",
		}),
		changesInterrupted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_change_stream_interruptions_total",
			Help: "Times following the change stream failed (an apply Redis did not take, a database error) and was retried; the lead may pass to another instance meanwhile.",
		}),
		changeLag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "userapi_change_stream_lag_seconds",
			Help:    "From a change's commit (the database's clock) to its invalidation applied in every tier.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}),
		intentsSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_cache_intents_sent_total",
			Help: "Write intents applied to Redis (intent and notice) before an update or delete went to the database.",
		}),
		replicaRereads: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_cache_replica_rereads_total",
			Help: "Rows a replica answered for the loader that were older than a version the tiers knew of (a write acknowledged elsewhere), read again from the primary.",
		}),
		intentsReceived: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "userapi_cache_intents_received_total",
			Help: "Write intent notices received on the channel (including our own).",
		}),
	}
	l, r := "local", "redis"
	m.localHit = m.lookups.WithLabelValues(l, "hit")
	m.localNegHit = m.lookups.WithLabelValues(l, "negative_hit")
	m.localMiss = m.lookups.WithLabelValues(l, "miss")
	m.localBypass = m.lookups.WithLabelValues(l, "bypass")
	m.redisHit = m.lookups.WithLabelValues(r, "hit")
	m.redisNegHit = m.lookups.WithLabelValues(r, "negative_hit")
	m.redisMiss = m.lookups.WithLabelValues(r, "miss")
	m.redisError = m.lookups.WithLabelValues(r, "error")
	m.redisSkip = m.lookups.WithLabelValues(r, "skip")
	m.fillLocalInstalled = m.fills.WithLabelValues(l, "installed")
	m.fillLocalStale = m.fills.WithLabelValues(l, "stale")
	m.fillLocalUnchanged = m.fills.WithLabelValues(l, "unchanged")
	m.fillLocalSkipped = m.fills.WithLabelValues(l, "skipped")
	m.fillRedisInstalled = m.fills.WithLabelValues(r, "installed")
	m.fillRedisStale = m.fills.WithLabelValues(r, "stale")
	m.fillRedisUnchanged = m.fills.WithLabelValues(r, "unchanged")
	m.fillRedisSkipped = m.fills.WithLabelValues(r, "skipped")
	m.fillLate = m.fills.WithLabelValues("any", "late")
	return m
}

// register adds the collectors, and gauges read from s, to reg (if any).
func (m *metrics) register(s *Store, reg prometheus.Registerer) {
	if reg == nil {
		return
	}
	reg.MustRegister(m.lookups, m.fills, m.coalesced, m.batchSize, m.loads, m.loadErrors,
		m.invSent, m.invReceived, m.invFailed, m.intentsSent, m.intentsReceived,
		m.changesApplied, m.changesMissed, m.changesInterrupted, m.changeLag)
	if s.loader != nil && s.loader.replicas {
		reg.MustRegister(m.replicaRereads)
	}
	// The cache starts the service's background goroutines (panics.Loop).
	if err := panics.Register(reg); err != nil {
		panic(err)
	}
	if s.redis != nil {
		reg.MustRegister(m.breakerState, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "userapi_cache_invalidations_pending",
			Help: "Invalidations waiting for Redis to come back.",
		}, func() float64 { return float64(s.redis.npending.Load()) }))
	}
	if s.redis != nil && s.local != nil {
		reg.MustRegister(m.channelUp)
	}
	if s.local != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "userapi_cache_local_bytes",
			Help: "Weight of the local tier's entries (JSON plus per-entry overhead), bounded by the configured budget.",
		}, func() float64 { return float64(s.local.bytes()) }))
	}
}
