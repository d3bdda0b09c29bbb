package mysql

import (
	"context"
	"database/sql"
)

// Statements are prepared once and kept for the life of the store.
// database/sql prepares a kept statement on each pooled connection the
// first time it runs there and reuses it afterwards, so a call costs one
// round trip (COM_STMT_EXECUTE). Without them every call with arguments is
// prepared, executed and closed: three commands, two waits for the server.
// Placeholders stay server-side parameters either way (interpolateParams
// is off, see config).

// prepared returns the kept statement for query, preparing it on first use.
func (s *Store) prepared(ctx context.Context, query string) (*sql.Stmt, error) {
	if st, ok := s.stmts.Load(query); ok {
		return st.(*sql.Stmt), nil
	}
	st, err := s.db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	if kept, loaded := s.stmts.LoadOrStore(query, st); loaded {
		st.Close() // another call prepared it first
		return kept.(*sql.Stmt), nil
	}
	return st, nil
}

// keepTxStatements keeps the statements transactions use (txStatements).
// inTx calls it before it begins a transaction, until all are kept: in a
// transaction it would take a second connection. It is best effort: a
// statement it cannot prepare (the server is away, or the account may not
// write) is prepared on the transaction's own connection instead, and
// failing there is the transaction's error to report.
func (s *Store) keepTxStatements(ctx context.Context) {
	for _, q := range txStatements {
		if _, err := s.prepared(ctx, q); err != nil {
			return
		}
	}
	s.txKept.Store(true)
}

// stmt returns the kept statement for query, bound to tx when tx is not nil.
// In a transaction, a statement not kept yet is prepared on the
// transaction's connection for that transaction only: keeping it would take
// a second connection while the transaction holds one, and with every
// connection in transactions that wait would never end.
func (s *Store) stmt(ctx context.Context, tx *sql.Tx, query string) (*sql.Stmt, error) {
	if tx == nil {
		return s.prepared(ctx, query)
	}
	if st, ok := s.stmts.Load(query); ok {
		return tx.StmtContext(ctx, st.(*sql.Stmt)), nil
	}
	return tx.PrepareContext(ctx, query)
}

// rowScanner is a *sql.Row, or errRow when preparing failed.
type rowScanner interface{ Scan(dest ...any) error }

type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

// queryRow, query and exec run query as a kept statement, in tx when tx is
// not nil.
func (s *Store) queryRow(ctx context.Context, tx *sql.Tx, query string, args ...any) rowScanner {
	st, err := s.stmt(ctx, tx, query)
	if err != nil {
		return errRow{err}
	}
	return st.QueryRowContext(ctx, args...)
}

func (s *Store) query(ctx context.Context, tx *sql.Tx, query string, args ...any) (*sql.Rows, error) {
	st, err := s.stmt(ctx, tx, query)
	if err != nil {
		return nil, err
	}
	return st.QueryContext(ctx, args...)
}

func (s *Store) exec(ctx context.Context, tx *sql.Tx, query string, args ...any) (sql.Result, error) {
	st, err := s.stmt(ctx, tx, query)
	if err != nil {
		return nil, err
	}
	return st.ExecContext(ctx, args...)
}

// closeStatements closes the kept statements. Close calls it after closing
// the pool, so no call can keep a new one meanwhile.
func (s *Store) closeStatements() {
	s.stmts.Range(func(q, st any) bool {
		st.(*sql.Stmt).Close()
		s.stmts.Delete(q)
		return true
	})
}
