package mysql

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
func scanKey(row rowScanner) (*userapi.APIKey, error) {
	var k userapi.APIKey
	var scopes string
	var lastUsed, expires, revoked sql.NullTime
	var limit sql.NullFloat64
	var burst sql.NullInt64
	err := row.Scan(
		&k.ID,
		&k.Name,
		&scopes,
		&k.Hash,
		&k.CreatedAt,
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
	k.LastUsedAt = timeOrZero(lastUsed)
	k.ExpiresAt = timeOrZero(expires)
	k.RevokedAt = timeOrZero(revoked)
	k.RateLimit = limit.Float64
	k.RateBurst = int(burst.Int64)
	return &k, nil
}

func timeOrZero(t sql.NullTime) time.Time {
	if !t.Valid {
		return time.Time{}
	}
	return t.Time.UTC()
}

// timeOrNull is t, or NULL for the zero time.
func timeOrNull(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
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
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	res, err := s.exec(ctx, nil, `
		INSERT INTO api_keys (
			name,
			scopes,
			secret_hash,
			created_at,
			expires_at,
			rate_limit,
			rate_burst
		) VALUES (?, ?, ?, ?, ?, ?, ?)`,
		k.Name,
		k.Scopes.String(),
		k.Hash,
		userapi.Now(),
		timeOrNull(k.ExpiresAt),
		zeroOrNull(k.RateLimit),
		zeroOrNull(k.RateBurst),
	)
	if err != nil {
		return nil, fmt.Errorf("create api key: %w", translate(err))
	}
	id, err := res.LastInsertId()
	if err != nil {
		return nil, fmt.Errorf("create api key: %w", translate(err))
	}
	return s.GetKey(ctx, id)
}

// GetKey returns the key with id, or an error wrapping ErrKeyNotFound.
func (s *Store) GetKey(ctx context.Context, id int64) (*userapi.APIKey, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	k, err := s.getKey(ctx, nil, id)
	if err != nil {
		return nil, fmt.Errorf("get api key %d: %w", id, translate(err))
	}
	return k, nil
}

func (s *Store) getKey(ctx context.Context, tx *sql.Tx, id int64) (*userapi.APIKey, error) {
	return scanKey(s.queryRow(ctx, tx, `
		SELECT`+keyColumns+`
		FROM api_keys
		WHERE id = ?`,
		id))
}

// ListKeys returns every key in id order.
func (s *Store) ListKeys(ctx context.Context) ([]*userapi.APIKey, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	keys, err := s.listKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("list api keys: %w", translate(err))
	}
	return keys, nil
}

func (s *Store) listKeys(ctx context.Context) ([]*userapi.APIKey, error) {
	rows, err := s.query(ctx, nil, `
		SELECT`+keyColumns+`
		FROM api_keys
		ORDER BY id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	keys := []*userapi.APIKey{}
	for rows.Next() {
		k, err := scanKey(rows)
		if err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	return keys, rows.Err()
}

// RevokeKey sets revoked_at (unless already set) and returns the key, or
// fails with ErrKeyNotFound.
func (s *Store) RevokeKey(ctx context.Context, id int64, at time.Time) (*userapi.APIKey, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var k *userapi.APIKey
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, `
			UPDATE api_keys
			SET revoked_at = COALESCE(revoked_at, ?)
			WHERE id = ?`,
			at,
			id)
		if err != nil {
			return err
		}
		k, err = s.getKey(ctx, tx, id)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("revoke api key %d: %w", id, translate(err))
	}
	return k, nil
}

// TouchKeys moves last_used_at forward, in one transaction.
func (s *Store) TouchKeys(ctx context.Context, uses []userapi.KeyUse) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		for _, u := range uses {
			_, err := s.exec(ctx, tx, `
				UPDATE api_keys
				SET last_used_at = GREATEST(COALESCE(last_used_at, ?), ?)
				WHERE id = ?`,
				u.At,
				u.At,
				u.ID)
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("touch %d api keys: %w", len(uses), translate(err))
	}
	return nil
}

// KeysRevision reads the counts and the latest revocation of api_keys.
func (s *Store) KeysRevision(ctx context.Context) (userapi.KeysRevision, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var r userapi.KeysRevision
	var last sql.NullTime
	err := s.queryRow(ctx, nil, `
		SELECT
			COUNT(*),
			COUNT(revoked_at),
			MAX(revoked_at)
		FROM api_keys`,
	).Scan(
		&r.Keys,
		&r.Revoked,
		&last,
	)
	if err != nil {
		return r, fmt.Errorf("api keys revision: %w", translate(err))
	}
	r.LastRevoked = timeOrZero(last)
	return r, nil
}
