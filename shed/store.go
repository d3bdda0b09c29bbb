package shed

import (
	"context"

	"userapi"
)

// Store decorates the database store with the Limiter: every per-request
// call is admitted or fails with userapi.ErrOverloaded. It sits between the
// cache and the database, so cache hits never reach it.
type Store struct {
	userapi.Store
	l *Limiter
}

var _ userapi.Store = (*Store)(nil)

// NewStore returns store behind l.
func NewStore(store userapi.Store, l *Limiter) *Store { return &Store{Store: store, l: l} }

// PoolSize is the store's pool size, for the cache's loader count; 0 when
// the store does not say.
func (s *Store) PoolSize() int {
	if p, ok := s.Store.(interface{ PoolSize() int }); ok {
		return p.PoolSize()
	}
	return 0
}

// ReadsReplicas reports whether the store below reads from replicas
// (userapi.ReplicaReader).
func (s *Store) ReadsReplicas() bool {
	rr, ok := s.Store.(userapi.ReplicaReader)
	return ok && rr.ReadsReplicas()
}

// GetUser is one request's read (the cache's uncoalesced miss).
func (s *Store) GetUser(ctx context.Context, id int64) (*userapi.User, error) {
	done, err := s.l.Admit(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	return s.Store.GetUser(ctx, id)
}

// GetUsers is not limited: it is the cache loader's multi-key load, whose
// requests were each admitted by the loader (cache.Config.Admit).
func (s *Store) GetUsers(ctx context.Context, ids []int64) ([]*userapi.User, error) {
	return s.Store.GetUsers(ctx, ids)
}

func (s *Store) ListUsers(ctx context.Context, f userapi.UserFilter) ([]*userapi.User, error) {
	done, err := s.l.Admit(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	return s.Store.ListUsers(ctx, f)
}

func (s *Store) CreateUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	done, err := s.l.Admit(ctx)
	if err != nil {
		return nil, false, err
	}
	defer done()
	return s.Store.CreateUser(ctx, in)
}

func (s *Store) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	done, err := s.l.Admit(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	return s.Store.UpdateUser(ctx, id, upd)
}

func (s *Store) DeleteUser(ctx context.Context, id int64, ifVersion int64) error {
	done, err := s.l.Admit(ctx)
	if err != nil {
		return err
	}
	defer done()
	return s.Store.DeleteUser(ctx, id, ifVersion)
}
