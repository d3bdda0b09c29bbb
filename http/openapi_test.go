package http

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	nethttp "net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"userapi"
	"userapi/auth"
	"userapi/internal/testenv"
	"userapi/ratelimit"
)

// liveServer is a Server on a loopback port, shut down when the test ends.
type liveServer struct {
	srv   *Server
	store *faultStore
	base  string
	// keys has an API key of each scope set by name: "all", "read",
	// "write", "admin", "none" (users:read only, for 403s on the rest).
	keys map[string]string
}

// startLive serves with authentication over the store's api_keys table
// (the service's default), with keys made beforehand.
func startLive(t *testing.T, opts Options) *liveServer {
	t.Helper()
	st := &faultStore{Store: newSQLiteStore(t)}
	logs := &testenv.Buffer{}
	opts.Logger = testLogger(logs)
	a, err := auth.New(context.Background(), st, auth.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	opts.Auth, opts.Keys = a, a
	keys := map[string]string{}
	for name, sc := range map[string]userapi.Scope{
		"all": userapi.ScopeAll, "read": userapi.ScopeUsersRead, "write": userapi.ScopeUsersWrite, "admin": userapi.ScopeAdmin,
	} {
		secret, _, err := a.Create(context.Background(), userapi.KeyCreate{Name: name, Scopes: sc})
		if err != nil {
			t.Fatal(err)
		}
		keys[name] = secret
	}
	srv := NewServer(st, opts)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if t.Failed() {
			t.Logf("server log:\n%s", logs)
		}
	})
	return &liveServer{srv: srv, store: st, base: "http://" + ln.Addr().String(), keys: keys}
}

func loadOpenAPI(t *testing.T) *openapi3.T {
	t.Helper()
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(openAPIDocument)
	if err != nil {
		t.Fatalf("load openapi.json: %v", err)
	}
	if err := doc.Validate(loader.Context); err != nil {
		t.Fatalf("openapi.json is not a valid OpenAPI document: %v", err)
	}
	if !doc.IsOpenAPI31OrLater() {
		t.Fatalf("openapi.json is OpenAPI %s, want 3.1", doc.OpenAPI)
	}
	return doc
}

// TestOpenAPIMatchesRoutes checks that routes.go and openapi.json name the
// same operations, both ways.
func TestOpenAPIMatchesRoutes(t *testing.T) {
	doc := loadOpenAPI(t)
	st := newSQLiteStore(t)
	a, err := auth.New(context.Background(), st, auth.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	srv := NewServer(st, Options{PublicMetrics: true, Auth: a, Keys: a})
	var fromRoutes, fromDoc []string
	for _, r := range srv.routes() {
		fromRoutes = append(fromRoutes, r.method+" "+r.template)
	}
	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			fromDoc = append(fromDoc, method+" "+path)
		}
	}
	slices.Sort(fromRoutes)
	slices.Sort(fromDoc)
	if !slices.Equal(fromRoutes, fromDoc) {
		t.Errorf("routes.go has %q\nopenapi.json has %q", fromRoutes, fromDoc)
	}
}

// oaCase is one real request whose response is validated against the
// document.
type oaCase struct {
	method, path string
	header       map[string]string
	body         string
	status       int
	// invalidRequest marks requests that break the document on purpose
	// (to provoke a 4xx); only their responses are validated.
	invalidRequest bool
	// fault is what the store does during the request.
	fault error
	// key names the credential sent (liveServer.keys): "" is the key with
	// every scope, "-" none at all, "bad" a malformed one.
	key string
	// refused: the client is out of its rate limit budget.
	refused bool
}

// switchLimiter allows every request unless refuse is set.
type switchLimiter struct{ refuse atomic.Bool }

func (l *switchLimiter) Allow(string, ratelimit.Limit) ratelimit.Decision {
	if l.refuse.Load() {
		return ratelimit.Decision{Reset: 2 * time.Second, RetryAfter: 1500 * time.Millisecond}
	}
	return ratelimit.Decision{Allowed: true, Remaining: 9, Reset: 100 * time.Millisecond}
}

func (l *switchLimiter) Close() error { return nil }

// TestOpenAPIResponses sends real requests for every route and every
// documented status over loopback, validates each request that should be
// valid and every response against openapi.json, and fails for any
// documented (operation, status) that no case produced.
func TestOpenAPIResponses(t *testing.T) {
	doc := loadOpenAPI(t)
	limiter := &switchLimiter{}
	live := startLive(t, Options{PublicMetrics: true, MaxBodyBytes: 1024,
		RateLimit: ratelimit.Limit{Rate: 5, Burst: 10}, RateLimiter: limiter})
	doc.Servers = openapi3.Servers{{URL: live.base}}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	client := &nethttp.Client{Timeout: 10 * time.Second}

	var created struct {
		ID int64 `json:"id"`
	}
	// covered records the (path template, method, status) triples seen.
	covered := map[string]bool{}
	send := func(t *testing.T, c oaCase) []byte {
		t.Helper()
		live.store.set(c.fault, false, "")
		defer live.store.set(nil, false, "")
		limiter.refuse.Store(c.refused)
		defer limiter.refuse.Store(false)
		newReq := func() *nethttp.Request {
			req, err := nethttp.NewRequest(c.method, live.base+c.path, strings.NewReader(c.body))
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range c.header {
				req.Header.Set(k, v)
			}
			switch c.key {
			case "-":
			case "":
				req.Header.Set("Authorization", "Bearer "+live.keys["all"])
			case "bad":
				req.Header.Set("Authorization", "Bearer uak_1_not-a-key")
			default:
				req.Header.Set("Authorization", "Bearer "+live.keys[c.key])
			}
			return req
		}
		req := newReq()
		route, pathParams, err := router.FindRoute(req)
		if err != nil {
			t.Fatalf("%s %s: no operation in openapi.json: %v", c.method, c.path, err)
		}
		in := &openapi3filter.RequestValidationInput{
			Request: req, PathParams: pathParams, Route: route,
			Options: &openapi3filter.Options{
				IncludeResponseStatus: true,
				// Both schemes are HTTP bearer: the document can only say a
				// bearer credential is there; the service decides the rest.
				AuthenticationFunc: func(_ context.Context, ai *openapi3filter.AuthenticationInput) error {
					if !strings.HasPrefix(ai.RequestValidationInput.Request.Header.Get("Authorization"), "Bearer ") {
						return errors.New("no bearer credential")
					}
					return nil
				},
			},
		}
		if !c.invalidRequest && c.key != "-" {
			if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
				t.Errorf("%s %s: request does not match openapi.json: %v", c.method, c.path, err)
			}
		}
		resp, err := client.Do(newReq())
		if err != nil {
			t.Fatalf("%s %s: %v", c.method, c.path, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != c.status {
			t.Fatalf("%s %s = %d, want %d: %s", c.method, c.path, resp.StatusCode, c.status, body)
		}
		if err := openapi3filter.ValidateResponse(context.Background(), &openapi3filter.ResponseValidationInput{
			RequestValidationInput: in,
			Status:                 resp.StatusCode,
			Header:                 resp.Header,
			Body:                   io.NopCloser(bytes.NewReader(body)),
			Options:                in.Options,
		}); err != nil {
			t.Errorf("%s %s: %d response does not match openapi.json: %v\n%s", c.method, c.path, resp.StatusCode, err, body)
		}
		if resp.StatusCode == nethttp.StatusNotModified { // ValidateResponse skips 304
			if len(body) != 0 || resp.Header.Get("ETag") == "" {
				t.Errorf("304 with body %q and ETag %q", body, resp.Header.Get("ETag"))
			}
		}
		covered[route.Path+" "+route.Method+" "+strconv.Itoa(resp.StatusCode)] = true
		return body
	}

	// Fixture: one user to read, change and delete.
	body := send(t, oaCase{method: "POST", path: "/users", header: jsonCT, body: `{"email":"ada@example.com","name":"Ada"}`, status: 201})
	if err := json.Unmarshal(body, &created); err != nil {
		t.Fatal(err)
	}
	u := fmt.Sprintf("/users/%d", created.ID)
	down := fmt.Errorf("dial: %w", userapi.ErrUnavailable)
	broken := errors.New("disk on fire")
	big := `{"email":"big@example.com","name":"` + strings.Repeat("x", 2000) + `"}`
	valid := `{"email":"ada@example.com","name":"Ada L"}`

	cases := []oaCase{
		{method: "GET", path: "/users", status: 200},
		{method: "GET", path: "/users?limit=1&email=ada@example.com", status: 200},
		{method: "GET", path: "/users?limit=0", status: 400, invalidRequest: true},
		{method: "GET", path: "/users", status: 500, fault: broken},
		{method: "GET", path: "/users", status: 503, fault: down},

		{method: "POST", path: "/users", header: with(jsonCT, "Idempotency-Key", "k"), body: `{"email":"b@example.com","name":"B"}`, status: 201},
		{method: "POST", path: "/users", header: with(jsonCT, "Idempotency-Key", "k"), body: `{"email":"b@example.com","name":"B"}`, status: 201},
		{method: "POST", path: "/users", header: jsonCT, body: `{"email":"ada@example.com","name":"Twin"}`, status: 409},
		{method: "POST", path: "/users", header: jsonCT, body: `{"email":`, status: 400, invalidRequest: true},
		{method: "POST", path: "/users", header: jsonCT, body: big, status: 413, invalidRequest: true},
		{method: "POST", path: "/users", header: map[string]string{"Content-Type": "text/plain"}, body: valid, status: 415, invalidRequest: true},
		{method: "POST", path: "/users", header: jsonCT, body: `{"email":"nope","name":"N"}`, status: 422},
		{method: "POST", path: "/users", header: jsonCT, body: `{"email":"c@example.com","name":"C"}`, status: 500, fault: broken},
		{method: "POST", path: "/users", header: jsonCT, body: `{"email":"c@example.com","name":"C"}`, status: 503, fault: down},

		{method: "GET", path: u, status: 200},
		{method: "GET", path: u, header: map[string]string{"If-None-Match": `"1"`}, status: 304},
		{method: "GET", path: "/users/abc", status: 400, invalidRequest: true},
		{method: "GET", path: "/users/999999", status: 404},
		{method: "GET", path: u, status: 500, fault: broken},
		{method: "GET", path: u, status: 503, fault: down},

		{method: "PUT", path: u, header: jsonCT, body: valid, status: 200},
		{method: "PUT", path: u, header: jsonCT, body: `{"email":"ada@example.com","name":"A","x":1}`, status: 400, invalidRequest: true},
		{method: "PUT", path: "/users/999999", header: jsonCT, body: valid, status: 404},
		{method: "PUT", path: u, header: jsonCT, body: `{"email":"b@example.com","name":"A"}`, status: 409},
		{method: "PUT", path: u, header: with(jsonCT, "If-Match", `"1"`), body: valid, status: 412},
		{method: "PUT", path: u, header: jsonCT, body: big, status: 413, invalidRequest: true},
		{method: "PUT", path: u, header: map[string]string{"Content-Type": "text/plain"}, body: valid, status: 415, invalidRequest: true},
		{method: "PUT", path: u, header: jsonCT, body: `{"email":"ada@example.com"}`, status: 422, invalidRequest: true},
		{method: "PUT", path: u, header: jsonCT, body: valid, status: 500, fault: broken},
		{method: "PUT", path: u, header: jsonCT, body: valid, status: 503, fault: down},

		{method: "PATCH", path: u, header: mergeCT, body: `{"name":"Countess"}`, status: 200},
		{method: "PATCH", path: u, header: jsonCT, body: `{}`, status: 200},
		{method: "PATCH", path: u, header: mergeCT, body: `[]`, status: 400, invalidRequest: true},
		{method: "PATCH", path: "/users/999999", header: mergeCT, body: `{"name":"N"}`, status: 404},
		{method: "PATCH", path: u, header: mergeCT, body: `{"email":"b@example.com"}`, status: 409},
		{method: "PATCH", path: u, header: with(mergeCT, "If-Match", `"1"`), body: `{"name":"N"}`, status: 412},
		{method: "PATCH", path: u, header: mergeCT, body: big, status: 413, invalidRequest: true},
		{method: "PATCH", path: u, header: map[string]string{"Content-Type": "text/plain"}, body: `{}`, status: 415, invalidRequest: true},
		{method: "PATCH", path: u, header: mergeCT, body: `{"name":""}`, status: 422},
		{method: "PATCH", path: u, header: mergeCT, body: `{"name":"N"}`, status: 500, fault: broken},
		{method: "PATCH", path: u, header: mergeCT, body: `{"name":"N"}`, status: 503, fault: down},

		{method: "DELETE", path: "/users/0", status: 400, invalidRequest: true},
		{method: "DELETE", path: u, header: map[string]string{"If-Match": `"1"`}, status: 412},
		{method: "DELETE", path: u, status: 500, fault: broken},
		{method: "DELETE", path: u, status: 503, fault: down},
		{method: "DELETE", path: u, header: map[string]string{"If-Match": `"3"`}, status: 204},
		{method: "DELETE", path: u, status: 404},

		// Authentication: a missing or bad credential, a missing scope.
		{method: "GET", path: "/users", key: "-", status: 401},
		{method: "POST", path: "/users", key: "bad", header: jsonCT, body: valid, status: 401},
		{method: "GET", path: u, key: "-", status: 401},
		{method: "PUT", path: u, key: "-", header: jsonCT, body: valid, status: 401},
		{method: "PATCH", path: u, key: "-", header: mergeCT, body: `{}`, status: 401},
		{method: "DELETE", path: u, key: "-", status: 401},
		{method: "GET", path: "/users", key: "write", status: 403},
		{method: "POST", path: "/users", key: "read", header: jsonCT, body: valid, status: 403},
		{method: "GET", path: u, key: "admin", status: 403},
		{method: "PUT", path: u, key: "read", header: jsonCT, body: valid, status: 403},
		{method: "PATCH", path: u, key: "read", header: mergeCT, body: `{}`, status: 403},
		{method: "DELETE", path: u, key: "read", status: 403},

		// Overload and rate limits.
		{method: "GET", path: "/users", status: 503, fault: fmt.Errorf("shed: %w", userapi.ErrOverloaded)},
		{method: "GET", path: "/users", status: 429, refused: true},
		{method: "POST", path: "/users", header: jsonCT, body: valid, status: 429, refused: true},
		{method: "GET", path: u, status: 429, refused: true},
		{method: "PUT", path: u, header: jsonCT, body: valid, status: 429, refused: true},
		{method: "PATCH", path: u, header: mergeCT, body: `{"name":"N"}`, status: 429, refused: true},
		{method: "DELETE", path: u, status: 429, refused: true},
		{method: "GET", path: "/openapi.json", status: 429, refused: true},
		{method: "GET", path: "/metrics", status: 429, refused: true},
		{method: "GET", path: "/readyz", status: 200, refused: true},

		// Key administration.
		{method: "POST", path: "/admin/keys", header: jsonCT, body: `{"name":"ci","scopes":["users:read"],"rate_limit":5,"rate_burst":10}`, status: 201},
		{method: "POST", path: "/admin/keys", header: jsonCT, body: `{"name":"ci","scopes":["users:read"],"owner":"x"}`, status: 400, invalidRequest: true},
		{method: "POST", path: "/admin/keys", key: "-", header: jsonCT, body: `{"name":"ci","scopes":["users:read"]}`, status: 401},
		{method: "POST", path: "/admin/keys", key: "write", header: jsonCT, body: `{"name":"ci","scopes":["users:read"]}`, status: 403},
		{method: "POST", path: "/admin/keys", header: jsonCT, body: `{"name":"` + strings.Repeat("x", 2000) + `","scopes":["admin"]}`, status: 413, invalidRequest: true},
		{method: "POST", path: "/admin/keys", header: map[string]string{"Content-Type": "text/plain"}, body: `{"name":"ci","scopes":["admin"]}`, status: 415, invalidRequest: true},
		{method: "POST", path: "/admin/keys", header: jsonCT, body: `{"name":"ci","scopes":["admin"],"expires_at":"2001-01-01T00:00:00Z"}`, status: 422},
		{method: "POST", path: "/admin/keys", header: jsonCT, body: `{"name":"ci","scopes":["admin"]}`, status: 500, fault: broken},
		{method: "POST", path: "/admin/keys", header: jsonCT, body: `{"name":"ci","scopes":["admin"]}`, status: 503, fault: down},
		{method: "GET", path: "/admin/keys", status: 200},
		{method: "GET", path: "/admin/keys", key: "-", status: 401},
		{method: "GET", path: "/admin/keys", key: "read", status: 403},
		{method: "GET", path: "/admin/keys", status: 500, fault: broken},
		{method: "GET", path: "/admin/keys", status: 503, fault: down},
		{method: "DELETE", path: "/admin/keys/0", status: 400, invalidRequest: true},
		{method: "DELETE", path: "/admin/keys/1", key: "-", status: 401},
		{method: "DELETE", path: "/admin/keys/1", key: "read", status: 403},
		{method: "DELETE", path: "/admin/keys/999999", status: 404},
		{method: "DELETE", path: "/admin/keys/1", status: 500, fault: broken},
		{method: "DELETE", path: "/admin/keys/1", status: 503, fault: down},
		{method: "DELETE", path: "/admin/keys/1", status: 204},

		{method: "GET", path: "/livez", key: "-", status: 200},
		{method: "GET", path: "/readyz", key: "-", status: 200},
		{method: "GET", path: "/readyz", key: "-", status: 503, fault: down},
		{method: "GET", path: "/openapi.json", key: "-", status: 200},
		{method: "GET", path: "/metrics", key: "-", status: 200},
	}
	for _, c := range cases {
		send(t, c)
	}

	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			for status := range op.Responses.Map() {
				if status == "429" {
					continue // the rate limiter's answer, tested with it
				}
				if !covered[path+" "+method+" "+status] {
					t.Errorf("no test produced the documented %s %s → %s", method, path, status)
				}
			}
		}
	}
}
