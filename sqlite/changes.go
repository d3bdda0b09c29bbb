package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"userapi"
	"userapi/internal/changetable"
)

var _ userapi.ChangeFeed = (*Store)(nil)

// The change stream is the user_changes table that the triggers of
// migration 00002_user_changes.sql write, followed by internal/changetable:
// one process at a time leads, reads the oldest rows, applies them and
// deletes exactly those. docs/stores.md describes it.
//
// SQLite lets one writer commit at a time, so here sequence numbers are
// assigned in commit order and a late commit below a read row cannot
// happen; the shared loop does not depend on it either way.

// leaseRetry is how often a follower asks for the lead while another holds
// it. The lead is an exclusive flock(2) on a lock file beside the database
// (lockPath): the kernel frees it when the leader closes the file or its
// process dies, however it dies, so a standby takes over within this
// interval. flock, unlike the POSIX locks SQLite itself uses, also excludes
// a second follower in the same process. Like SQLite's own locking it needs
// a local file system.
const leaseRetry = 250 * time.Millisecond

// changeTriggers are the triggers the change stream depends on.
var changeTriggers = []string{"users_move_version", "users_changes_insert", "users_changes_update", "users_changes_delete"}

// lockPath is the lead's lock file.
func (s *Store) lockPath() string { return s.path + "-changes.lock" }

// FollowChanges implements userapi.ChangeFeed by following the user_changes
// table. It waits for the lead (a lock file beside the database) and then
// reads the table until ctx ends or something fails. It fails at once when
// the triggers that write the table are missing.
func (s *Store) FollowChanges(ctx context.Context, apply func(context.Context, []userapi.Change) error, missed func(context.Context) error) error {
	if err := s.CheckChangeFeed(ctx); err != nil {
		return err
	}
	done, err := s.lead(ctx)
	if err != nil {
		return err
	}
	defer done()
	return changetable.Follow(ctx, &changeTable{s: s}, &s.changeBacklog, apply, missed)
}

// CheckChangeFeed reports whether FollowChanges can run: an error, with the
// fix in its text, when the triggers are missing.
func (s *Store) CheckChangeFeed(ctx context.Context) error {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	if err := checkTriggers(ctx, s.reader); err != nil {
		return fmt.Errorf("change stream: %w", err)
	}
	return nil
}

func checkTriggers(ctx context.Context, db *sql.DB) error {
	var n int
	err := db.QueryRowContext(ctx, `
		SELECT
			count(*)
		FROM sqlite_schema
		WHERE type = 'trigger'
			AND tbl_name = 'users'
			AND name IN (?, ?, ?, ?)`,
		changeTriggers[0], changeTriggers[1], changeTriggers[2], changeTriggers[3]).Scan(&n)
	if err != nil {
		return translate(ctx, err)
	}
	if n < len(changeTriggers) {
		return fmt.Errorf("%d of the triggers %v on users are missing: re-create them as migration 00002_user_changes.sql does", len(changeTriggers)-n, changeTriggers)
	}
	return nil
}

// lead returns once this follower holds the lead; done releases it.
func (s *Store) lead(ctx context.Context) (done func(), err error) {
	// 0640: the file holds nothing, but sits beside one that does.
	f, err := os.OpenFile(s.lockPath(), os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("change stream: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing the file releases the lock
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("change stream: lock %s: %w", s.lockPath(), err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(leaseRetry):
		}
	}
}

// changeTable is the SQLite dialect of changetable.Table: reads on the
// read-only pool (each statement a transaction of its own, which sees every
// commit before it), deletes on the writer.
type changeTable struct {
	s *Store
}

func (t *changeTable) Oldest(ctx context.Context, n int) ([]changetable.Row, error) {
	ctx, cancel := t.s.withTimeout(ctx)
	defer cancel()
	rows, err := t.s.reader.QueryContext(ctx, `
		SELECT
			seq,
			user_id,
			version,
			changed_at
		FROM user_changes
		ORDER BY seq
		LIMIT ?`, n)
	if err != nil {
		return nil, translate(ctx, err)
	}
	defer rows.Close()
	var out []changetable.Row
	for rows.Next() {
		var r changetable.Row
		var at int64
		if err := rows.Scan(&r.Seq, &r.Change.ID, &r.Change.Version, &at); err != nil {
			return nil, translate(ctx, err)
		}
		r.Change.Deleted = r.Change.Version == 0
		r.Change.Committed = time.UnixMicro(at).UTC()
		out = append(out, r)
	}
	return out, translate(ctx, rows.Err())
}

func (t *changeTable) Count(ctx context.Context) (int64, error) {
	ctx, cancel := t.s.withTimeout(ctx)
	defer cancel()
	var n int64
	err := t.s.reader.QueryRowContext(ctx, `
		SELECT
			count(*)
		FROM user_changes
		WHERE seq > 0`).Scan(&n)
	return n, translate(ctx, err)
}

// Seqs is bounded by busyTimeout rather than the per-call timeout: it
// reads the whole backlog of a mass change.
func (t *changeTable) Seqs(ctx context.Context, each func(int64)) error {
	ctx, cancel := context.WithTimeout(ctx, busyTimeout)
	defer cancel()
	rows, err := t.s.reader.QueryContext(ctx, `
		SELECT
			seq
		FROM user_changes
		WHERE seq > 0
		ORDER BY seq`)
	if err != nil {
		return translate(ctx, err)
	}
	defer rows.Close()
	for rows.Next() {
		var seq int64
		if err := rows.Scan(&seq); err != nil {
			return translate(ctx, err)
		}
		each(seq)
	}
	return translate(ctx, rows.Err())
}

func (t *changeTable) exec(ctx context.Context, query string, args ...any) error {
	ctx, cancel := t.s.withTimeout(ctx)
	defer cancel()
	_, err := t.s.writer.ExecContext(ctx, query, args...)
	return translate(ctx, err)
}

func (t *changeTable) Delete(ctx context.Context, r changetable.Run) error {
	return t.exec(ctx, `
		DELETE FROM user_changes
		WHERE seq BETWEEN ? AND ?`, r.Lo, r.Hi)
}

func (t *changeTable) AddMarker(ctx context.Context) error {
	return t.exec(ctx, `
		INSERT OR IGNORE INTO user_changes (
			seq,
			user_id,
			version,
			changed_at
		) VALUES (0, 0, 0, ?)`, userapi.Now().UnixMicro())
}

func (t *changeTable) DropMarker(ctx context.Context) error {
	return t.exec(ctx, `
		DELETE FROM user_changes
		WHERE seq = 0`)
}

func (t *changeTable) CheckTriggers(ctx context.Context) error {
	ctx, cancel := t.s.withTimeout(ctx)
	defer cancel()
	return checkTriggers(ctx, t.s.reader)
}
