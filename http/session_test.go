package http

import (
	"context"
	"sync"
	"testing"

	"userapi"
)

// replicaStore is a store that says it reads replicas: each write commits
// at the next position, and the session positions reads ask for are kept.
type replicaStore struct {
	userapi.Store
	mu    sync.Mutex
	pos   userapi.Position
	after []userapi.Position // Session.After of each read (0 without a session)
	// primary: whether each GetUser's session asked for the primary
	primary []bool
}

func (r *replicaStore) ReadsReplicas() bool { return true }

func (r *replicaStore) wrote(ctx context.Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pos += 0x100
	if sess := userapi.SessionFrom(ctx); sess != nil {
		sess.Wrote = r.pos
	}
}

func (r *replicaStore) read(ctx context.Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var p userapi.Position
	if sess := userapi.SessionFrom(ctx); sess != nil {
		p = sess.After
	}
	r.after = append(r.after, p)
}

func (r *replicaStore) lastAfter() userapi.Position {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.after[len(r.after)-1]
}

func (r *replicaStore) GetUser(ctx context.Context, id int64) (*userapi.User, error) {
	r.read(ctx)
	r.mu.Lock()
	sess := userapi.SessionFrom(ctx)
	r.primary = append(r.primary, sess != nil && sess.Primary)
	r.mu.Unlock()
	return r.Store.GetUser(ctx, id)
}

func (r *replicaStore) ListUsers(ctx context.Context, f userapi.UserFilter) ([]*userapi.User, error) {
	r.read(ctx)
	return r.Store.ListUsers(ctx, f)
}

func (r *replicaStore) CreateUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	u, replayed, err := r.Store.CreateUser(ctx, in)
	if err == nil {
		r.wrote(ctx)
	}
	return u, replayed, err
}

func (r *replicaStore) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	u, err := r.Store.UpdateUser(ctx, id, upd)
	if err == nil {
		r.wrote(ctx)
	}
	return u, err
}

// TestSessionToken: with a store that reads replicas, a write answers with
// its commit position in X-Session-LSN, a read that sends one back hands
// it to the store, and a malformed one is a 400. Without replicas the
// header is neither sent nor read.
func TestSessionToken(t *testing.T) {
	st := &replicaStore{Store: newSQLiteStore(t)}
	h := NewServer(st, Options{}).Handler()
	resp := serveDirect(t, h, request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"s@example.com","name":"S"}`})
	if resp.status != 201 {
		t.Fatalf("create: %d %s", resp.status, resp.body)
	}
	if got, want := resp.header["X-Session-Lsn"], "0/100"; got != want {
		t.Errorf("create answered X-Session-LSN %q, want %q", got, want)
	}
	resp = serveDirect(t, h, request{method: "PATCH", uri: "/users/1", header: map[string]string{"Content-Type": "application/merge-patch+json", "X-Session-LSN": "0/100"}, body: `{"name":"T"}`})
	if resp.status != 200 {
		t.Fatalf("patch: %d %s", resp.status, resp.body)
	}
	if got, want := resp.header["X-Session-Lsn"], "0/200"; got != want {
		t.Errorf("update answered X-Session-LSN %q, want %q", got, want)
	}

	// An If-Match with several versions reads the current one: from the
	// primary.
	resp = serveDirect(t, h, request{method: "PATCH", uri: "/users/1", header: map[string]string{"Content-Type": "application/merge-patch+json", "If-Match": `"1", "2"`}, body: `{"name":"U"}`})
	if resp.status != 200 {
		t.Fatalf("patch with If-Match: %d %s", resp.status, resp.body)
	}
	st.mu.Lock()
	checked := len(st.primary) > 0 && st.primary[len(st.primary)-1]
	st.mu.Unlock()
	if !checked {
		t.Error("the If-Match check did not ask for the primary")
	}

	for _, uri := range []string{"/users/1", "/users"} {
		resp = serveDirect(t, h, request{method: "GET", uri: uri, header: map[string]string{"X-Session-LSN": "1A/2B0"}})
		if resp.status != 200 {
			t.Fatalf("GET %s: %d %s", uri, resp.status, resp.body)
		}
		if got, want := st.lastAfter(), userapi.Position(0x1A<<32|0x2B0); got != want {
			t.Errorf("GET %s with a token: the store was asked for %v, want %v", uri, got, want)
		}
		if _, ok := resp.header["X-Session-Lsn"]; ok {
			t.Errorf("GET %s answered a token; only writes do", uri)
		}
		serveDirect(t, h, request{method: "GET", uri: uri})
		if got := st.lastAfter(); got != 0 {
			t.Errorf("GET %s without a token: the store was asked for %v", uri, got)
		}
	}
	for _, bad := range []string{"x", "1/", "/1", "1/2/3", "123456789/0", "-1/0", "0x1/0"} {
		resp = serveDirect(t, h, request{method: "GET", uri: "/users/1", header: map[string]string{"X-Session-LSN": bad}})
		if resp.status != 400 || resp.header["Content-Type"] != "application/problem+json" {
			t.Errorf("X-Session-LSN %q: %d %s %s, want a 400 problem", bad, resp.status, resp.header["Content-Type"], resp.body)
		}
	}

	plain := NewServer(newSQLiteStore(t), Options{}).Handler()
	resp = serveDirect(t, plain, request{method: "POST", uri: "/users", header: map[string]string{"Content-Type": "application/json", "X-Session-LSN": "x"}, body: `{"email":"p@example.com","name":"P"}`})
	if resp.status != 201 {
		t.Fatalf("create without replicas, with a malformed token: %d %s", resp.status, resp.body)
	}
	if _, ok := resp.header["X-Session-Lsn"]; ok {
		t.Error("a store without replicas answered a token")
	}
}
