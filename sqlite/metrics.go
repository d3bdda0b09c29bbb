package sqlite

import (
	"database/sql"

	"github.com/prometheus/client_golang/prometheus"
)

// RegisterMetrics registers gauges and counters of both connection pools on
// reg, read from sql.DBStats at scrape time and labelled pool="writer" or
// pool="reader". The names are those of the PostgreSQL store, so one
// dashboard serves every backend. It panics if they are already registered on reg (a wiring
// mistake), like prometheus.MustRegister.
func (s *Store) RegisterMetrics(reg prometheus.Registerer) {
	reg.MustRegister(newPoolCollector(map[string]*sql.DB{
		"writer": s.writer,
		"reader": s.reader,
	}))
}

// poolCollector reports sql.DBStats of named pools.
type poolCollector struct {
	pools    map[string]*sql.DB
	inUse    *prometheus.Desc
	idle     *prometheus.Desc
	open     *prometheus.Desc
	max      *prometheus.Desc
	waits    *prometheus.Desc
	waitTime *prometheus.Desc
}

func newPoolCollector(pools map[string]*sql.DB) *poolCollector {
	desc := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc("userapi_db_pool_"+name, help, []string{"pool"}, nil)
	}
	return &poolCollector{
		pools:    pools,
		inUse:    desc("acquired_conns", "Connections in use by a query or transaction."),
		idle:     desc("idle_conns", "Open connections that are idle."),
		open:     desc("total_conns", "Open connections, in use and idle."),
		max:      desc("max_conns", "Maximum number of open connections."),
		waits:    desc("waits_total", "Times a caller waited for a free connection."),
		waitTime: desc("wait_seconds_total", "Total time callers waited for a free connection."),
	}
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.inUse
	ch <- c.idle
	ch <- c.open
	ch <- c.max
	ch <- c.waits
	ch <- c.waitTime
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	for name, db := range c.pools {
		st := db.Stats()
		ch <- prometheus.MustNewConstMetric(c.inUse, prometheus.GaugeValue, float64(st.InUse), name)
		ch <- prometheus.MustNewConstMetric(c.idle, prometheus.GaugeValue, float64(st.Idle), name)
		ch <- prometheus.MustNewConstMetric(c.open, prometheus.GaugeValue, float64(st.OpenConnections), name)
		ch <- prometheus.MustNewConstMetric(c.max, prometheus.GaugeValue, float64(st.MaxOpenConnections), name)
		ch <- prometheus.MustNewConstMetric(c.waits, prometheus.CounterValue, float64(st.WaitCount), name)
		ch <- prometheus.MustNewConstMetric(c.waitTime, prometheus.CounterValue, st.WaitDuration.Seconds(), name)
	}
}
