// Package auth authenticates requests (SPEC.md "Security and limits"): API
// keys issued by this service, verified against the api_keys table of the
// store, and bearer JWTs from an identity provider, verified with its JWKS
// or a public key file. Verified credentials are kept in memory, so the
// check of a known credential does no I/O and no allocation; revocations
// reach every instance through a periodic check of the table's revision.
//
// The HTTP layer calls Authenticator.Authenticate with the Authorization
// header and decides scopes; this package never sees a request.
package auth

import (
	"bytes"
	"context"
	"fmt"
	"time"

	"userapi"
)

// Authenticator checks API keys and, when configured, bearer JWTs.
type Authenticator struct {
	*Keys
	jwt *jwtVerifier // nil when no identity provider is configured
}

// Config configures an Authenticator.
type Config struct {
	Keys KeysConfig
	JWT  JWTConfig
}

// New returns an Authenticator over store's API keys. Close stops its
// background work.
func New(ctx context.Context, store userapi.KeyStore, cfg Config) (*Authenticator, error) {
	keys, err := NewKeys(ctx, store, cfg.Keys)
	if err != nil {
		return nil, err
	}
	a := &Authenticator{Keys: keys}
	if cfg.JWT.Enabled() {
		if a.jwt, err = newJWTVerifier(ctx, cfg.JWT); err != nil {
			keys.Close()
			return nil, fmt.Errorf("bearer tokens: %w", err)
		}
	}
	return a, nil
}

// Close stops the background work (and writes the keys' last uses).
func (a *Authenticator) Close() {
	a.Keys.Close()
	if a.jwt != nil {
		a.jwt.close()
	}
}

var bearer = []byte("bearer ")

// Authenticate returns the principal of an Authorization header value,
// "Bearer <API key>" or "Bearer <JWT>". It fails with an error wrapping
// userapi.ErrUnauthenticated for anything else, and with ErrUnavailable
// when the credential cannot be checked now (database or JWKS down).
func (a *Authenticator) Authenticate(ctx context.Context, authorization []byte, now time.Time) (*userapi.Principal, error) {
	if len(authorization) < len(bearer) || !bytes.EqualFold(authorization[:len(bearer)], bearer) {
		return nil, errScheme
	}
	cred := bytes.TrimLeft(authorization[len(bearer):], " ")
	if bytes.HasPrefix(cred, keyPrefix) {
		return a.Keys.Authenticate(ctx, cred, now)
	}
	if a.jwt == nil {
		return nil, errNoJWT
	}
	return a.jwt.authenticate(ctx, cred, now)
}

var (
	keyPrefix = []byte(KeyPrefix)
	errScheme = fmt.Errorf("%w: Authorization is not a Bearer credential", userapi.ErrUnauthenticated)
	errNoJWT  = fmt.Errorf("%w: not an api key, and bearer tokens are not configured", userapi.ErrUnauthenticated)
)
