package main

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"userapi"
	"userapi/auth"
	"userapi/http"
)

// errStarting answers requests that arrive before the database is open.
var errStarting = fmt.Errorf("starting: database not open yet: %w", userapi.ErrUnavailable)

// cachedStore is what the HTTP layer serves from: the cache over a store.
type cachedStore interface {
	userapi.Store
	userapi.EncodedReader
}

// lateStore lets the server listen before the database is reachable: until
// set, every call fails with an error wrapping userapi.ErrUnavailable, so
// /readyz answers 503 and requests get 503 with Retry-After instead of a
// refused connection.
type lateStore struct {
	p atomic.Pointer[cachedStore]
	// replicas: the store will read replicas (--db-replica), so the HTTP
	// layer carries session tokens from the first request on.
	replicas bool
}

var (
	_ cachedStore           = (*lateStore)(nil)
	_ userapi.ReplicaReader = (*lateStore)(nil)
)

// ReadsReplicas is known from the configuration before the store is open.
func (l *lateStore) ReadsReplicas() bool { return l.replicas }

func (l *lateStore) set(s cachedStore) { l.p.Store(&s) }

func (l *lateStore) get() cachedStore {
	if p := l.p.Load(); p != nil {
		return *p
	}
	return nil
}

func (l *lateStore) GetUserEncoded(ctx context.Context, id int64) (userapi.Encoded, error) {
	if s := l.get(); s != nil {
		return s.GetUserEncoded(ctx, id)
	}
	return userapi.Encoded{}, errStarting
}

func (l *lateStore) GetUser(ctx context.Context, id int64) (*userapi.User, error) {
	if s := l.get(); s != nil {
		return s.GetUser(ctx, id)
	}
	return nil, errStarting
}

func (l *lateStore) GetUsers(ctx context.Context, ids []int64) ([]*userapi.User, error) {
	if s := l.get(); s != nil {
		return s.GetUsers(ctx, ids)
	}
	return nil, errStarting
}

func (l *lateStore) ListUsers(ctx context.Context, f userapi.UserFilter) ([]*userapi.User, error) {
	if s := l.get(); s != nil {
		return s.ListUsers(ctx, f)
	}
	return nil, errStarting
}

func (l *lateStore) CreateUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	if s := l.get(); s != nil {
		return s.CreateUser(ctx, in)
	}
	return nil, false, errStarting
}

func (l *lateStore) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	if s := l.get(); s != nil {
		return s.UpdateUser(ctx, id, upd)
	}
	return nil, errStarting
}

func (l *lateStore) DeleteUser(ctx context.Context, id int64, ifVersion int64) error {
	if s := l.get(); s != nil {
		return s.DeleteUser(ctx, id, ifVersion)
	}
	return errStarting
}

func (l *lateStore) Ping(ctx context.Context) error {
	if s := l.get(); s != nil {
		return s.Ping(ctx)
	}
	return errStarting
}

// Close does nothing: serve closes the cache and the store it opened.
func (l *lateStore) Close() error { return nil }

// lateAuth is the authenticator and key admin the server starts with: until
// set, every credential check fails with errStarting (503), like lateStore.
type lateAuth struct {
	p atomic.Pointer[auth.Authenticator]
}

var (
	_ http.Authenticator = (*lateAuth)(nil)
	_ http.KeyAdmin      = (*lateAuth)(nil)
)

func (l *lateAuth) set(a *auth.Authenticator) { l.p.Store(a) }

func (l *lateAuth) Authenticate(ctx context.Context, authorization []byte, now time.Time) (*userapi.Principal, error) {
	if a := l.p.Load(); a != nil {
		return a.Authenticate(ctx, authorization, now)
	}
	return nil, errStarting
}

func (l *lateAuth) Create(ctx context.Context, in userapi.KeyCreate) (string, *userapi.APIKey, error) {
	if a := l.p.Load(); a != nil {
		return a.Create(ctx, in)
	}
	return "", nil, errStarting
}

func (l *lateAuth) List(ctx context.Context) ([]*userapi.APIKey, error) {
	if a := l.p.Load(); a != nil {
		return a.List(ctx)
	}
	return nil, errStarting
}

func (l *lateAuth) Revoke(ctx context.Context, id int64) (*userapi.APIKey, error) {
	if a := l.p.Load(); a != nil {
		return a.Revoke(ctx, id)
	}
	return nil, errStarting
}
