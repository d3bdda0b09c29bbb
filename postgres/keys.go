package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

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
func scanKey(row pgx.Row) (*userapi.APIKey, error) {
	var k userapi.APIKey
	var scopes string
	var lastUsed, expires, revoked *time.Time
	var limit *float64
	var burst *int32
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
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, userapi.ErrKeyNotFound
	}
	if err != nil {
		return nil, err
	}
	if k.Scopes, err = userapi.ParseScopes(scopes); err != nil {
		return nil, fmt.Errorf("api key %d: %w", k.ID, err)
	}
	k.CreatedAt = k.CreatedAt.UTC()
	k.LastUsedAt = timeOrZero(lastUsed)
	k.ExpiresAt = timeOrZero(expires)
	k.RevokedAt = timeOrZero(revoked)
	if limit != nil {
		k.RateLimit = *limit
	}
	if burst != nil {
		k.RateBurst = int(*burst)
	}
	return &k, nil
}

func timeOrZero(t *time.Time) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.UTC()
}

// timeOrNull is t, or NULL for the zero time.
func timeOrNull(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

// zeroOrNull is v, or NULL for 0 ("the configured default").
func zeroOrNull[T int | float64](v T) *T {
	if v == 0 {
		return nil
	}
	return &v
}

// CreateKey inserts k and returns the stored key with its id.
func (s *Store) CreateKey(ctx context.Context, k userapi.APIKey) (*userapi.APIKey, error) {
	const q = `
INSERT INTO api_keys (
	name,
	scopes,
	secret_hash,
	created_at,
	expires_at,
	rate_limit,
	rate_burst
)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING` + keyColumns
	var out *userapi.APIKey
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		var err error
		out, err = scanKey(c.QueryRow(ctx, q,
			k.Name,
			k.Scopes.String(),
			k.Hash,
			userapi.Now(),
			timeOrNull(k.ExpiresAt),
			zeroOrNull(k.RateLimit),
			zeroOrNull(k.RateBurst),
		))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create api key: %w", translate(err))
	}
	return out, nil
}

// GetKey returns the key with id, or an error wrapping ErrKeyNotFound.
func (s *Store) GetKey(ctx context.Context, id int64) (*userapi.APIKey, error) {
	const q = `
SELECT` + keyColumns + `
FROM api_keys
WHERE id = $1`
	var k *userapi.APIKey
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		var err error
		k, err = scanKey(c.QueryRow(ctx, q, id))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("get api key %d: %w", id, translate(err))
	}
	return k, nil
}

// ListKeys returns every key in id order.
func (s *Store) ListKeys(ctx context.Context) ([]*userapi.APIKey, error) {
	const q = `
SELECT` + keyColumns + `
FROM api_keys
ORDER BY id`
	keys := []*userapi.APIKey{}
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		rows, err := c.Query(ctx, q)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			k, err := scanKey(rows)
			if err != nil {
				return err
			}
			keys = append(keys, k)
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("list api keys: %w", translate(err))
	}
	return keys, nil
}

// RevokeKey sets revoked_at (unless already set) and returns the key, or
// fails with ErrKeyNotFound.
func (s *Store) RevokeKey(ctx context.Context, id int64, at time.Time) (*userapi.APIKey, error) {
	const q = `
UPDATE api_keys
SET revoked_at = coalesce(revoked_at, $1)
WHERE id = $2
RETURNING` + keyColumns
	var k *userapi.APIKey
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		var err error
		k, err = scanKey(c.QueryRow(ctx, q, at, id))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("revoke api key %d: %w", id, translate(err))
	}
	return k, nil
}

// TouchKeys moves last_used_at forward with one statement for all uses.
func (s *Store) TouchKeys(ctx context.Context, uses []userapi.KeyUse) error {
	const q = `
UPDATE api_keys AS k
SET last_used_at = greatest(k.last_used_at, u.at)
FROM unnest($1::bigint[], $2::timestamptz[]) AS u (id, at)
WHERE k.id = u.id`
	ids := make([]int64, len(uses))
	ats := make([]time.Time, len(uses))
	for i, u := range uses {
		ids[i], ats[i] = u.ID, u.At
	}
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, q, ids, ats)
		return err
	})
	if err != nil {
		return fmt.Errorf("touch %d api keys: %w", len(uses), translate(err))
	}
	return nil
}

// KeysRevision reads the counts and the latest revocation of api_keys.
func (s *Store) KeysRevision(ctx context.Context) (userapi.KeysRevision, error) {
	const q = `
SELECT
	count(*),
	count(revoked_at),
	max(revoked_at)
FROM api_keys`
	var r userapi.KeysRevision
	var last *time.Time
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		return c.QueryRow(ctx, q).Scan(
			&r.Keys,
			&r.Revoked,
			&last,
		)
	})
	if err != nil {
		return r, fmt.Errorf("api keys revision: %w", translate(err))
	}
	r.LastRevoked = timeOrZero(last)
	return r, nil
}
