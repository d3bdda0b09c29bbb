package mysql

import (
	"context"
	"database/sql"
	"fmt"
	"strconv"
	"time"

	"github.com/go-sql-driver/mysql"

	"userapi"
	"userapi/internal/changetable"
)

var _ userapi.ChangeFeed = (*Store)(nil)

// The change stream is the user_changes table that the triggers of
// migration 00002_user_changes.sql write, followed by internal/changetable:
// one instance at a time leads, reads the oldest rows, applies them and
// deletes exactly those. docs/stores.md describes it.

// leaseRetry is how often a follower asks for the lead while another one
// holds it. The lead is a named lock (GET_LOCK): MariaDB grants it to one
// session at a time and frees it as soon as that session ends, so a standby
// takes over within this interval of a crash the server notices (a closed
// socket). Asking again rather than waiting in GET_LOCK gives a leader
// whose apply failed (Redis timed out, say) the time of its own retry to
// lead again, as the PostgreSQL stream's slot does, instead of moving the
// lead at every hiccup.
const leaseRetry = 250 * time.Millisecond

// leaderIdle is the wait_timeout of the follower's session: the server ends
// a session idle this long and frees its lock. A leader reads every 25 ms,
// so only a leader cut off without a closed socket (a network partition, a
// frozen host) stays idle that long: a standby takes over within this
// bound, where MariaDB's default (8 hours) would leave the lead stuck.
const leaderIdle = 10 * time.Second

// changeTriggers are the triggers the change stream depends on.
var changeTriggers = []string{"users_move_version", "users_changes_insert", "users_changes_update", "users_changes_delete"}

// FollowChanges implements userapi.ChangeFeed by following the user_changes
// table. It waits for the lead (GET_LOCK on a connection of its own) and
// then reads the table until ctx ends or something fails. It fails at once
// when the triggers that write the table are missing.
func (s *Store) FollowChanges(ctx context.Context, apply func(context.Context, []userapi.Change) error, missed func(context.Context) error) error {
	if err := s.CheckChangeFeed(ctx); err != nil {
		return err
	}
	conn, done, err := s.lead(ctx)
	if err != nil {
		return err
	}
	defer done()
	t := &changeTable{conn: conn, timeout: s.timeout, stmts: map[string]*sql.Stmt{}}
	return changetable.Follow(ctx, t, &s.changeBacklog, apply, missed)
}

// CheckChangeFeed reports whether FollowChanges can run: an error, with the
// fix in its text, when the triggers are missing.
func (s *Store) CheckChangeFeed(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	if err := checkTriggers(ctx, s.db); err != nil {
		return fmt.Errorf("change stream: %w", err)
	}
	return nil
}

func checkTriggers(ctx context.Context, db interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}) error {
	var n int
	err := db.QueryRowContext(ctx, `
		SELECT
			COUNT(*)
		FROM information_schema.TRIGGERS
		WHERE TRIGGER_SCHEMA = DATABASE()
			AND EVENT_OBJECT_TABLE = 'users'
			AND TRIGGER_NAME IN (?, ?, ?, ?)`,
		changeTriggers[0], changeTriggers[1], changeTriggers[2], changeTriggers[3]).Scan(&n)
	if err != nil {
		return translate(err)
	}
	if n < len(changeTriggers) {
		return fmt.Errorf("%d of the triggers %v on users are missing: re-create them as migration 00002_user_changes.sql does", len(changeTriggers)-n, changeTriggers)
	}
	return nil
}

// lockName is the GET_LOCK name of the database's change stream. Named
// locks belong to the whole server, so it names the database; MariaDB
// allows 64 characters.
func lockName(db string) string {
	n := "userapi_changes." + db
	return n[:min(len(n), 64)]
}

// lead opens a connection of its own (outside the pool, whose connections
// come and go) and returns it once it holds the lead; done closes it, which
// frees the lock.
func (s *Store) lead(ctx context.Context) (*sql.Conn, func(), error) {
	connector, err := mysql.NewConnector(s.cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("change stream: %w", err)
	}
	db := sql.OpenDB(connector)
	db.SetMaxOpenConns(1)
	conn, err := db.Conn(ctx)
	if err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("change stream: connect: %w", translate(err))
	}
	done := func() {
		conn.Close()
		db.Close()
	}
	fail := func(err error) (*sql.Conn, func(), error) {
		done()
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		return nil, nil, fmt.Errorf("change stream: %w", translate(err))
	}
	// READ COMMITTED: deletes lock only the rows they delete, never the
	// gaps where writers insert. NO_AUTO_VALUE_ON_ZERO lets the marker be
	// inserted as seq 0.
	for _, q := range []string{
		"SET SESSION wait_timeout = " + strconv.Itoa(int(leaderIdle/time.Second)),
		"SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
		"SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',NO_AUTO_VALUE_ON_ZERO')",
	} {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			return fail(err)
		}
	}
	for {
		var got sql.NullInt64
		err := conn.QueryRowContext(ctx, `SELECT GET_LOCK(?, 0)`, lockName(s.cfg.DBName)).Scan(&got)
		if err != nil {
			return fail(err)
		}
		if got.Int64 == 1 {
			return conn, done, nil
		}
		select {
		case <-ctx.Done():
			done()
			return nil, nil, ctx.Err()
		case <-time.After(leaseRetry):
		}
	}
}

// changeTable is the MySQL dialect of changetable.Table, on the leader's
// connection. Each statement runs on its own (autocommit), so each sees
// every row committed before it.
type changeTable struct {
	conn    *sql.Conn
	timeout time.Duration
	stmts   map[string]*sql.Stmt // prepared on conn, which only Follow's goroutine uses
}

func (t *changeTable) stmt(ctx context.Context, query string) (*sql.Stmt, error) {
	if st, ok := t.stmts[query]; ok {
		return st, nil
	}
	st, err := t.conn.PrepareContext(ctx, query)
	if err != nil {
		return nil, translate(err)
	}
	t.stmts[query] = st
	return st, nil
}

func (t *changeTable) exec(ctx context.Context, timeout time.Duration, query string, args ...any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	st, err := t.stmt(ctx, query)
	if err != nil {
		return err
	}
	_, err = st.ExecContext(ctx, args...)
	return translate(err)
}

func (t *changeTable) Oldest(ctx context.Context, n int) ([]changetable.Row, error) {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	st, err := t.stmt(ctx, `
		SELECT
			seq,
			user_id,
			version,
			changed_at
		FROM user_changes
		ORDER BY seq
		LIMIT ?`)
	if err != nil {
		return nil, err
	}
	rows, err := st.QueryContext(ctx, n)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []changetable.Row
	for rows.Next() {
		var r changetable.Row
		if err := rows.Scan(&r.Seq, &r.Change.ID, &r.Change.Version, &r.Change.Committed); err != nil {
			return nil, translate(err)
		}
		r.Change.Deleted = r.Change.Version == 0
		out = append(out, r)
	}
	return out, translate(rows.Err())
}

func (t *changeTable) Count(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, ioTimeout)
	defer cancel()
	var n int64
	err := t.conn.QueryRowContext(ctx, `
		SELECT
			COUNT(*)
		FROM user_changes
		WHERE seq > 0`).Scan(&n)
	return n, translate(err)
}

func (t *changeTable) Seqs(ctx context.Context, each func(int64)) error {
	ctx, cancel := context.WithTimeout(ctx, ioTimeout)
	defer cancel()
	rows, err := t.conn.QueryContext(ctx, `
		SELECT
			seq
		FROM user_changes
		WHERE seq > 0
		ORDER BY seq`)
	if err != nil {
		return translate(err)
	}
	defer rows.Close()
	for rows.Next() {
		var seq int64
		if err := rows.Scan(&seq); err != nil {
			return translate(err)
		}
		each(seq)
	}
	return translate(rows.Err())
}

// Delete stops after the run's rows (LIMIT): a range scan would otherwise
// go on to lock the next row, and the next row after a run is often one an
// open transaction has just inserted (that is why the run ended there),
// so the delete would wait for that transaction.
func (t *changeTable) Delete(ctx context.Context, r changetable.Run) error {
	return t.exec(ctx, ioTimeout, `
		DELETE FROM user_changes
		WHERE seq BETWEEN ? AND ?
		ORDER BY seq
		LIMIT ?`, r.Lo, r.Hi, r.Hi-r.Lo+1)
}

func (t *changeTable) AddMarker(ctx context.Context) error {
	return t.exec(ctx, t.timeout, `
		INSERT IGNORE INTO user_changes (
			seq,
			user_id,
			version,
			changed_at
		) VALUES (0, 0, 0, UTC_TIMESTAMP(6))`)
}

func (t *changeTable) DropMarker(ctx context.Context) error {
	return t.exec(ctx, t.timeout, `
		DELETE FROM user_changes
		WHERE seq = 0`)
}

func (t *changeTable) CheckTriggers(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	return checkTriggers(ctx, t.conn)
}
