package postgres

import (
	"context"
	"math"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// RegisterMetrics registers collectors that export the pool's statistics on
// every scrape: connections in use, idle, open and allowed, and counters of
// acquires, acquires that had to wait for a connection (the pool was empty),
// the time spent waiting, and acquires canceled by their context. In NoPool
// mode there is no pool and nothing is exported. Like prometheus.MustRegister
// it panics when the names are registered already.
func (s *Store) RegisterMetrics(reg prometheus.Registerer) {
	if s.pool == nil {
		return
	}
	reg.MustRegister(&poolCollector{s: s})
	if s.rt != nil {
		reg.MustRegister(&replicaCollector{rt: s.rt})
	}
}

var (
	descAcquired = prometheus.NewDesc("userapi_db_pool_acquired_conns",
		"Connections currently in use.", nil, nil)
	descIdle = prometheus.NewDesc("userapi_db_pool_idle_conns",
		"Connections open and idle in the pool.", nil, nil)
	descTotal = prometheus.NewDesc("userapi_db_pool_total_conns",
		"Connections open (in use, idle, or being opened).", nil, nil)
	descMax = prometheus.NewDesc("userapi_db_pool_max_conns",
		"The pool size limit.", nil, nil)
	descAcquires = prometheus.NewDesc("userapi_db_pool_acquires_total",
		"Connections acquired from the pool.", nil, nil)
	descWaits = prometheus.NewDesc("userapi_db_pool_waits_total",
		"Acquires that had to wait because no connection was idle.", nil, nil)
	descWaitSeconds = prometheus.NewDesc("userapi_db_pool_wait_seconds_total",
		"Time spent in acquires that had to wait for a connection.", nil, nil)
	descAcquireSeconds = prometheus.NewDesc("userapi_db_pool_acquire_duration_seconds_total",
		"Time spent in all successful acquires.", nil, nil)
	descChangeLag = prometheus.NewDesc("userapi_change_stream_lag_bytes",
		"Bytes of WAL between the server's current position and the change stream slot's confirmed position: what the slot retains that no follower has applied.", nil, nil)
	descCanceled = prometheus.NewDesc("userapi_db_pool_canceled_acquires_total",
		"Acquires that ended because their context was canceled or timed out.", nil, nil)
)

// poolCollector reads pgxpool.Stat once per scrape, so all values of one
// scrape come from the same snapshot.
type poolCollector struct {
	s *Store
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descAcquired, descIdle, descTotal, descMax,
		descAcquires, descWaits, descWaitSeconds, descAcquireSeconds, descCanceled, descChangeLag} {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.pool.Stat()
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	counter := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v)
	}
	gauge(descAcquired, float64(st.AcquiredConns()))
	gauge(descIdle, float64(st.IdleConns()))
	gauge(descTotal, float64(st.TotalConns()))
	gauge(descMax, float64(st.MaxConns()))
	counter(descAcquires, float64(st.AcquireCount()))
	counter(descWaits, float64(st.EmptyAcquireCount()))
	counter(descWaitSeconds, st.EmptyAcquireWaitTime().Seconds())
	counter(descAcquireSeconds, st.AcquireDuration().Seconds())
	counter(descCanceled, float64(st.CanceledAcquireCount()))
	// 0 where no change stream is followed; nothing when the server
	// cannot tell.
	if slot := c.s.followed.Load(); slot == nil {
		gauge(descChangeLag, 0)
	} else if lag, err := c.s.slotLag(*slot); err == nil {
		gauge(descChangeLag, float64(lag))
	}
}

var (
	descReplicaLagBytes = prometheus.NewDesc("userapi_db_replica_lag_bytes",
		"Bytes of WAL between the primary's flush position and the replica's replay position, as last polled.", []string{"replica"}, nil)
	descReplicaLagSeconds = prometheus.NewDesc("userapi_db_replica_lag_seconds",
		"How long ago the primary was last at or before the replica's replay position (0 when caught up; 3600 until first polled).", []string{"replica"}, nil)
	descReplicaUp = prometheus.NewDesc("userapi_db_replica_up",
		"1 when the replica answered its poll in the last 100 ms (at most the lag bound) and its lag is within the bound (it may serve reads).", []string{"replica"}, nil)
	descReads = prometheus.NewDesc("userapi_db_reads_total",
		"Reads that may go to a replica (the cache's batched loads, lists), by the server that served them.", []string{"role", "replica"}, nil)
	descFallbacks = prometheus.NewDesc("userapi_db_replica_fallbacks_total",
		"Reads that could have gone to a replica and went to the primary, by reason: behind (no replica had replayed what the read needs), lagging (every replica past the lag bound or unreachable), failed (the replica's read failed), asked (the caller asked for the primary).", []string{"reason"}, nil)
	descPollErrors = prometheus.NewDesc("userapi_db_replica_poll_errors_total",
		"Failed polls of the replicas' replay positions and the primary's WAL position.", nil, nil)
)

// replicaCollector exports the replicas' lag and where routable reads went.
type replicaCollector struct {
	rt *routing
}

func (c *replicaCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descReplicaLagBytes, descReplicaLagSeconds, descReplicaUp, descReads, descFallbacks, descPollErrors} {
		ch <- d
	}
}

func (c *replicaCollector) Collect(ch chan<- prometheus.Metric) {
	rt := c.rt
	now := time.Now().UnixNano()
	for _, r := range rt.replicas {
		ch <- prometheus.MustNewConstMetric(descReplicaLagBytes, prometheus.GaugeValue, float64(r.lagBytes.Load()), r.addr)
		lag := time.Duration(r.lagNanos.Load()).Seconds()
		if r.lagNanos.Load() == int64(lagUnknown) {
			lag = math.Inf(1)
		}
		ch <- prometheus.MustNewConstMetric(descReplicaLagSeconds, prometheus.GaugeValue, lag, r.addr)
		up := 0.0
		if rt.usable(r, now) {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(descReplicaUp, prometheus.GaugeValue, up, r.addr)
		ch <- prometheus.MustNewConstMetric(descReads, prometheus.CounterValue, float64(r.reads.Load()), "replica", r.addr)
	}
	ch <- prometheus.MustNewConstMetric(descReads, prometheus.CounterValue, float64(rt.primaryReads.Load()), "primary", "")
	for i, reason := range fallbackReasons {
		ch <- prometheus.MustNewConstMetric(descFallbacks, prometheus.CounterValue, float64(rt.fallbacks[i].Load()), reason)
	}
	ch <- prometheus.MustNewConstMetric(descPollErrors, prometheus.CounterValue, float64(rt.pollErrors.Load()))
}

// slotLag is the WAL between the server's current position and what the
// slot's follower has confirmed. It is read from the server, not from the
// stream, so it also grows while no instance leads (all of them down, or
// failing to apply), which is when the slot's retained WAL fills the disk.
func (s *Store) slotLag(slot string) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var lag int64
	err := s.pool.QueryRow(ctx, `
SELECT coalesce(pg_current_wal_lsn() - confirmed_flush_lsn, 0)::bigint
FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&lag)
	return lag, err
}
