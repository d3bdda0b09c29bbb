package http

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"userapi"
	"userapi/auth"
	"userapi/internal/testenv"
	"userapi/sqlite"
)

// authEnv is a server with authentication on over a real SQLite store,
// API keys of every kind and an identity provider of its own.
type authEnv struct {
	srv   *Server
	store *sqlite.Store
	idp   *testenv.IdP
	creds map[string]string // credential name → Authorization value
	users atomic.Int64      // numbers unique emails
}

func newAuthEnv(t *testing.T) *authEnv {
	t.Helper()
	st := newSQLiteStore(t)
	idp := testenv.NewIdP(t)
	a, err := auth.New(context.Background(), st, auth.Config{
		JWT: auth.JWTConfig{PublicKeyFile: idp.PublicKeyFile, Issuer: idp.Issuer, Audience: idp.Audience},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	e := &authEnv{store: st, idp: idp, creds: map[string]string{}}
	e.srv = NewServer(encodingStore{st}, Options{Auth: a, Keys: a})

	key := func(name string, scopes userapi.Scope, expires time.Time) string {
		secret, _, err := a.Create(context.Background(), userapi.KeyCreate{Name: name, Scopes: scopes, ExpiresAt: expires})
		if err != nil {
			t.Fatal(err)
		}
		return secret
	}
	bearer := func(s string) string { return "Bearer " + s }
	e.creds["read key"] = bearer(key("read", userapi.ScopeUsersRead, time.Time{}))
	e.creds["write key"] = bearer(key("write", userapi.ScopeUsersWrite, time.Time{}))
	e.creds["admin key"] = bearer(key("admin", userapi.ScopeAdmin, time.Time{}))
	expiring := key("expired", userapi.ScopeAll, time.Now().Add(time.Second))
	revoked := key("revoked", userapi.ScopeAll, time.Time{})
	id := keyID(t, revoked)
	// Verified (and cached) before the revoke, as on a busy instance.
	if r := serveDirect(t, e.srv.Handler(), request{method: "GET", uri: "/users", header: map[string]string{"Authorization": bearer(revoked)}}); r.status != 200 {
		t.Fatalf("revoked key before its revoke: %d", r.status)
	}
	if _, err := a.Revoke(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	e.creds["revoked key"] = bearer(revoked)
	e.creds["expired key"] = bearer(expiring)
	// A well-formed key with a correct checksum whose id has no row, and
	// one with a row but another secret.
	e.creds["unknown key"] = bearer(testenv.APIKey(987654, strings.Repeat("Q", 32)))
	e.creds["wrong secret"] = bearer(testenv.APIKey(keyID(t, strings.TrimPrefix(e.creds["admin key"], "Bearer ")), strings.Repeat("Q", 32)))
	good := strings.TrimPrefix(e.creds["read key"], "Bearer ")
	e.creds["bad checksum"] = bearer(good[:len(good)-1] + flip(good[len(good)-1]))
	e.creds["not a key"] = bearer("hunter2")
	e.creds["basic scheme"] = "Basic dXNlcjpwYXNz"

	e.creds["jwt read"] = bearer(idp.Token(t, testenv.Claims{"scope": "openid users:read"}))
	e.creds["jwt write"] = bearer(idp.Token(t, testenv.Claims{"scp": []string{"users:write"}}))
	e.creds["jwt admin"] = bearer(idp.Token(t, testenv.Claims{"scope": "admin"}))
	e.creds["expired jwt"] = bearer(idp.Token(t, testenv.Claims{"scope": "users:read users:write admin", "exp": time.Now().Add(-2 * time.Minute).Unix()}))
	e.creds["jwt without exp"] = bearer(idp.Token(t, testenv.Claims{"scope": "users:read", "exp": nil}))
	e.creds["wrong audience"] = bearer(idp.Token(t, testenv.Claims{"scope": "users:read users:write admin", "aud": "another-service"}))
	e.creds["wrong issuer"] = bearer(idp.Token(t, testenv.Claims{"scope": "users:read users:write admin", "iss": "https://evil.example/"}))
	e.creds["untrusted key"] = bearer(idp.OtherKeyToken(t, testenv.Claims{"scope": "users:read users:write admin"}))
	e.creds["alg none"] = bearer(idp.NoneToken(t, testenv.Claims{"scope": "users:read users:write admin"}))
	e.creds["HS256 with the public key"] = bearer(idp.HS256PublicKeyToken(t, testenv.Claims{"scope": "users:read users:write admin"}))
	// Let the expiring key expire.
	time.Sleep(time.Until(time.Now().Add(1100 * time.Millisecond)))
	return e
}

func keyID(t *testing.T, key string) int64 {
	t.Helper()
	var id int64
	if _, err := fmt.Sscanf(key, "uak_%d_", &id); err != nil {
		t.Fatalf("key %q: %v", key, err)
	}
	return id
}

func flip(c byte) string {
	if c == 'A' {
		return "B"
	}
	return "A"
}

// TestScopeMatrix sends every route every kind of credential and checks
// the status and problem type: 401 (with WWW-Authenticate) for a missing
// or bad credential whatever is wrong with it, 403 (with the missing scope)
// for a good one without the route's scope, the handler's own answer
// otherwise, and no credential needed on the open routes.
func TestScopeMatrix(t *testing.T) {
	e := newAuthEnv(t)
	u, _, err := e.store.CreateUser(context.Background(), userapi.UserCreate{Email: "matrix@example.com", Name: "M"})
	if err != nil {
		t.Fatal(err)
	}
	target := fmt.Sprintf("/users/%d", u.ID)

	type route struct {
		method, uri, body, contentType string
		scope                          userapi.Scope
	}
	routes := []route{
		{"GET", "/users", "", "", userapi.ScopeUsersRead},
		{"GET", target, "", "", userapi.ScopeUsersRead},
		{"HEAD", target, "", "", userapi.ScopeUsersRead},
		{"POST", "/users", `{"email":"new-%d@example.com","name":"N"}`, "application/json", userapi.ScopeUsersWrite},
		{"PUT", target, `{"email":"matrix@example.com","name":"P%d"}`, "application/json", userapi.ScopeUsersWrite},
		{"PATCH", target, `{"name":"Q%d"}`, "application/merge-patch+json", userapi.ScopeUsersWrite},
		{"DELETE", "/users/987654321", "", "", userapi.ScopeUsersWrite}, // 404 once past authentication
		{"POST", "/admin/keys", `{"name":"k%d","scopes":["users:read"]}`, "application/json", userapi.ScopeAdmin},
		{"GET", "/admin/keys", "", "", userapi.ScopeAdmin},
		{"DELETE", "/admin/keys/987654321", "", "", userapi.ScopeAdmin}, // 404 once past authentication
		{"GET", "/livez", "", "", 0},
		{"GET", "/readyz", "", "", 0},
		{"GET", "/openapi.json", "", "", 0},
	}
	creds := []struct {
		name   string
		scopes userapi.Scope // 0 with valid false: refused with 401
		valid  bool
	}{
		{"none", 0, false},
		{"not a key", 0, false},
		{"basic scheme", 0, false},
		{"unknown key", 0, false},
		{"wrong secret", 0, false},
		{"bad checksum", 0, false},
		{"revoked key", 0, false},
		{"expired key", 0, false},
		{"expired jwt", 0, false},
		{"jwt without exp", 0, false},
		{"wrong audience", 0, false},
		{"wrong issuer", 0, false},
		{"untrusted key", 0, false},
		{"alg none", 0, false},
		{"HS256 with the public key", 0, false},
		{"read key", userapi.ScopeUsersRead, true},
		{"write key", userapi.ScopeUsersWrite, true},
		{"admin key", userapi.ScopeAdmin, true},
		{"jwt read", userapi.ScopeUsersRead, true},
		{"jwt write", userapi.ScopeUsersWrite, true},
		{"jwt admin", userapi.ScopeAdmin, true},
	}
	for _, c := range creds {
		for _, rt := range routes {
			t.Run(c.name+"/"+rt.method+" "+rt.uri, func(t *testing.T) {
				req := request{method: rt.method, uri: rt.uri, header: map[string]string{}}
				if c.name != "none" {
					req.header["Authorization"] = e.creds[c.name]
				}
				if rt.body != "" {
					req.body = fmt.Sprintf(rt.body, e.users.Add(1))
					req.header["Content-Type"] = rt.contentType
				}
				r := serveDirect(t, e.srv.Handler(), req)
				switch {
				case rt.scope == 0:
					if r.status != 200 {
						t.Errorf("open route = %d, want 200", r.status)
					}
				case !c.valid:
					wantChallenge := `Bearer realm="userapi", error="invalid_token"`
					if c.name == "none" {
						wantChallenge = `Bearer realm="userapi"`
					}
					if r.status != 401 || r.header["WWW-Authenticate"] != wantChallenge {
						t.Errorf("= %d WWW-Authenticate %q, want 401 with %q", r.status, r.header["WWW-Authenticate"], wantChallenge)
					}
					checkAuthProblem(t, r, 401, "urn:userapi:problem:unauthenticated")
				case !c.scopes.Has(rt.scope):
					if r.status != 403 || !strings.Contains(r.header["WWW-Authenticate"], `error="insufficient_scope", scope="`+rt.scope.String()+`"`) {
						t.Errorf("= %d WWW-Authenticate %q, want 403 naming scope %s", r.status, r.header["WWW-Authenticate"], rt.scope)
					}
					checkAuthProblem(t, r, 403, "urn:userapi:problem:forbidden")
				default:
					if r.status == 401 || r.status == 403 || r.status >= 500 {
						t.Errorf("= %d %s, want the handler's answer", r.status, r.body)
					}
				}
			})
		}
	}
}

func checkAuthProblem(t *testing.T, r response, status int, typ string) {
	t.Helper()
	if r.status != status || r.header["Content-Type"] != "application/problem+json" {
		t.Errorf("= %d %s, want %d problem+json", r.status, r.header["Content-Type"], status)
		return
	}
	if r.status == 0 || len(r.body) == 0 { // HEAD has no body
		return
	}
	p := r.json(t)
	if p["type"] != typ || p["status"] != float64(status) {
		t.Errorf("problem %v, want type %s status %d", p, typ, status)
	}
}

// TestBadCredentialsAnswerAlike checks that an unknown, revoked, expired
// and wrongly signed credential get byte-identical answers: nothing tells
// a caller which of them it holds.
func TestBadCredentialsAnswerAlike(t *testing.T) {
	e := newAuthEnv(t)
	var first string
	for _, name := range []string{"unknown key", "wrong secret", "revoked key", "expired key", "bad checksum", "expired jwt", "wrong issuer", "alg none"} {
		r := serveDirect(t, e.srv.Handler(), request{method: "GET", uri: "/users", header: map[string]string{"Authorization": e.creds[name]}})
		got := fmt.Sprint(r.status, r.header["WWW-Authenticate"], string(r.body))
		if first == "" {
			first = got
		} else if got != first {
			t.Errorf("%s answers %q, others %q", name, got, first)
		}
	}
}

// TestAdminKeys creates, lists and revokes a key through the admin routes;
// the secret is shown once, and the revoked key is refused at once.
func TestAdminKeys(t *testing.T) {
	e := newAuthEnv(t)
	h := e.srv.Handler()
	admin := map[string]string{"Authorization": e.creds["admin key"], "Content-Type": "application/json"}
	r := serveDirect(t, h, request{method: "POST", uri: "/admin/keys", header: admin,
		body: `{"name":"ci","scopes":["users:read","users:write"],"expires_at":"2099-01-01T00:00:00Z","rate_limit":50,"rate_burst":100}`})
	if r.status != 201 || r.header["Cache-Control"] != "no-store" {
		t.Fatalf("POST /admin/keys = %d %s (Cache-Control %q)", r.status, r.body, r.header["Cache-Control"])
	}
	created := r.json(t)
	secret, _ := created["key"].(string)
	if !auth.LooksLikeKey(secret) || created["rate_limit"] != 50.0 || created["expires_at"] != "2099-01-01T00:00:00.000000Z" {
		t.Fatalf("created key %v", created)
	}
	if r.header["Location"] != fmt.Sprintf("/admin/keys/%v", created["id"]) {
		t.Errorf("Location %q", r.header["Location"])
	}
	user := map[string]string{"Authorization": "Bearer " + secret}
	if r := serveDirect(t, h, request{method: "GET", uri: "/users", header: user}); r.status != 200 {
		t.Errorf("new key GET /users = %d", r.status)
	}
	r = serveDirect(t, h, request{method: "GET", uri: "/admin/keys", header: admin})
	if r.status != 200 || strings.Contains(string(r.body), secret) || strings.Contains(string(r.body), `"key"`) {
		t.Errorf("GET /admin/keys = %d %s; want the list without secrets", r.status, r.body)
	}
	if !regexp.MustCompile(`"name":"ci","scopes":\["users:read","users:write"\]`).Match(r.body) {
		t.Errorf("GET /admin/keys lacks the new key: %s", r.body)
	}
	r = serveDirect(t, h, request{method: "DELETE", uri: fmt.Sprintf("/admin/keys/%v", created["id"]), header: admin})
	if r.status != 204 {
		t.Errorf("DELETE = %d %s", r.status, r.body)
	}
	if r := serveDirect(t, h, request{method: "GET", uri: "/users", header: user}); r.status != 401 {
		t.Errorf("revoked key on the instance that revoked it = %d, want 401 at once", r.status)
	}
	for _, bad := range []string{
		`{"name":"x","scopes":["root"]}`,
		`{"name":"","scopes":["admin"]}`,
		`{"name":"x","scopes":[]}`,
		`{"name":"x","scopes":["admin"],"expires_at":"2001-01-01T00:00:00Z"}`,
		`{"name":"x","scopes":["admin"],"rate_limit":-1}`,
	} {
		if r := serveDirect(t, h, request{method: "POST", uri: "/admin/keys", header: admin, body: bad}); r.status != 422 {
			t.Errorf("POST %s = %d %s, want 422", bad, r.status, r.body)
		}
	}
	for _, bad := range []string{`{"name":"x","scopes":["admin"],"owner":"me"}`, `[1]`, `{"name":`} {
		if r := serveDirect(t, h, request{method: "POST", uri: "/admin/keys", header: admin, body: bad}); r.status != 400 {
			t.Errorf("POST %s = %d %s, want 400", bad, r.status, r.body)
		}
	}
	if r := serveDirect(t, h, request{method: "DELETE", uri: "/admin/keys/abc", header: admin}); r.status != 400 {
		t.Errorf("DELETE /admin/keys/abc = %d, want 400", r.status)
	}
}
