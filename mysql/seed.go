package mysql

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"time"

	"userapi"
)

const (
	// seedRowsPerInsert is the rows of one multi-row INSERT: 2,000 rows
	// take 8,000 placeholders (a prepared statement allows 65,535) and some
	// 150 KB on the wire, far below max_allowed_packet (16 MiB on MariaDB),
	// while making the per-statement round trips negligible.
	seedRowsPerInsert = 2000

	// seedRowsPerTx is the rows of one transaction: one commit (one redo
	// log flush) per 20,000 rows instead of one per statement, while undo
	// log and lock memory stay small and progress is reported often.
	seedRowsPerTx = 10 * seedRowsPerInsert

	// seedTxTimeout bounds one seed transaction instead of QueryTimeout:
	// seeding is a bulk load, not a request, and 20,000 rows can take
	// seconds on a busy machine. A stuck server still fails the seed.
	seedTxTimeout = time.Minute
)

// SeedUsers inserts the n users userapi.SeedUser(first … first+n-1) with
// multi-row INSERTs, 20,000 rows a transaction, calling progress (when not
// nil) with the running count after each commit; the last call reports n.
// A seeded email already in use fails with ErrEmailTaken; transactions
// committed before stay.
func (s *Store) SeedUsers(ctx context.Context, first, n int, progress func(done int)) error {
	for done := 0; done < n; {
		rows := min(n-done, seedRowsPerTx)
		if err := s.seedTx(ctx, first+done, rows); err != nil {
			return fmt.Errorf("seed users %d to %d: %w", first+done, first+done+rows-1, err)
		}
		done += rows
		if progress != nil {
			progress(done)
		}
	}
	return nil
}

// seedTx inserts the seed users from … from+count-1 in one transaction.
func (s *Store) seedTx(ctx context.Context, from, count int) error {
	ctx, cancel := context.WithTimeout(ctx, seedTxTimeout)
	defer cancel()
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		now := userapi.Now()
		for i := 0; i < count; i += seedRowsPerInsert {
			rows := min(count-i, seedRowsPerInsert)
			args := make([]any, 0, 4*rows)
			for j := from + i; j < from+i+rows; j++ {
				email, name := userapi.SeedUser(j)
				args = append(args, email, name, now, now)
			}
			if _, err := tx.ExecContext(ctx, seedInsertSQL(rows), args...); err != nil {
				return err
			}
		}
		return nil
	})
	if violatedKey(err) == emailKey {
		return fmt.Errorf("%w: %w", userapi.ErrEmailTaken, err)
	}
	return translate(err)
}

// seedInsertSQL returns an INSERT of rows users, each with version 1.
func seedInsertSQL(rows int) string {
	return `
		INSERT INTO users (
			email,
			name,
			created_at,
			updated_at,
			version
		) VALUES ` + strings.TrimSuffix(strings.Repeat("(?, ?, ?, ?, 1), ", rows), ", ")
}
