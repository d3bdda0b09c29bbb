package sqlite

import (
	"database/sql"

	"github.com/prometheus/client_golang/prometheus"

	"userapi/internal/changetable"
	"userapi/internal/sqlstats"
)

// RegisterMetrics registers the userapi_db_pool_* metrics of both
// connection pools on reg, labelled pool="writer" or pool="reader", and the
// change stream's userapi_change_stream_backlog_rows. It
// panics if they are already registered on reg (a wiring mistake), like
// prometheus.MustRegister.
func (s *Store) RegisterMetrics(reg prometheus.Registerer) {
	reg.MustRegister(sqlstats.New(map[string]*sql.DB{
		"writer": s.writer,
		"reader": s.reader,
	}), changetable.BacklogGauge(&s.changeBacklog))
}
