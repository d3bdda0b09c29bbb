package http

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"userapi"
	"userapi/internal/sqlitetest"
	"userapi/internal/testenv"
	"userapi/sqlite"
)

// newSQLiteStore returns a fresh, migrated SQLite store in a temporary
// directory, closed when the test ends.
func newSQLiteStore(tb testing.TB) *sqlite.Store {
	tb.Helper()
	st, _ := sqlitetest.Open(tb)
	return st
}

// faultStore decorates a real store: while fail is set every call returns
// it; while block is set calls wait for their context to end; while
// panicking calls panic. It lets tests reach 500, 503 and the deadline.
type faultStore struct {
	userapi.Store
	mu       sync.Mutex
	fail     error
	block    bool
	panicMsg string
}

func (f *faultStore) set(fail error, block bool, panicMsg string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail, f.block, f.panicMsg = fail, block, panicMsg
}

func (f *faultStore) fault(ctx context.Context) error {
	f.mu.Lock()
	fail, block, msg := f.fail, f.block, f.panicMsg
	f.mu.Unlock()
	if msg != "" {
		panic(msg)
	}
	if block {
		<-ctx.Done()
		return ctx.Err()
	}
	return fail
}

func (f *faultStore) GetUser(ctx context.Context, id int64) (*userapi.User, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.Store.GetUser(ctx, id)
}

func (f *faultStore) ListUsers(ctx context.Context, filter userapi.UserFilter) ([]*userapi.User, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.Store.ListUsers(ctx, filter)
}

func (f *faultStore) CreateUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	if err := f.fault(ctx); err != nil {
		return nil, false, err
	}
	return f.Store.CreateUser(ctx, in)
}

func (f *faultStore) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.Store.UpdateUser(ctx, id, upd)
}

func (f *faultStore) DeleteUser(ctx context.Context, id int64, ifVersion int64) error {
	if err := f.fault(ctx); err != nil {
		return err
	}
	return f.Store.DeleteUser(ctx, id, ifVersion)
}

func (f *faultStore) Ping(ctx context.Context) error {
	if err := f.fault(ctx); err != nil {
		return err
	}
	return f.Store.Ping(ctx)
}

// The api_keys methods, with the same faults, so tests reach the admin
// routes' 500 and 503.

func (f *faultStore) keys() userapi.KeyStore { return f.Store.(userapi.KeyStore) }

func (f *faultStore) CreateKey(ctx context.Context, k userapi.APIKey) (*userapi.APIKey, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.keys().CreateKey(ctx, k)
}

func (f *faultStore) GetKey(ctx context.Context, id int64) (*userapi.APIKey, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.keys().GetKey(ctx, id)
}

func (f *faultStore) ListKeys(ctx context.Context) ([]*userapi.APIKey, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.keys().ListKeys(ctx)
}

func (f *faultStore) RevokeKey(ctx context.Context, id int64, at time.Time) (*userapi.APIKey, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.keys().RevokeKey(ctx, id, at)
}

func (f *faultStore) TouchKeys(ctx context.Context, uses []userapi.KeyUse) error {
	if err := f.fault(ctx); err != nil {
		return err
	}
	return f.keys().TouchKeys(ctx, uses)
}

func (f *faultStore) KeysRevision(ctx context.Context) (userapi.KeysRevision, error) {
	if err := f.fault(ctx); err != nil {
		return userapi.KeysRevision{}, err
	}
	return f.keys().KeysRevision(ctx)
}

// encodingStore adds GetUserEncoded to a store, the way the cache does,
// so the handlers' fast path runs against real data.
type encodingStore struct{ userapi.Store }

func (e encodingStore) GetUserEncoded(ctx context.Context, id int64) (userapi.Encoded, error) {
	u, err := e.GetUser(ctx, id)
	if err != nil {
		return userapi.Encoded{}, err
	}
	return u.Encode(), nil
}

func testLogger(buf *testenv.Buffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// request is one request driven straight into a handler.
type request struct {
	method, uri string
	header      map[string]string
	body        string
	remote      string // peer address, 127.0.0.1 by default
}

// response is what a handler answered.
type response struct {
	status int
	header map[string]string // canonical names
	body   []byte
}

func (r response) json(tb testing.TB) map[string]any {
	tb.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		tb.Fatalf("body %q is not a JSON object: %v", r.body, err)
	}
	return m
}

// serveDirect runs h on a fresh RequestCtx, as fasthttp.Server would
// without the network.
func serveDirect(tb testing.TB, h fasthttp.RequestHandler, r request) response {
	tb.Helper()
	var req fasthttp.Request
	req.Header.SetMethod(r.method)
	req.SetRequestURI(r.uri)
	for k, v := range r.header {
		if strings.EqualFold(k, "Content-Type") {
			req.Header.SetContentType(v)
			continue
		}
		req.Header.Set(k, v)
	}
	if r.body != "" {
		req.SetBodyString(r.body)
	}
	remote := r.remote
	if remote == "" {
		remote = "127.0.0.1"
	}
	var rc fasthttp.RequestCtx
	rc.Init(&req, &net.TCPAddr{IP: net.ParseIP(remote), Port: 40000}, nil)
	h(&rc)
	resp := response{status: rc.Response.StatusCode(), header: map[string]string{}}
	for k, v := range rc.Response.Header.All() {
		resp.header[string(k)] = string(v)
	}
	resp.header["Content-Type"] = string(rc.Response.Header.ContentType())
	if ce := rc.Response.Header.ContentEncoding(); len(ce) > 0 {
		resp.header["Content-Encoding"] = string(ce)
		b, err := rc.Response.BodyUncompressed()
		if err != nil {
			tb.Fatalf("%s %s: undecodable %s body: %v", r.method, r.uri, ce, err)
		}
		resp.body = b
	} else {
		resp.body = append([]byte(nil), rc.Response.Body()...)
	}
	return resp
}
