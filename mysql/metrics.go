package mysql

import (
	"database/sql"

	"github.com/prometheus/client_golang/prometheus"

	"userapi/internal/changetable"
	"userapi/internal/sqlstats"
)

// RegisterMetrics registers the userapi_db_pool_* metrics of the
// connection pool on reg, labelled pool="main", and the change stream's
// userapi_change_stream_backlog_rows. It panics if they are
// already registered on reg (a wiring mistake), like prometheus.MustRegister.
func (s *Store) RegisterMetrics(reg prometheus.Registerer) {
	reg.MustRegister(sqlstats.New(map[string]*sql.DB{"main": s.db}), changetable.BacklogGauge(&s.changeBacklog))
}
