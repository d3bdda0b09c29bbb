package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"userapi"
)

// seedChunk is the number of rows per COPY: each chunk commits on its own, so
// progress is reported and an interrupted seed keeps what it loaded, while a
// chunk is big enough that per-statement costs vanish.
const seedChunk = 100_000

// SeedUsers bulk-loads the users userapi.SeedUser(i) for i in
// [first, first+n) with COPY, giving user i the id i so benchmarks can address
// seeded users by id as well as by email. It first moves the identity
// sequence past first+n-1, so later creates get fresh ids, and ends with
// ANALYZE so the planner knows the new size. It fails with ErrEmailTaken or a
// primary-key violation when some of these users exist already. The
// QueryTimeout does not apply: a million rows take seconds, bounded by ctx.
func (s *Store) SeedUsers(ctx context.Context, first, n int, progress func(done int)) error {
	const reserve = `
SELECT setval('users_id_seq', greatest(last_value, $1))
FROM users_id_seq`
	if first < 1 || n < 0 {
		return fmt.Errorf("seed users: invalid range first=%d n=%d", first, n)
	}
	if n == 0 {
		return nil
	}
	c, pc, err := s.acquire(ctx)
	if err != nil {
		return fmt.Errorf("seed users: %w", translate(err))
	}
	defer s.release(ctx, c, pc)

	if _, err := c.Exec(ctx, reserve, int64(first+n-1)); err != nil {
		return fmt.Errorf("seed users: reserve ids: %w", translate(err))
	}
	now := userapi.Now()
	columns := []string{"id", "email", "name", "created_at", "updated_at", "version"}
	for done := 0; done < n; {
		size := min(seedChunk, n-done)
		src := &seedRows{next: first + done, end: first + done + size, now: now}
		if _, err := c.CopyFrom(ctx, pgx.Identifier{"users"}, columns, src); err != nil {
			if violatedKey(err) == emailConstraint {
				return fmt.Errorf("seed users %d..%d: %w", src.next, src.end-1, userapi.ErrEmailTaken)
			}
			return fmt.Errorf("seed users %d..%d: %w", first+done, first+done+size-1, translate(err))
		}
		done += size
		if progress != nil {
			progress(done)
		}
	}
	if _, err := c.Exec(ctx, `ANALYZE users`); err != nil {
		return fmt.Errorf("seed users: analyze: %w", translate(err))
	}
	return nil
}

// seedRows generates the rows of users next..end-1 as COPY asks for them, so
// a chunk never exists in memory as a whole.
type seedRows struct {
	next, end int
	now       time.Time
	values    [6]any
}

func (r *seedRows) Next() bool {
	return r.next < r.end
}

func (r *seedRows) Values() ([]any, error) {
	email, name := userapi.SeedUser(r.next)
	r.values = [6]any{int64(r.next), email, name, r.now, r.now, int64(1)}
	r.next++
	return r.values[:], nil
}

func (r *seedRows) Err() error { return nil }

var _ pgx.CopyFromSource = (*seedRows)(nil)
