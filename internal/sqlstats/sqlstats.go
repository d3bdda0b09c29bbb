// Package sqlstats exports the sql.DBStats of database/sql pools (the MySQL
// and SQLite stores) as Prometheus metrics, under the userapi_db_pool_*
// names the PostgreSQL store uses too, so one dashboard serves every
// backend. Values are read from the pools at scrape time.
package sqlstats

import (
	"database/sql"

	"github.com/prometheus/client_golang/prometheus"
)

// Collector reports the stats of named pools, labelled pool="<name>".
type Collector struct {
	pools    map[string]*sql.DB
	inUse    *prometheus.Desc
	idle     *prometheus.Desc
	open     *prometheus.Desc
	max      *prometheus.Desc
	waits    *prometheus.Desc
	waitTime *prometheus.Desc
	closed   *prometheus.Desc
}

// New returns a collector of pools, keyed by the pool label's value.
func New(pools map[string]*sql.DB) *Collector {
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("userapi_db_pool_"+name, help, append([]string{"pool"}, labels...), nil)
	}
	return &Collector{
		pools:    pools,
		inUse:    desc("acquired_conns", "Connections in use by a query or transaction."),
		idle:     desc("idle_conns", "Open connections that are idle."),
		open:     desc("total_conns", "Open connections, in use and idle."),
		max:      desc("max_conns", "Maximum number of open connections (pool size)."),
		waits:    desc("waits_total", "Times a caller waited for a free connection."),
		waitTime: desc("wait_seconds_total", "Total time callers waited for a free connection."),
		closed:   desc("closed_total", "Connections closed by the pool, by reason.", "reason"),
	}
}

func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.inUse
	ch <- c.idle
	ch <- c.open
	ch <- c.max
	ch <- c.waits
	ch <- c.waitTime
	ch <- c.closed
}

func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	for name, db := range c.pools {
		st := db.Stats()
		gauge(c.inUse, float64(st.InUse), name)
		gauge(c.idle, float64(st.Idle), name)
		gauge(c.open, float64(st.OpenConnections), name)
		gauge(c.max, float64(st.MaxOpenConnections), name)
		counter(c.waits, float64(st.WaitCount), name)
		counter(c.waitTime, st.WaitDuration.Seconds(), name)
		counter(c.closed, float64(st.MaxIdleClosed), name, "max_idle")
		counter(c.closed, float64(st.MaxIdleTimeClosed), name, "max_idle_time")
		counter(c.closed, float64(st.MaxLifetimeClosed), name, "max_lifetime")
	}
}
