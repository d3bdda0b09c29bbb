package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"userapi"
)

var _ userapi.KeyStore = (*Store)(nil)

// keyColumns is the column list every query that returns keys selects, in
// the order scanKey reads them.
const keyColumns = `
	id,
	name,
	scopes,
	secret_hash,
	created_at,
	last_used_at,
	expires_at,
	revoked_at,
	rate_limit,
	rate_burst`

// scanKey reads one row of keyColumns; no row is ErrKeyNotFound.
// Timestamps are unix microseconds, NULL for none.
func scanKey(row interface{ Scan(...any) error }) (*userapi.APIKey, error) {
	var k userapi.APIKey
	var scopes string
	var created int64
	var lastUsed, expires, revoked, burst sql.NullInt64
	var limit sql.NullFloat64
	err := row.Scan(
		&k.ID,
		&k.Name,
		&scopes,
		&k.Hash,
		&created,
		&lastUsed,
		&expires,
		&revoked,
		&limit,
		&burst,
	)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, userapi.ErrKeyNotFound
	}
	if err != nil {
		return nil, err
	}
	if k.Scopes, err = userapi.ParseScopes(scopes); err != nil {
		return nil, fmt.Errorf("api key %d: %w", k.ID, err)
	}
	k.CreatedAt = time.UnixMicro(created).UTC()
	k.LastUsedAt = timeOrZero(lastUsed)
	k.ExpiresAt = timeOrZero(expires)
	k.RevokedAt = timeOrZero(revoked)
	k.RateLimit = limit.Float64
	k.RateBurst = int(burst.Int64)
	return &k, nil
}

func timeOrZero(us sql.NullInt64) time.Time {
	if !us.Valid {
		return time.Time{}
	}
	return time.UnixMicro(us.Int64).UTC()
}

// microsOrNull is t in unix microseconds, or NULL for the zero time.
func microsOrNull(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UnixMicro()
}

// zeroOrNull is v, or NULL for 0 ("the configured default").
func zeroOrNull[T int | float64](v T) any {
	if v == 0 {
		return nil
	}
	return v
}

// CreateKey inserts k and returns the stored key with its id.
func (s *Store) CreateKey(ctx context.Context, k userapi.APIKey) (*userapi.APIKey, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	now := userapi.Now()
	out, err := scanKey(s.writer.QueryRowContext(ctx, `
		INSERT INTO api_keys (
			name,
			scopes,
			secret_hash,
			created_at,
			expires_at,
			rate_limit,
			rate_burst
		)
		VALUES (?, ?, ?, ?, ?, ?, ?)
		RETURNING`+keyColumns,
		k.Name,
		k.Scopes.String(),
		k.Hash,
		now.UnixMicro(),
		microsOrNull(k.ExpiresAt),
		zeroOrNull(k.RateLimit),
		zeroOrNull(k.RateBurst),
	))
	if err != nil {
		return nil, fmt.Errorf("create api key: %w", translate(ctx, err))
	}
	return out, nil
}

// GetKey returns the key with id, or an error wrapping ErrKeyNotFound.
func (s *Store) GetKey(ctx context.Context, id int64) (*userapi.APIKey, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	k, err := scanKey(s.reader.QueryRowContext(ctx, `
		SELECT`+keyColumns+`
		FROM api_keys
		WHERE id = ?`,
		id,
	))
	if err != nil {
		return nil, fmt.Errorf("get api key %d: %w", id, translate(ctx, err))
	}
	return k, nil
}

// ListKeys returns every key in id order.
func (s *Store) ListKeys(ctx context.Context) ([]*userapi.APIKey, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	rows, err := s.reader.QueryContext(ctx, `
		SELECT`+keyColumns+`
		FROM api_keys
		ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list api keys: %w", translate(ctx, err))
	}
	defer rows.Close()
	keys := []*userapi.APIKey{}
	for rows.Next() {
		k, err := scanKey(rows)
		if err != nil {
			return nil, fmt.Errorf("list api keys: %w", translate(ctx, err))
		}
		keys = append(keys, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list api keys: %w", translate(ctx, err))
	}
	return keys, nil
}

// RevokeKey sets revoked_at (unless already set) and returns the key, or
// fails with ErrKeyNotFound.
func (s *Store) RevokeKey(ctx context.Context, id int64, at time.Time) (*userapi.APIKey, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	k, err := scanKey(s.writer.QueryRowContext(ctx, `
		UPDATE api_keys
		SET revoked_at = coalesce(revoked_at, ?)
		WHERE id = ?
		RETURNING`+keyColumns,
		at.UnixMicro(),
		id,
	))
	if err != nil {
		return nil, fmt.Errorf("revoke api key %d: %w", id, translate(ctx, err))
	}
	return k, nil
}

// TouchKeys moves last_used_at forward, in one transaction.
func (s *Store) TouchKeys(ctx context.Context, uses []userapi.KeyUse) error {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	if err := s.touchKeys(ctx, uses); err != nil {
		return fmt.Errorf("touch %d api keys: %w", len(uses), translate(ctx, err))
	}
	return nil
}

func (s *Store) touchKeys(ctx context.Context, uses []userapi.KeyUse) error {
	tx, err := s.writer.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, u := range uses {
		_, err := tx.ExecContext(ctx, `
			UPDATE api_keys
			SET last_used_at = max(coalesce(last_used_at, 0), ?)
			WHERE id = ?`,
			u.At.UnixMicro(),
			u.ID,
		)
		if err != nil {
			return err
		}
	}
	return tx.Commit()
}

// KeysRevision reads the counts and the latest revocation of api_keys.
func (s *Store) KeysRevision(ctx context.Context) (userapi.KeysRevision, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	var r userapi.KeysRevision
	var last int64
	err := s.reader.QueryRowContext(ctx, `
		SELECT
			count(*),
			count(revoked_at),
			coalesce(max(revoked_at), 0)
		FROM api_keys`,
	).Scan(
		&r.Keys,
		&r.Revoked,
		&last,
	)
	if err != nil {
		return r, fmt.Errorf("api keys revision: %w", translate(ctx, err))
	}
	if last != 0 {
		r.LastRevoked = time.UnixMicro(last).UTC()
	}
	return r, nil
}
