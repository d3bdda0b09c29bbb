package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"userapi"
)

// userColumns is the column list every query that returns users selects, in
// the order scanUser reads them.
const userColumns = `
	id,
	email,
	name,
	created_at,
	updated_at,
	version`

const getUserSQL = `
	SELECT` + userColumns + `
	FROM users
	WHERE id = ?`

// scanUser reads one row of userColumns. Timestamps are unix microseconds.
func scanUser(row interface{ Scan(...any) error }) (*userapi.User, error) {
	var u userapi.User
	var created, updated int64
	err := row.Scan(
		&u.ID,
		&u.Email,
		&u.Name,
		&created,
		&updated,
		&u.Version,
	)
	if err != nil {
		return nil, err
	}
	u.CreatedAt = time.UnixMicro(created).UTC()
	u.UpdatedAt = time.UnixMicro(updated).UTC()
	return &u, nil
}

// GetUser returns the user with id, or an error wrapping ErrNotFound.
func (s *Store) GetUser(ctx context.Context, id int64) (*userapi.User, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	u, err := scanUser(s.getUser.QueryRowContext(ctx, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("get user %d: %w", id, userapi.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get user %d: %w", id, translate(ctx, err))
	}
	return u, nil
}

// GetUsers returns the users among ids that exist, in id order; absent ids
// are left out. More ids than SQLite binds in one statement are split into
// several queries.
func (s *Store) GetUsers(ctx context.Context, ids []int64) ([]*userapi.User, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	users := make([]*userapi.User, 0, len(ids))
	for len(ids) > 0 {
		chunk := ids[:min(len(ids), s.maxVars)]
		ids = ids[len(chunk):]
		var err error
		if users, err = s.getUsers(ctx, users, chunk); err != nil {
			return nil, fmt.Errorf("get %d users: %w", len(chunk), translate(ctx, err))
		}
	}
	return users, nil
}

func (s *Store) getUsers(ctx context.Context, users []*userapi.User, ids []int64) ([]*userapi.User, error) {
	args := make([]any, len(ids))
	for i, id := range ids {
		args[i] = id
	}
	query := `
		SELECT` + userColumns + `
		FROM users
		WHERE id IN (?` + strings.Repeat(", ?", len(ids)-1) + `)
		ORDER BY id`
	rows, err := s.reader.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		u, err := scanUser(rows)
		if err != nil {
			return nil, err
		}
		users = append(users, u)
	}
	return users, rows.Err()
}

// ListUsers returns up to f.Limit users with id > f.AfterID in id order,
// only the one with f.Email when it is set. A Limit <= 0 means
// userapi.DefaultLimit.
func (s *Store) ListUsers(ctx context.Context, f userapi.UserFilter) ([]*userapi.User, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	limit := f.Limit
	if limit <= 0 {
		limit = userapi.DefaultLimit
	}
	query := `
		SELECT` + userColumns + `
		FROM users
		WHERE id > ?
		ORDER BY id
		LIMIT ?`
	args := []any{f.AfterID, limit}
	if f.Email != "" {
		query = `
			SELECT` + userColumns + `
			FROM users
			WHERE id > ?
				AND email = ?
			ORDER BY id
			LIMIT ?`
		args = []any{f.AfterID, f.Email, limit}
	}
	rows, err := s.reader.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("list users: %w", translate(ctx, err))
	}
	defer rows.Close()
	users := make([]*userapi.User, 0, min(limit, userapi.MaxLimit+1))
	for rows.Next() {
		u, err := scanUser(rows)
		if err != nil {
			return nil, fmt.Errorf("list users: %w", translate(ctx, err))
		}
		users = append(users, u)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list users: %w", translate(ctx, err))
	}
	return users, nil
}

// CreateUser inserts a user with version 1 and returns it. It fails with
// ErrEmailTaken when another user has the email. With an idempotency key
// seen before it returns the first result and replayed = true, or
// ErrIdempotencyMismatch when the email or name differ from the first
// create's.
//
// The transaction is BEGIN IMMEDIATE: it holds the database's write lock
// from its first statement, so no other create (from this process or
// another) can insert the same key between the key lookup and the inserts.
func (s *Store) CreateUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	u, replayed, err := s.createUser(ctx, in)
	if err != nil {
		return nil, false, fmt.Errorf("create user: %w", err)
	}
	return u, replayed, nil
}

func (s *Store) createUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	tx, err := s.writer.BeginTx(ctx, nil)
	if err != nil {
		return nil, false, translate(ctx, err)
	}
	defer tx.Rollback()

	if in.IdempotencyKey != "" {
		u, err := replay(ctx, tx, in)
		if err == nil {
			return u, true, nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return nil, false, err
		}
	}

	now := userapi.Now()
	u := &userapi.User{
		Email:     in.Email,
		Name:      in.Name,
		CreatedAt: now,
		UpdatedAt: now,
		Version:   1,
	}
	err = tx.QueryRowContext(ctx, `
		INSERT INTO users (
			email,
			name,
			created_at,
			updated_at,
			version
		)
		VALUES (?, ?, ?, ?, 1)
		RETURNING id`,
		u.Email,
		u.Name,
		now.UnixMicro(),
		now.UnixMicro(),
	).Scan(&u.ID)
	if violatedKey(err) == emailKey {
		return nil, false, userapi.ErrEmailTaken
	}
	if err != nil {
		return nil, false, translate(ctx, err)
	}

	if in.IdempotencyKey != "" {
		_, err = tx.ExecContext(ctx, `
			INSERT INTO idempotency_keys (
				key,
				user_id,
				email,
				name,
				created_at
			)
			VALUES (?, ?, ?, ?, ?)`,
			in.IdempotencyKey,
			u.ID,
			u.Email,
			u.Name,
			now.UnixMicro(),
		)
		if err != nil {
			// A duplicate key cannot happen under BEGIN IMMEDIATE (the
			// lookup above saw every committed key); if it does, it is
			// an internal error, not the client's.
			return nil, false, translate(ctx, err)
		}
	}

	if err := tx.Commit(); err != nil {
		return nil, false, translate(ctx, err)
	}
	return u, false, nil
}

// replay returns the first result of the create with in.IdempotencyKey,
// sql.ErrNoRows when the key is new, or ErrIdempotencyMismatch.
func replay(ctx context.Context, tx *sql.Tx, in userapi.UserCreate) (*userapi.User, error) {
	var u userapi.User
	var created int64
	err := tx.QueryRowContext(ctx, `
		SELECT
			user_id,
			email,
			name,
			created_at
		FROM idempotency_keys
		WHERE key = ?`,
		in.IdempotencyKey,
	).Scan(
		&u.ID,
		&u.Email,
		&u.Name,
		&created,
	)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, err
	}
	if err != nil {
		return nil, translate(ctx, err)
	}
	if u.Email != in.Email || u.Name != in.Name {
		return nil, userapi.ErrIdempotencyMismatch
	}
	u.CreatedAt = time.UnixMicro(created).UTC()
	u.UpdatedAt = u.CreatedAt
	u.Version = 1
	return &u, nil
}

// UpdateUser sets the fields of upd that are not nil, increments the version
// and returns the new row. It fails with ErrNotFound, ErrEmailTaken, or
// ErrVersionMismatch when upd.IfVersion > 0 differs from the stored version.
// The version check is part of the UPDATE, so no concurrent update is lost.
func (s *Store) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	u, err := s.updateUser(ctx, id, upd)
	if err != nil {
		return nil, fmt.Errorf("update user %d: %w", id, err)
	}
	return u, nil
}

func (s *Store) updateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	tx, err := s.writer.BeginTx(ctx, nil)
	if err != nil {
		return nil, translate(ctx, err)
	}
	defer tx.Rollback()

	u, err := scanUser(tx.QueryRowContext(ctx, `
		UPDATE users
		SET
			email = coalesce(:email, email),
			name = coalesce(:name, name),
			updated_at = :now,
			version = version + 1
		WHERE id = :id
			AND (:if_version = 0 OR version = :if_version)
		RETURNING`+userColumns,
		sql.Named("email", nullable(upd.Email)),
		sql.Named("name", nullable(upd.Name)),
		sql.Named("now", userapi.Now().UnixMicro()),
		sql.Named("id", id),
		sql.Named("if_version", upd.IfVersion),
	))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, explainMiss(ctx, tx, id)
	}
	if violatedKey(err) == emailKey {
		return nil, userapi.ErrEmailTaken
	}
	if err != nil {
		return nil, translate(ctx, err)
	}
	if err := tx.Commit(); err != nil {
		return nil, translate(ctx, err)
	}
	return u, nil
}

// DeleteUser removes the user. It fails with ErrNotFound, or with
// ErrVersionMismatch when ifVersion > 0 differs from the stored version.
func (s *Store) DeleteUser(ctx context.Context, id int64, ifVersion int64) error {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	if err := s.deleteUser(ctx, id, ifVersion); err != nil {
		return fmt.Errorf("delete user %d: %w", id, err)
	}
	return nil
}

func (s *Store) deleteUser(ctx context.Context, id int64, ifVersion int64) error {
	tx, err := s.writer.BeginTx(ctx, nil)
	if err != nil {
		return translate(ctx, err)
	}
	defer tx.Rollback()

	res, err := tx.ExecContext(ctx, `
		DELETE FROM users
		WHERE id = :id
			AND (:if_version = 0 OR version = :if_version)`,
		sql.Named("id", id),
		sql.Named("if_version", ifVersion),
	)
	if err != nil {
		return translate(ctx, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return translate(ctx, err)
	}
	if n == 0 {
		return explainMiss(ctx, tx, id)
	}
	if err := tx.Commit(); err != nil {
		return translate(ctx, err)
	}
	return nil
}

// explainMiss explains, inside the transaction whose conditional
// UPDATE or DELETE matched no row, why: ErrNotFound when the row does not
// exist, else ErrVersionMismatch.
func explainMiss(ctx context.Context, tx *sql.Tx, id int64) error {
	var exists bool
	err := tx.QueryRowContext(ctx, `
		SELECT EXISTS (
			SELECT 1
			FROM users
			WHERE id = ?
		)`,
		id,
	).Scan(&exists)
	switch {
	case err != nil:
		return translate(ctx, err)
	case !exists:
		return userapi.ErrNotFound
	default:
		return userapi.ErrVersionMismatch
	}
}

// nullable returns *p, or nil (SQL NULL) when p is nil.
func nullable(p *string) any {
	if p == nil {
		return nil
	}
	return *p
}

// Seeding writes seedRowsPerInsert rows per INSERT statement (4 parameters
// each, well under SQLite's limit) and commits every seedRowsPerTx rows:
// large enough that the per-commit fsync is negligible, small enough that
// the write lock is released often for the API's writes.
const (
	seedRowsPerInsert = 500
	seedRowsPerTx     = 50_000
)

// SeedUsers inserts n users made by userapi.SeedUser(first..first+n-1) with
// multi-row INSERTs in large transactions, calling progress (when not nil)
// with the running count after each commit. It fails with ErrEmailTaken when
// one of the emails exists. The store's QueryTimeout does not apply: ctx
// bounds the whole load.
func (s *Store) SeedUsers(ctx context.Context, first, n int, progress func(done int)) error {
	for done := 0; done < n; {
		count := min(n-done, seedRowsPerTx)
		if err := s.seedTx(ctx, first+done, count); err != nil {
			return fmt.Errorf("seed users %d..%d: %w", first+done, first+done+count-1, err)
		}
		done += count
		if progress != nil {
			progress(done)
		}
	}
	return nil
}

func (s *Store) seedTx(ctx context.Context, first, n int) error {
	tx, err := s.writer.BeginTx(ctx, nil)
	if err != nil {
		return translate(ctx, err)
	}
	defer tx.Rollback()

	// One statement prepared for full batches; the last, shorter batch is
	// executed unprepared.
	full, err := tx.PrepareContext(ctx, seedInsertSQL(seedRowsPerInsert))
	if err != nil {
		return translate(ctx, err)
	}
	defer full.Close()
	args := make([]any, 0, 4*seedRowsPerInsert)
	now := userapi.Now().UnixMicro()
	end := first + n
	for i := first; i < end; {
		rows := min(end-i, seedRowsPerInsert)
		args = args[:0]
		for j := i; j < i+rows; j++ {
			email, name := userapi.SeedUser(j)
			args = append(args, email, name, now, now)
		}
		if rows == seedRowsPerInsert {
			_, err = full.ExecContext(ctx, args...)
		} else {
			_, err = tx.ExecContext(ctx, seedInsertSQL(rows), args...)
		}
		if violatedKey(err) == emailKey {
			return userapi.ErrEmailTaken
		}
		if err != nil {
			return translate(ctx, err)
		}
		i += rows
	}
	if err := tx.Commit(); err != nil {
		return translate(ctx, err)
	}
	return nil
}

// seedInsertSQL returns an INSERT of rows users.
func seedInsertSQL(rows int) string {
	return `
		INSERT INTO users (
			email,
			name,
			created_at,
			updated_at,
			version
		)
		VALUES (?, ?, ?, ?, 1)` + strings.Repeat(", (?, ?, ?, ?, 1)", rows-1)
}
