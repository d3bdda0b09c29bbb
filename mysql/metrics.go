package mysql

import (
	"database/sql"

	"github.com/prometheus/client_golang/prometheus"
)

// RegisterMetrics registers the pool's statistics (database/sql DBStats,
// read at each scrape) on reg as userapi_db_pool_* metrics. Like
// prometheus.MustRegister it panics when they are already registered on
// reg, a wiring mistake.
func (s *Store) RegisterMetrics(reg prometheus.Registerer) {
	reg.MustRegister(newPoolCollector(s.db))
}

// poolCollector exports sql.DBStats. A collector rather than gauges updated
// by a ticker: the numbers are exact at scrape time and nothing runs
// between scrapes.
type poolCollector struct {
	db        *sql.DB
	maxOpen   *prometheus.Desc
	open      *prometheus.Desc
	inUse     *prometheus.Desc
	idle      *prometheus.Desc
	waits     *prometheus.Desc
	waitTime  *prometheus.Desc
	closedFor *prometheus.Desc
}

func newPoolCollector(db *sql.DB) *poolCollector {
	return &poolCollector{
		db: db,
		maxOpen: prometheus.NewDesc("userapi_db_pool_max_conns",
			"Maximum number of open database connections (pool size).", nil, nil),
		open: prometheus.NewDesc("userapi_db_pool_total_conns",
			"Open database connections, in use or idle.", nil, nil),
		inUse: prometheus.NewDesc("userapi_db_pool_acquired_conns",
			"Database connections in use by a call.", nil, nil),
		idle: prometheus.NewDesc("userapi_db_pool_idle_conns",
			"Idle database connections kept in the pool.", nil, nil),
		waits: prometheus.NewDesc("userapi_db_pool_waits_total",
			"Calls that had to wait for a free database connection.", nil, nil),
		waitTime: prometheus.NewDesc("userapi_db_pool_wait_seconds_total",
			"Total time calls waited for a free database connection.", nil, nil),
		closedFor: prometheus.NewDesc("userapi_db_pool_closed_total",
			"Database connections closed by the pool, by reason.", []string{"reason"}, nil),
	}
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.maxOpen
	ch <- c.open
	ch <- c.inUse
	ch <- c.idle
	ch <- c.waits
	ch <- c.waitTime
	ch <- c.closedFor
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.db.Stats()
	ch <- prometheus.MustNewConstMetric(c.maxOpen, prometheus.GaugeValue, float64(st.MaxOpenConnections))
	ch <- prometheus.MustNewConstMetric(c.open, prometheus.GaugeValue, float64(st.OpenConnections))
	ch <- prometheus.MustNewConstMetric(c.inUse, prometheus.GaugeValue, float64(st.InUse))
	ch <- prometheus.MustNewConstMetric(c.idle, prometheus.GaugeValue, float64(st.Idle))
	ch <- prometheus.MustNewConstMetric(c.waits, prometheus.CounterValue, float64(st.WaitCount))
	ch <- prometheus.MustNewConstMetric(c.waitTime, prometheus.CounterValue, st.WaitDuration.Seconds())
	ch <- prometheus.MustNewConstMetric(c.closedFor, prometheus.CounterValue, float64(st.MaxIdleClosed), "max_idle")
	ch <- prometheus.MustNewConstMetric(c.closedFor, prometheus.CounterValue, float64(st.MaxIdleTimeClosed), "max_idle_time")
	ch <- prometheus.MustNewConstMetric(c.closedFor, prometheus.CounterValue, float64(st.MaxLifetimeClosed), "max_lifetime")
}
