// Package userapi is the domain of the users service: the User type, the
// inputs that create and change one, the Store contract every database (and the
// cache in front of them) implements, and the error vocabulary the HTTP layer
// maps to status codes. It imports no driver, Redis or HTTP package.
package userapi

import (
	"context"
	"strconv"
	"time"
)

// User is one row of the users table.
type User struct {
	ID        int64
	Email     string // lower-cased, unique
	Name      string
	CreatedAt time.Time // UTC, microsecond precision
	UpdatedAt time.Time // UTC, microsecond precision
	Version   int64     // 1 on create, +1 on every update
}

// UserCreate is the input of Store.CreateUser. Email and Name must already be
// normalized by Validate.
type UserCreate struct {
	Email string
	Name  string
	// IdempotencyKey, when not empty, is stored with the created row in the
	// same transaction. A later create with the same key and the same Email
	// and Name returns the first result; with another Email or Name it fails
	// with ErrIdempotencyMismatch.
	IdempotencyKey string
}

// UserUpdate is the input of Store.UpdateUser. A nil field is left unchanged
// (PUT sets both, PATCH either). Fields must already be normalized.
type UserUpdate struct {
	Email *string
	Name  *string
	// IfVersion, when > 0, makes the update fail with ErrVersionMismatch
	// unless the stored version equals it (If-Match).
	IfVersion int64
}

// UserFilter selects a page of users in id order (keyset pagination).
type UserFilter struct {
	AfterID int64  // only ids > AfterID
	Email   string // exact match on the normalized email when not empty
	Limit   int    // at most this many rows; 1..MaxLimit+1
}

// Page size bounds of ListUsers.
const (
	DefaultLimit = 50
	MaxLimit     = 1000
)

// Store is the contract of every users store: PostgreSQL, MySQL, SQLite, and
// the cache that decorates them. Every method honours ctx's deadline.
// Database outages are reported as errors wrapping ErrUnavailable.
type Store interface {
	// GetUser returns the user, or ErrNotFound.
	GetUser(ctx context.Context, id int64) (*User, error)

	// GetUsers returns the users among ids that exist, in any order; absent
	// ids are left out. It is the multi-key load that batching uses.
	GetUsers(ctx context.Context, ids []int64) ([]*User, error)

	// ListUsers returns up to f.Limit users with id > f.AfterID in ascending
	// id order, restricted to f.Email when set.
	ListUsers(ctx context.Context, f UserFilter) ([]*User, error)

	// CreateUser inserts a user with version 1 and returns it. It fails with
	// ErrEmailTaken when another user has the email. With an idempotency key
	// seen before it returns the first result and replayed = true, or
	// ErrIdempotencyMismatch when the input differs from the first one.
	CreateUser(ctx context.Context, in UserCreate) (u *User, replayed bool, err error)

	// UpdateUser applies upd, increments the version and returns the new
	// row. It fails with ErrNotFound, ErrEmailTaken or ErrVersionMismatch.
	UpdateUser(ctx context.Context, id int64, upd UserUpdate) (*User, error)

	// DeleteUser removes the user. It fails with ErrNotFound, or with
	// ErrVersionMismatch when ifVersion > 0 and differs from the stored one.
	DeleteUser(ctx context.Context, id int64, ifVersion int64) error

	// Ping reports whether the database is reachable and its schema is
	// current; it backs /readyz.
	Ping(ctx context.Context) error

	// Close releases the store's connections.
	Close() error
}

// Encoded is a user's JSON response body, encoded once, with its version.
type Encoded struct {
	ID      int64
	Version int64
	JSON    []byte // must not be modified by callers
}

// EncodedReader is implemented by stores that can return a user already
// encoded, such as the cache, so a read does no JSON work. The HTTP layer
// uses it when the store has it.
type EncodedReader interface {
	// GetUserEncoded returns the encoded user, or ErrNotFound.
	GetUserEncoded(ctx context.Context, id int64) (Encoded, error)
}

// Now returns the current time as the service stores it: UTC, truncated to
// microseconds, the precision of every backend's timestamp column.
func Now() time.Time {
	return time.Now().UTC().Truncate(time.Microsecond)
}

// Seeder is implemented by stores that can bulk-load generated users fast
// (COPY on PostgreSQL, multi-row inserts elsewhere) for `userapi seed`.
type Seeder interface {
	// SeedUsers inserts n users made by SeedUser(first..first+n-1), calling
	// progress with the running count now and then.
	SeedUsers(ctx context.Context, first, n int, progress func(done int)) error
}

// SeedUser returns the generated email and name of seed user i, the same in
// every backend so benchmarks can address users by email.
func SeedUser(i int) (email, name string) {
	s := strconv.Itoa(i)
	return "user" + s + "@example.com", "User " + s
}

// Change is one committed change of a users row, as the database's own change
// stream reports it, whoever made the change (the service, psql, a migration,
// another service).
type Change struct {
	ID int64
	// Version is the row's version after the change; 0 for a delete.
	Version int64
	Deleted bool
	// Committed is when the database committed the change, as the database
	// reports it (zero when the stream does not say); the cache measures its
	// invalidation lag from it.
	Committed time.Time
}

// ChangeFeed is implemented by stores that can report every committed change
// of the users table: PostgreSQL by logical replication, MySQL and SQLite by a
// trigger-written change table.
type ChangeFeed interface {
	// FollowChanges delivers committed changes, in commit order, to apply
	// until ctx ends (it then returns ctx's error) or the feed fails. At
	// most one follower in a deployment reads at a time: FollowChanges waits
	// while another holds the lead and takes over when it goes away.
	//
	// A change's position is acknowledged only after apply returned nil for
	// it, so a follower that dies or whose apply fails leaves the change to
	// be delivered again: changes may arrive more than once, never not at
	// all. When changes may have been lost (the stream's position was
	// dropped or recreated, or pruned past the follower), missed is called
	// before any later change, and the caller must forget everything it
	// derived from earlier reads.
	FollowChanges(ctx context.Context, apply func(context.Context, []Change) error, missed func(context.Context) error) error
}
