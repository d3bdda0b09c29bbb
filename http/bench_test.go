package http

import (
	"context"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"userapi"
)

// fixedStore serves one user and nothing else; it stands in for a warm
// cache so the benchmark measures only the HTTP layer.
type fixedStore struct {
	userapi.Store // nil: only the methods below are called
	user          *userapi.User
}

func (f *fixedStore) GetUser(_ context.Context, id int64) (*userapi.User, error) {
	if id != f.user.ID {
		return nil, userapi.ErrNotFound
	}
	return f.user, nil
}

func (f *fixedStore) Ping(context.Context) error { return nil }

// encodedStore adds the cache's fast path.
type encodedStore struct {
	fixedStore
	enc userapi.Encoded
}

func (e *encodedStore) GetUserEncoded(_ context.Context, id int64) (userapi.Encoded, error) {
	if id != e.enc.ID {
		return userapi.Encoded{}, userapi.ErrNotFound
	}
	return e.enc, nil
}

func benchUser() *userapi.User {
	t := time.Date(2026, 11, 25, 18, 50, 0, 123456000, time.UTC)
	return &userapi.User{ID: 12345, Email: "user12345@example.com", Name: "User 12345", CreatedAt: t, UpdatedAt: t, Version: 1}
}

// BenchmarkGetUser drives the whole handler chain (request id, routing,
// deadline, handler, metrics) for GET /users/{id} on a reused RequestCtx,
// as fasthttp.Server does, without the network.
func BenchmarkGetUser(b *testing.B) {
	u := benchUser()
	stores := []struct {
		name  string
		store userapi.Store
	}{
		{"encoded", &encodedStore{fixedStore{user: u}, u.Encode()}},
		{"store", &fixedStore{user: u}},
	}
	for _, st := range stores {
		b.Run(st.name, func(b *testing.B) {
			h := NewServer(st.store, Options{}).Handler()
			var req fasthttp.Request
			req.SetRequestURI("/users/12345")
			req.Header.Set("Accept-Encoding", "gzip")
			var rc fasthttp.RequestCtx
			rc.Init(&req, nil, nil)
			b.ReportAllocs()
			for b.Loop() {
				rc.Response.Reset()
				h(&rc)
			}
			if rc.Response.StatusCode() != 200 {
				b.Fatalf("status %d: %s", rc.Response.StatusCode(), rc.Response.Body())
			}
		})
	}
}
