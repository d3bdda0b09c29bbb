package http

import (
	"context"
	"testing"

	"github.com/valyala/fasthttp"

	"userapi"
	"userapi/auth"
	"userapi/internal/testenv"
)

// authCases are the cached read GET /users/{id} without authentication,
// with an API key and with a bearer JWT, each verified once before (as on
// a busy instance, where nearly every request's credential is cached).
func authCases(tb testing.TB) []struct {
	name   string
	opts   Options
	header string
} {
	tb.Helper()
	keys := newSQLiteStore(tb)
	idp := testenv.NewIdP(tb)
	a, err := auth.New(context.Background(), keys, auth.Config{
		JWT: auth.JWTConfig{PublicKeyFile: idp.PublicKeyFile, Issuer: idp.Issuer, Audience: idp.Audience},
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(a.Close)
	key, _, err := a.Create(context.Background(), userapi.KeyCreate{Name: "bench", Scopes: userapi.ScopeUsersRead})
	if err != nil {
		tb.Fatal(err)
	}
	on := Options{Auth: a, Keys: a}
	return []struct {
		name   string
		opts   Options
		header string
	}{
		{"auth-off", Options{}, ""},
		{"api-key", on, "Bearer " + key},
		{"jwt", on, "Bearer " + idp.Token(tb, testenv.Claims{"scope": "users:read"})},
	}
}

// BenchmarkGetUserAuth is the cached read through the whole chain with
// and without authentication: what the check adds per request.
func BenchmarkGetUserAuth(b *testing.B) {
	u := benchUser()
	for _, c := range authCases(b) {
		b.Run(c.name, func(b *testing.B) {
			h := NewServer(&encodedStore{fixedStore{user: u}, u.Encode()}, c.opts).Handler()
			var req fasthttp.Request
			req.SetRequestURI("/users/12345")
			if c.header != "" {
				req.Header.Set("Authorization", c.header)
			}
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

// TestAuthAllocs checks that authenticating a credential verified before
// allocates nothing: the cached read stays allocation-free with
// authentication on.
func TestAuthAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector makes sync.Pool drop items, so pooled buffers allocate")
	}
	u := benchUser()
	for _, c := range authCases(t) {
		h := NewServer(&encodedStore{fixedStore{user: u}, u.Encode()}, c.opts).Handler()
		var req fasthttp.Request
		req.SetRequestURI("/users/12345")
		if c.header != "" {
			req.Header.Set("Authorization", c.header)
		}
		var rc fasthttp.RequestCtx
		rc.Init(&req, nil, nil)
		h(&rc) // verifies and caches the credential
		allocs := testing.AllocsPerRun(1000, func() {
			rc.Response.Reset()
			h(&rc)
		})
		if rc.Response.StatusCode() != 200 {
			t.Fatalf("%s: status %d %s", c.name, rc.Response.StatusCode(), rc.Response.Body())
		}
		if allocs != 0 {
			t.Errorf("%s: GET /users/{id} allocates %v times per request", c.name, allocs)
		}
		if c.header != "" && PrincipalOf(&rc) == nil {
			t.Errorf("%s: no principal on the request", c.name)
		}
	}
}
