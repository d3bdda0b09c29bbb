package userapi

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Scope is one permission a credential grants. A Scope value is a set of
// them (a bit mask), so a check is one AND.
type Scope uint8

// The scopes of SPEC.md "Security and limits". admin does not imply the
// others: a key that manages keys reads users only if it also has
// users:read.
const (
	ScopeUsersRead  Scope = 1 << iota // GET /users, GET /users/{id}
	ScopeUsersWrite                   // POST, PUT, PATCH, DELETE on users
	ScopeAdmin                        // /admin/keys

	// ScopeAll is every scope; the first key of a new deployment has it.
	ScopeAll = ScopeUsersRead | ScopeUsersWrite | ScopeAdmin
)

var scopeNames = []struct {
	scope Scope
	name  string
}{
	{ScopeUsersRead, "users:read"},
	{ScopeUsersWrite, "users:write"},
	{ScopeAdmin, "admin"},
}

// ParseScope parses one scope name ("users:read", "users:write", "admin").
func ParseScope(name string) (Scope, error) {
	for _, s := range scopeNames {
		if s.name == name {
			return s.scope, nil
		}
	}
	return 0, fmt.Errorf("unknown scope %q (want users:read, users:write or admin)", name)
}

// ParseScopes parses a list of scope names separated by commas or spaces
// (the OAuth "scope" claim uses spaces). Unknown names are an error.
func ParseScopes(list string) (Scope, error) {
	var all Scope
	for _, name := range strings.FieldsFunc(list, func(r rune) bool { return r == ',' || r == ' ' }) {
		s, err := ParseScope(name)
		if err != nil {
			return 0, err
		}
		all |= s
	}
	return all, nil
}

// Has reports whether s holds every scope of want.
func (s Scope) Has(want Scope) bool { return s&want == want }

// Names lists the scopes of s in a fixed order.
func (s Scope) Names() []string {
	names := []string{}
	for _, n := range scopeNames {
		if s&n.scope != 0 {
			names = append(names, n.name)
		}
	}
	return names
}

// String is the scopes of s separated by spaces, as an OAuth scope claim
// and a WWW-Authenticate scope parameter write them.
func (s Scope) String() string { return strings.Join(s.Names(), " ") }

// Principal is the authenticated caller of a request. The HTTP layer puts
// it on the request for later middleware (the rate limiter keys on ID).
// A Principal is shared between requests and must not be modified.
type Principal struct {
	// ID names the credential: "key:<id>" for an API key, "jwt:<sub>" for
	// a bearer token from the identity provider.
	ID     string
	Scopes Scope
	// RateLimit (requests per second) and RateBurst are the key's own rate
	// limit; 0 means the configured default.
	RateLimit float64
	RateBurst int
}

// KeyPrincipalID is the Principal.ID of the API key with id.
func KeyPrincipalID(id int64) string { return "key:" + strconv.FormatInt(id, 10) }

// APIKey is one row of the api_keys table: everything about a key except
// its secret, of which only the SHA-256 hash is stored.
type APIKey struct {
	ID     int64
	Name   string
	Scopes Scope
	// Hash is the SHA-256 of the key's secret part (32 bytes).
	Hash []byte
	// CreatedAt is set by CreateKey. LastUsedAt, ExpiresAt and RevokedAt
	// are zero for never used, never expires and not revoked.
	CreatedAt  time.Time
	LastUsedAt time.Time
	ExpiresAt  time.Time
	RevokedAt  time.Time
	// RateLimit and RateBurst are the key's own rate limit (NULL in the
	// database, 0 here, for the configured default).
	RateLimit float64
	RateBurst int
}

// Usable reports whether the key may authenticate at now: not revoked and
// not expired.
func (k *APIKey) Usable(now time.Time) bool {
	return k.RevokedAt.IsZero() && (k.ExpiresAt.IsZero() || now.Before(k.ExpiresAt))
}

// KeyCreate is the input of creating an API key.
type KeyCreate struct {
	Name      string    // 1..200 characters
	Scopes    Scope     // at least one
	ExpiresAt time.Time // zero: never; else in the future
	RateLimit float64   // requests per second; 0: the configured default
	RateBurst int       // 0: the configured default
}

// Validate reports every invalid field of in as a *ValidationError.
func (in KeyCreate) Validate(now time.Time) error {
	var v ValidationError
	if n := utf8.RuneCountInString(in.Name); n < 1 || n > 200 || !utf8.ValidString(in.Name) {
		v.add("name", "must be 1 to 200 characters")
	}
	if in.Scopes == 0 || in.Scopes&^ScopeAll != 0 {
		v.add("scopes", "must name at least one of users:read, users:write, admin")
	}
	if !in.ExpiresAt.IsZero() && !in.ExpiresAt.After(now) {
		v.add("expires_at", "must be in the future")
	}
	if in.RateLimit < 0 {
		v.add("rate_limit", "must not be negative")
	}
	if in.RateBurst < 0 {
		v.add("rate_burst", "must not be negative")
	}
	return v.orNil()
}

// KeyUse is a key's latest use, written to last_used_at in batches.
type KeyUse struct {
	ID int64
	At time.Time
}

// KeysRevision summarizes the api_keys table so that any revocation (or a
// removed row) changes it; instances poll it to drop keys they verified
// before. Compare two with ==.
type KeysRevision struct {
	Keys        int64
	Revoked     int64
	LastRevoked time.Time
}

// KeyStore is the contract of the API key table, implemented by every
// database store (not by the cache: keys are cached by the authenticator,
// which must see revocations within its bound).
type KeyStore interface {
	// CreateKey inserts k (its ID and CreatedAt are ignored) and returns
	// the stored key with its ID and CreatedAt.
	CreateKey(ctx context.Context, k APIKey) (*APIKey, error)

	// GetKey returns the key with id, or ErrKeyNotFound.
	GetKey(ctx context.Context, id int64) (*APIKey, error)

	// ListKeys returns every key, revoked ones included, in id order.
	ListKeys(ctx context.Context) ([]*APIKey, error)

	// RevokeKey sets the key's revoked_at to at and returns the key. A key
	// revoked before keeps its first revocation time. It fails with
	// ErrKeyNotFound.
	RevokeKey(ctx context.Context, id int64, at time.Time) (*APIKey, error)

	// TouchKeys moves each key's last_used_at forward to its use's time
	// (never backward); unknown ids are ignored.
	TouchKeys(ctx context.Context, uses []KeyUse) error

	// KeysRevision returns the table's current revision.
	KeysRevision(ctx context.Context) (KeysRevision, error)
}

// Errors of authentication and key management.
var (
	// ErrUnauthenticated means the request's credential is missing, not a
	// credential this service issued or trusts, revoked or expired. The
	// HTTP layer answers 401 and says no more than that.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrKeyNotFound means no API key has the id.
	ErrKeyNotFound = errors.New("api key not found")
)
