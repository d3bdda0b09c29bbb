package postgres

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"userapi"
)

// Names of the unique constraints (migrations/00001_users.sql), by which a
// unique violation tells a taken email from a reused idempotency key.
const (
	emailConstraint = "users_email_key"
	keyConstraint   = "idempotency_keys_pkey"
)

// scanUser scans the columns id, email, name, created_at, updated_at, version
// into u. pgx returns timestamptz in the local zone; the domain wants UTC.
func scanUser(row pgx.Row, u *userapi.User) error {
	if err := row.Scan(
		&u.ID,
		&u.Email,
		&u.Name,
		&u.CreatedAt,
		&u.UpdatedAt,
		&u.Version,
	); err != nil {
		return err
	}
	u.CreatedAt = u.CreatedAt.UTC()
	u.UpdatedAt = u.UpdatedAt.UTC()
	return nil
}

// collectUsers reads every row of rows with scanUser and closes rows.
func collectUsers(rows pgx.Rows) ([]*userapi.User, error) {
	defer rows.Close()
	var users []*userapi.User
	for rows.Next() {
		u := new(userapi.User)
		if err := scanUser(rows, u); err != nil {
			return nil, err
		}
		users = append(users, u)
	}
	return users, rows.Err()
}

// GetUser returns the user with id, or an error wrapping userapi.ErrNotFound.
// It is the hot read path: one round trip on a pooled connection, where the
// statement is prepared on its first use and cached from then on.
func (s *Store) GetUser(ctx context.Context, id int64) (*userapi.User, error) {
	const q = `
SELECT
	id,
	email,
	name,
	created_at,
	updated_at,
	version
FROM users
WHERE id = $1`
	u := new(userapi.User)
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		return scanUser(c.QueryRow(ctx, q, id), u)
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("get user %d: %w", id, userapi.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get user %d: %w", id, translate(err))
	}
	return u, nil
}

// GetUsers returns the users among ids that exist, in no particular order,
// with one query.
func (s *Store) GetUsers(ctx context.Context, ids []int64) ([]*userapi.User, error) {
	const q = `
SELECT
	id,
	email,
	name,
	created_at,
	updated_at,
	version
FROM users
WHERE id = ANY($1)`
	if len(ids) == 0 {
		return nil, nil
	}
	if s.rt != nil {
		users, err := s.routedUsers(ctx, s.rt.needOf(ids, after(ctx)), q, ids)
		if err != nil {
			return nil, fmt.Errorf("get %d users: %w", len(ids), translate(err))
		}
		return users, nil
	}
	var users []*userapi.User
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		rows, err := c.Query(ctx, q, ids)
		if err != nil {
			return err
		}
		users, err = collectUsers(rows)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("get %d users: %w", len(ids), translate(err))
	}
	return users, nil
}

// ListUsers returns up to f.Limit users with id > f.AfterID in id order,
// only those with f.Email when it is set. Both forms walk an index: the
// primary key, or the unique email index.
func (s *Store) ListUsers(ctx context.Context, f userapi.UserFilter) ([]*userapi.User, error) {
	const q = `
SELECT
	id,
	email,
	name,
	created_at,
	updated_at,
	version
FROM users
WHERE id > $1
ORDER BY id
LIMIT $2`
	const qEmail = `
SELECT
	id,
	email,
	name,
	created_at,
	updated_at,
	version
FROM users
WHERE id > $1
	AND email = $3
ORDER BY id
LIMIT $2`
	limit := f.Limit
	if limit <= 0 {
		limit = userapi.DefaultLimit
	}
	if s.rt != nil {
		tok := after(ctx)
		need := max(userapi.Position(s.rt.newest.Load()), tok)
		query, args := q, []any{f.AfterID, limit}
		if f.Email != "" {
			query, args = qEmail, append(args, f.Email)
		}
		var users []*userapi.User
		var err error
		if tok == 0 {
			// Lists are cached nowhere, so no tombstone tells a replica's
			// page from a write another instance acknowledged; without
			// the client's token (which names it) only the primary is
			// sure to have it.
			s.rt.fellBack(fallbackNoToken)
			users, err = s.primaryUsers(ctx, query, args...)
		} else {
			users, err = s.routedUsers(ctx, need, query, args...)
		}
		if err != nil {
			return nil, fmt.Errorf("list users after %d: %w", f.AfterID, translate(err))
		}
		return users, nil
	}
	var users []*userapi.User
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		var rows pgx.Rows
		var err error
		if f.Email == "" {
			rows, err = c.Query(ctx, q, f.AfterID, limit)
		} else {
			rows, err = c.Query(ctx, qEmail, f.AfterID, limit, f.Email)
		}
		if err != nil {
			return err
		}
		users, err = collectUsers(rows)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list users after %d: %w", f.AfterID, translate(err))
	}
	return users, nil
}

// CreateUser inserts a user with version 1. It fails with ErrEmailTaken when
// the email is in use. With an idempotency key the user row and the key's
// snapshot are inserted by one statement; a key seen before returns the
// snapshot of the first result with replayed = true, or fails with
// ErrIdempotencyMismatch when the email or name differ from the first
// request's.
func (s *Store) CreateUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	const insert = `
INSERT INTO users (
	email,
	name,
	created_at,
	updated_at,
	version
)
VALUES ($1, $2, $3, $3, 1)
RETURNING id`
	const insertWithKey = `
WITH u AS (
	INSERT INTO users (
		email,
		name,
		created_at,
		updated_at,
		version
	)
	VALUES ($1, $2, $3, $3, 1)
	RETURNING id
), k AS (
	INSERT INTO idempotency_keys (
		key,
		user_id,
		email,
		name,
		created_at
	)
	SELECT $4, id, $1, $2, $3
	FROM u
)
SELECT id
FROM u`
	now := userapi.Now()
	u := &userapi.User{Email: in.Email, Name: in.Name, CreatedAt: now, UpdatedAt: now, Version: 1}
	var first *userapi.User
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		scanID := func(r pgx.Row) error { return r.Scan(&u.ID) }
		if in.IdempotencyKey == "" {
			pos, err := s.writeRow(ctx, c, scanID, insert, in.Email, in.Name, now)
			if err == nil {
				s.acked(ctx, u.ID, pos)
			}
			return err
		}
		pos, err := s.writeRow(ctx, c, scanID, insertWithKey, in.Email, in.Name, now, in.IdempotencyKey)
		if err == nil {
			s.acked(ctx, u.ID, pos)
			return nil
		}
		if violatedKey(err) == "" {
			return err
		}
		// The email or the key is taken; the statement inserted nothing.
		// When the key is taken, by an earlier request or by a concurrent
		// one that committed first, its snapshot is the answer. Only when
		// the key is unused is the original violation reported.
		var lookupErr error
		first, lookupErr = lookupKey(ctx, c, in.IdempotencyKey)
		if errors.Is(lookupErr, pgx.ErrNoRows) {
			return err
		}
		if lookupErr == nil {
			// The replayed create committed earlier; any position read
			// now is past it.
			if lookupErr = s.committed(ctx, c, first.ID); lookupErr != nil {
				first = nil
			}
		}
		return lookupErr
	})
	switch {
	case first != nil:
		if first.Email != in.Email || first.Name != in.Name {
			return nil, false, fmt.Errorf("create user: %w", userapi.ErrIdempotencyMismatch)
		}
		return first, true, nil
	case violatedKey(err) == emailConstraint:
		return nil, false, fmt.Errorf("create user: %w", userapi.ErrEmailTaken)
	case err != nil:
		return nil, false, fmt.Errorf("create user: %w", translate(err))
	}
	return u, false, nil
}

// lookupKey returns the snapshot stored with an idempotency key as the user
// the first create returned, or pgx.ErrNoRows.
func lookupKey(ctx context.Context, c *pgx.Conn, key string) (*userapi.User, error) {
	const q = `
SELECT
	user_id,
	email,
	name,
	created_at
FROM idempotency_keys
WHERE key = $1`
	u := &userapi.User{Version: 1}
	if err := c.QueryRow(ctx, q, key).Scan(
		&u.ID,
		&u.Email,
		&u.Name,
		&u.CreatedAt,
	); err != nil {
		return nil, err
	}
	u.CreatedAt = u.CreatedAt.UTC()
	u.UpdatedAt = u.CreatedAt
	return u, nil
}

// UpdateUser sets the fields of upd that are not nil, increments the version
// and returns the new row, in one statement. It fails with ErrNotFound,
// ErrVersionMismatch (when upd.IfVersion > 0 differs from the stored
// version) or ErrEmailTaken.
func (s *Store) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	const q = `
UPDATE users
SET
	email = coalesce($2, email),
	name = coalesce($3, name),
	updated_at = $4,
	version = version + 1
WHERE id = $1
	AND ($5 = 0 OR version = $5)
RETURNING
	id,
	email,
	name,
	created_at,
	updated_at,
	version`
	u := new(userapi.User)
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		pos, err := s.writeRow(ctx, c, func(r pgx.Row) error { return scanUser(r, u) },
			q, id, upd.Email, upd.Name, userapi.Now(), upd.IfVersion)
		if errors.Is(err, pgx.ErrNoRows) {
			return s.explainMiss(ctx, c, id)
		}
		if err == nil {
			s.acked(ctx, id, pos)
		}
		return err
	})
	switch {
	case violatedKey(err) == emailConstraint:
		return nil, fmt.Errorf("update user %d: %w", id, userapi.ErrEmailTaken)
	case err != nil:
		return nil, fmt.Errorf("update user %d: %w", id, translate(err))
	}
	return u, nil
}

// DeleteUser removes the user in one statement. It fails with ErrNotFound,
// or ErrVersionMismatch when ifVersion > 0 differs from the stored version.
func (s *Store) DeleteUser(ctx context.Context, id int64, ifVersion int64) error {
	const q = `
DELETE FROM users
WHERE id = $1
	AND ($2 = 0 OR version = $2)`
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		n, pos, err := s.writeExec(ctx, c, q, id, ifVersion)
		if err == nil && n == 0 {
			return s.explainMiss(ctx, c, id)
		}
		if err == nil {
			s.acked(ctx, id, pos)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("delete user %d: %w", id, translate(err))
	}
	return nil
}

// explainMiss tells why a conditional write matched no row: ErrNotFound when
// the user does not exist (checked first), else ErrVersionMismatch. The write
// itself was atomic; this read only picks the error, so a row deleted in
// between is rightly reported as not found.
func (s *Store) explainMiss(ctx context.Context, c *pgx.Conn, id int64) error {
	const q = `
SELECT EXISTS (
	SELECT 1
	FROM users
	WHERE id = $1
)`
	var exists bool
	if err := c.QueryRow(ctx, q, id).Scan(&exists); err != nil {
		return err
	}
	if !exists {
		return userapi.ErrNotFound
	}
	return userapi.ErrVersionMismatch
}

// after returns the session token the read must reflect, if any.
func after(ctx context.Context) userapi.Position {
	if sess := userapi.SessionFrom(ctx); sess != nil {
		return sess.After
	}
	return 0
}

// violatedKey returns the name of the unique constraint err violates, or "".
func violatedKey(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" { // unique_violation
		return pgErr.ConstraintName
	}
	return ""
}
