package mysql

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"

	"userapi"
)

// maxIDsPerQuery bounds the ids of one GetUsers statement: prepared
// statements take at most 65,535 placeholders, and a batch of 1,024 keeps
// the statement small while still amortizing the round trips.
const maxIDsPerQuery = 1024

// The statements run inside transactions. They are kept before the first
// transaction begins (keepTxStatements): a transaction holds its
// connection, and keeping a statement inside it would need a second one
// from a pool the transactions may have drained.
// userColumns is the column list every query that returns users selects, in
// the order scanUser reads them.
const userColumns = `
	id,
	email,
	name,
	created_at,
	updated_at,
	version`

const (
	insertUserSQL = `
		INSERT INTO users (
			email,
			name,
			created_at,
			updated_at,
			version
		) VALUES (?, ?, ?, ?, 1)`

	insertKeySQL = `
		INSERT INTO idempotency_keys (
			idempotency_key,
			user_id,
			email,
			name,
			created_at
		) VALUES (?, ?, ?, ?, ?)`

	lockUserSQL = `
		SELECT` + userColumns + `
		FROM users
		WHERE id = ?
		FOR UPDATE`

	updateUserSQL = `
		UPDATE users SET
			email = ?,
			name = ?,
			updated_at = ?,
			version = ?
		WHERE id = ?`

	lockVersionSQL = `
		SELECT
			version
		FROM users
		WHERE id = ?
		FOR UPDATE`

	deleteUserSQL = `
		DELETE FROM users
		WHERE id = ?`
)

// txStatements are the statements keepTxStatements keeps.
var txStatements = []string{insertUserSQL, insertKeySQL, lockUserSQL, updateUserSQL, lockVersionSQL, deleteUserSQL}

// GetUser returns the user, or an error wrapping userapi.ErrNotFound.
func (s *Store) GetUser(ctx context.Context, id int64) (*userapi.User, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	u, err := scanUser(s.queryRow(ctx, nil, `
		SELECT`+userColumns+`
		FROM users
		WHERE id = ?`,
		id))
	if err != nil {
		return nil, fmt.Errorf("get user %d: %w", id, translate(err))
	}
	return u, nil
}

// GetUsers returns the users among ids that exist, in no particular order,
// with one IN (?, ?, …) query per 1,024 ids. The list is padded to the next
// power of two by repeating its last id (IN ignores the repeats), so a few
// kept statements serve every batch size.
func (s *Store) GetUsers(ctx context.Context, ids []int64) ([]*userapi.User, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	users := make([]*userapi.User, 0, len(ids))
	var args []any
	for len(ids) > 0 {
		batch := ids[:min(len(ids), maxIDsPerQuery)]
		ids = ids[len(batch):]
		n := padded(len(batch))
		args = args[:0]
		for i := range n {
			args = append(args, batch[min(i, len(batch)-1)])
		}
		rows, err := s.query(ctx, nil, `
			SELECT`+userColumns+`
			FROM users
			WHERE id IN (`+placeholders(n)+`)`,
			args...)
		if err != nil {
			return nil, fmt.Errorf("get %d users: %w", len(batch), translate(err))
		}
		users, err = appendUsers(users, rows)
		if err != nil {
			return nil, fmt.Errorf("get %d users: %w", len(batch), translate(err))
		}
	}
	return users, nil
}

// padded returns the power of two at or above n (n ≤ maxIDsPerQuery).
func padded(n int) int {
	p := 1
	for p < n {
		p <<= 1
	}
	return p
}

// ListUsers returns up to f.Limit users with id > f.AfterID in id order,
// only the one with f.Email when it is set.
func (s *Store) ListUsers(ctx context.Context, f userapi.UserFilter) ([]*userapi.User, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	limit := f.Limit
	if limit <= 0 {
		limit = userapi.DefaultLimit
	}
	limit = min(limit, userapi.MaxLimit+1)

	var rows *sql.Rows
	var err error
	if f.Email == "" {
		rows, err = s.query(ctx, nil, `
			SELECT`+userColumns+`
			FROM users
			WHERE id > ?
			ORDER BY id
			LIMIT ?`,
			f.AfterID, limit)
	} else {
		rows, err = s.query(ctx, nil, `
			SELECT`+userColumns+`
			FROM users
			WHERE id > ?
				AND email = ?
			ORDER BY id
			LIMIT ?`,
			f.AfterID, f.Email, limit)
	}
	if err != nil {
		return nil, fmt.Errorf("list users: %w", translate(err))
	}
	users, err := appendUsers(make([]*userapi.User, 0, limit), rows)
	if err != nil {
		return nil, fmt.Errorf("list users: %w", translate(err))
	}
	return users, nil
}

// CreateUser inserts the user with version 1 (its id from AUTO_INCREMENT)
// and, when in has an idempotency key, the key's snapshot in the same
// transaction. It fails with ErrEmailTaken when the email is in use. A key
// seen before returns the first result with replayed = true, or
// ErrIdempotencyMismatch when in differs from the first input.
func (s *Store) CreateUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	u, replayed, err := s.createUser(ctx, in)
	if err != nil {
		return nil, false, fmt.Errorf("create user: %w", translate(err))
	}
	return u, replayed, nil
}

func (s *Store) createUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	if in.IdempotencyKey != "" {
		if u, found, err := s.replay(ctx, in); found || err != nil {
			return u, found, err
		}
	}
	u, err := s.insertUser(ctx, in)
	key := violatedKey(err)
	if key == "" {
		return u, false, err
	}
	// A create with the same key may have committed while we inserted: the
	// row it locked made ours fail on the email or on the key. Its result
	// is ours to return.
	if in.IdempotencyKey != "" {
		if u, found, err := s.replay(ctx, in); found || err != nil {
			return u, found, err
		}
	}
	if key == emailKey {
		return nil, false, userapi.ErrEmailTaken
	}
	return nil, false, err
}

// insertUser inserts the user and its idempotency key in one transaction.
// A unique-key violation is returned as the driver's error for the caller
// to tell which key it was.
func (s *Store) insertUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, error) {
	var u *userapi.User
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		now := userapi.Now()
		res, err := s.exec(ctx, tx, insertUserSQL,
			in.Email, in.Name, now, now)
		if err != nil {
			return err
		}
		id, err := res.LastInsertId() // LAST_INSERT_ID() of this insert
		if err != nil {
			return err
		}
		if in.IdempotencyKey != "" {
			_, err = s.exec(ctx, tx, insertKeySQL,
				in.IdempotencyKey, id, in.Email, in.Name, now)
			if err != nil {
				return err
			}
		}
		u = &userapi.User{
			ID:        id,
			Email:     in.Email,
			Name:      in.Name,
			CreatedAt: now,
			UpdatedAt: now,
			Version:   1,
		}
		return nil
	})
	return u, err
}

// replay returns the first result of the create that used in's
// idempotency key, as that create returned it, and found = true; or
// ErrIdempotencyMismatch when in's email or name differ from that create's.
func (s *Store) replay(ctx context.Context, in userapi.UserCreate) (u *userapi.User, found bool, err error) {
	u = &userapi.User{Version: 1}
	err = s.queryRow(ctx, nil, `
		SELECT
			user_id,
			email,
			name,
			created_at
		FROM idempotency_keys
		WHERE idempotency_key = ?`,
		in.IdempotencyKey).Scan(
		&u.ID,
		&u.Email,
		&u.Name,
		&u.CreatedAt,
	)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return nil, false, nil
	case err != nil:
		return nil, false, err
	case u.Email != in.Email || u.Name != in.Name:
		return nil, false, userapi.ErrIdempotencyMismatch
	}
	u.UpdatedAt = u.CreatedAt
	return u, true, nil
}

// UpdateUser applies upd to the row it holds locked (SELECT … FOR UPDATE),
// so concurrent updates queue and none is lost, and returns the new row
// with its version incremented. It fails with ErrNotFound, then
// ErrVersionMismatch when upd.IfVersion > 0 differs from the stored
// version, or ErrEmailTaken.
func (s *Store) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var u *userapi.User
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		var err error
		u, err = scanUser(s.queryRow(ctx, tx, lockUserSQL,
			id))
		if err != nil {
			return err
		}
		if upd.IfVersion > 0 && u.Version != upd.IfVersion {
			return userapi.ErrVersionMismatch
		}
		if upd.Email != nil {
			u.Email = *upd.Email
		}
		if upd.Name != nil {
			u.Name = *upd.Name
		}
		u.UpdatedAt = userapi.Now()
		u.Version++
		_, err = s.exec(ctx, tx, updateUserSQL,
			u.Email, u.Name, u.UpdatedAt, u.Version, id)
		if violatedKey(err) == emailKey {
			return userapi.ErrEmailTaken
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("update user %d: %w", id, translate(err))
	}
	return u, nil
}

// DeleteUser removes the user. It fails with ErrNotFound, or with
// ErrVersionMismatch when ifVersion > 0 differs from the stored version
// (checked on the locked row, in the same transaction as the delete).
func (s *Store) DeleteUser(ctx context.Context, id int64, ifVersion int64) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var err error
	if ifVersion > 0 {
		err = s.inTx(ctx, func(tx *sql.Tx) error {
			var version int64
			err := s.queryRow(ctx, tx, lockVersionSQL,
				id).Scan(&version)
			switch {
			case errors.Is(err, sql.ErrNoRows):
				return userapi.ErrNotFound
			case err != nil:
				return err
			case version != ifVersion:
				return userapi.ErrVersionMismatch
			}
			_, err = s.exec(ctx, tx, deleteUserSQL,
				id)
			return err
		})
	} else {
		err = s.deleteUser(ctx, id)
	}
	if err != nil {
		return fmt.Errorf("delete user %d: %w", id, translate(err))
	}
	return nil
}

// deleteUser is the unconditional delete: one statement, no transaction.
func (s *Store) deleteUser(ctx context.Context, id int64) error {
	res, err := s.exec(ctx, nil, deleteUserSQL, id)
	if err != nil {
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return userapi.ErrNotFound
	}
	return nil
}

// scanUser scans one row of the columns id, email, name, created_at,
// updated_at, version; no row is ErrNotFound.
func scanUser(row rowScanner) (*userapi.User, error) {
	var u userapi.User
	err := row.Scan(
		&u.ID,
		&u.Email,
		&u.Name,
		&u.CreatedAt,
		&u.UpdatedAt,
		&u.Version,
	)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, userapi.ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	return &u, nil
}

// appendUsers scans every row of rows (the scanUser columns) onto users
// and closes rows.
func appendUsers(users []*userapi.User, rows *sql.Rows) ([]*userapi.User, error) {
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

// placeholders returns "?, ?, …, ?" with n question marks.
func placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?, ", n), ", ")
}
