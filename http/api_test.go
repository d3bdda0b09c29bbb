package http

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"

	"userapi"
	"userapi/internal/testenv"
)

// fixture is a Server over a real SQLite store behind a faultStore.
type fixture struct {
	srv   *Server
	h     fasthttp.RequestHandler
	store *faultStore
	logs  *testenv.Buffer
	reg   *prometheus.Registry
}

func newFixture(t *testing.T, encoded bool, opts Options) *fixture {
	t.Helper()
	var base userapi.Store = newSQLiteStore(t)
	if encoded {
		base = encodingStore{base}
	}
	f := &fixture{store: &faultStore{Store: base}, logs: &testenv.Buffer{}, reg: prometheus.NewRegistry()}
	var st userapi.Store = f.store
	if encoded {
		st = encodedFault{f.store}
	}
	opts.Logger = testLogger(f.logs)
	opts.Registerer = f.reg
	f.srv = NewServer(st, opts)
	f.h = f.srv.Handler()
	return f
}

// encodedFault keeps the EncodedReader of the store under a faultStore.
type encodedFault struct{ *faultStore }

func (e encodedFault) GetUserEncoded(ctx context.Context, id int64) (userapi.Encoded, error) {
	if err := e.fault(ctx); err != nil {
		return userapi.Encoded{}, err
	}
	return e.Store.(userapi.EncodedReader).GetUserEncoded(ctx, id)
}

func (f *fixture) do(t *testing.T, r request) response {
	t.Helper()
	return serveDirect(t, f.h, r)
}

func (f *fixture) create(t *testing.T, email, name string) map[string]any {
	t.Helper()
	resp := f.do(t, request{method: "POST", uri: "/users", header: jsonCT, body: fmt.Sprintf(`{"email":%q,"name":%q}`, email, name)})
	if resp.status != 201 {
		t.Fatalf("create %s: %d %s", email, resp.status, resp.body)
	}
	return resp.json(t)
}

var (
	jsonCT  = map[string]string{"Content-Type": "application/json"}
	mergeCT = map[string]string{"Content-Type": "application/merge-patch+json"}
)

func with(h map[string]string, kv ...string) map[string]string {
	m := map[string]string{}
	for k, v := range h {
		m[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

// wantProblem is the expected problem+json of an error response.
type wantProblem struct {
	typ    string   // "" means about:blank
	fields []string // the fields named in errors, in order
}

type apiCase struct {
	name    string
	req     request
	status  int
	headers map[string]string // each must be present with this value; "-" means absent
	problem *wantProblem      // checked for every status >= 400
	check   func(t *testing.T, r response)
}

// run checks one case, including what every response must have.
func (f *fixture) run(t *testing.T, c apiCase) response {
	t.Helper()
	r := f.do(t, c.req)
	if r.status != c.status {
		t.Fatalf("%s %s = %d, want %d; body %s", c.req.method, c.req.uri, r.status, c.status, r.body)
	}
	if !validRequestID([]byte(r.header["X-Request-Id"])) {
		t.Errorf("X-Request-Id = %q, want a sane id", r.header["X-Request-Id"])
	}
	for k, want := range c.headers {
		got, ok := r.header[k]
		switch {
		case want == "-" && ok:
			t.Errorf("header %s = %q, want absent", k, got)
		case want != "-" && got != want:
			t.Errorf("header %s = %q, want %q", k, got, want)
		}
	}
	if r.status >= 400 {
		checkProblem(t, r, c.problem)
	}
	if c.check != nil {
		c.check(t, r)
	}
	return r
}

func checkProblem(t *testing.T, r response, want *wantProblem) {
	t.Helper()
	if ct := r.header["Content-Type"]; ct != "application/problem+json" {
		t.Errorf("Content-Type = %q, want application/problem+json", ct)
	}
	p := r.json(t)
	if want == nil {
		want = &wantProblem{}
	}
	typ := want.typ
	if typ == "" {
		typ = "about:blank"
	}
	if p["type"] != typ {
		t.Errorf("problem type = %v, want %s", p["type"], typ)
	}
	if p["status"] != float64(r.status) {
		t.Errorf("problem status = %v, want %d", p["status"], r.status)
	}
	if title, _ := p["title"].(string); title == "" || (typ == "about:blank" && title != fasthttp.StatusMessage(r.status)) {
		t.Errorf("problem title = %q", title)
	}
	if d, _ := p["detail"].(string); d == "" {
		t.Errorf("problem has no detail: %s", r.body)
	}
	var fields []string
	if errs, ok := p["errors"].([]any); ok {
		for _, e := range errs {
			m, _ := e.(map[string]any)
			field, _ := m["field"].(string)
			msg, _ := m["message"].(string)
			if field == "" || msg == "" {
				t.Errorf("errors entry %v lacks field or message", e)
			}
			fields = append(fields, field)
		}
	}
	if diff := cmp.Diff(want.fields, fields); diff != "" {
		t.Errorf("problem errors fields (-want +got):\n%s\nbody %s", diff, r.body)
	}
	for _, k := range slices.Sorted(mapsKeys(p)) {
		if !slices.Contains([]string{"type", "title", "status", "detail", "errors"}, k) {
			t.Errorf("problem has unexpected member %q", k)
		}
	}
}

func mapsKeys(m map[string]any) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func userBody(t *testing.T, r response) map[string]any {
	t.Helper()
	if ct := r.header["Content-Type"]; ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	return r.json(t)
}

func wantUser(email, name string, version float64) func(*testing.T, response) {
	return func(t *testing.T, r response) {
		t.Helper()
		u := userBody(t, r)
		if u["email"] != email || u["name"] != name || u["version"] != version {
			t.Errorf("user = %v, want email %s name %s version %v", u, email, name, version)
		}
		if tag := r.header["ETag"]; tag != fmt.Sprintf(`"%v"`, version) {
			t.Errorf("ETag = %s, want \"%v\"", tag, version)
		}
		for _, k := range []string{"created_at", "updated_at"} {
			if s, _ := u[k].(string); !regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$`).MatchString(s) {
				t.Errorf("%s = %q", k, s)
			}
		}
	}
}

// TestAPI walks every rule of SPEC.md's HTTP API through the full handler
// chain against a real SQLite store, with and without the EncodedReader
// fast path.
func TestAPI(t *testing.T) {
	for _, encoded := range []bool{false, true} {
		t.Run(fmt.Sprintf("encoded=%v", encoded), func(t *testing.T) {
			testAPI(t, encoded)
		})
	}
}

func testAPI(t *testing.T, encoded bool) {
	f := newFixture(t, encoded, Options{MaxBodyBytes: 1024, PublicMetrics: true})
	ada := f.create(t, "ada@example.com", "Ada")
	adaID := strconv.FormatInt(int64(ada["id"].(float64)), 10)
	ada2 := f.create(t, "grace@example.com", "Grace")
	graceID := strconv.FormatInt(int64(ada2["id"].(float64)), 10)
	u := "/users/" + adaID
	g := "/users/" + graceID
	big := `{"email":"big@example.com","name":"` + strings.Repeat("x", 1100) + `"}`

	cases := []apiCase{
		// GET /users/{id}
		{name: "get", req: request{method: "GET", uri: u}, status: 200, headers: map[string]string{"ETag": `"1"`, "Content-Encoding": "-"},
			check: wantUser("ada@example.com", "Ada", 1)},
		{name: "get gzip never for a small body", req: request{method: "GET", uri: u, header: map[string]string{"Accept-Encoding": "gzip"}}, status: 200,
			headers: map[string]string{"Content-Encoding": "-"}},
		{name: "head", req: request{method: "HEAD", uri: u}, status: 200, headers: map[string]string{"ETag": `"1"`}},
		{name: "if-none-match current", req: request{method: "GET", uri: u, header: map[string]string{"If-None-Match": `"1"`}}, status: 304,
			headers: map[string]string{"ETag": `"1"`}, check: emptyBody},
		{name: "if-none-match weak", req: request{method: "GET", uri: u, header: map[string]string{"If-None-Match": `W/"1"`}}, status: 304, check: emptyBody},
		{name: "if-none-match list", req: request{method: "GET", uri: u, header: map[string]string{"If-None-Match": `"7", W/"1"`}}, status: 304},
		{name: "if-none-match star", req: request{method: "GET", uri: u, header: map[string]string{"If-None-Match": `*`}}, status: 304},
		{name: "if-none-match stale", req: request{method: "GET", uri: u, header: map[string]string{"If-None-Match": `"2"`}}, status: 200},
		{name: "if-none-match garbage", req: request{method: "GET", uri: u, header: map[string]string{"If-None-Match": `1`}}, status: 200},
		{name: "get absent", req: request{method: "GET", uri: "/users/999999"}, status: 404},
		{name: "id letters", req: request{method: "GET", uri: "/users/abc"}, status: 400, problem: &wantProblem{fields: []string{"id"}}},
		{name: "id zero", req: request{method: "GET", uri: "/users/0"}, status: 400, problem: &wantProblem{fields: []string{"id"}}},
		{name: "id negative", req: request{method: "GET", uri: "/users/-1"}, status: 400, problem: &wantProblem{fields: []string{"id"}}},
		{name: "id plus", req: request{method: "GET", uri: "/users/+1"}, status: 400, problem: &wantProblem{fields: []string{"id"}}},
		{name: "id overflow", req: request{method: "GET", uri: "/users/9223372036854775808"}, status: 400, problem: &wantProblem{fields: []string{"id"}}},
		{name: "id max", req: request{method: "GET", uri: "/users/9223372036854775807"}, status: 404},

		// Routing.
		{name: "unknown path", req: request{method: "GET", uri: "/nope"}, status: 404},
		{name: "nested path", req: request{method: "GET", uri: u + "/x"}, status: 404},
		{name: "empty id", req: request{method: "GET", uri: "/users/"}, status: 404},
		{name: "405 users", req: request{method: "DELETE", uri: "/users"}, status: 405, headers: map[string]string{"Allow": "GET, HEAD, POST"}},
		{name: "405 user", req: request{method: "POST", uri: u}, status: 405, headers: map[string]string{"Allow": "GET, HEAD, PUT, PATCH, DELETE"}},
		{name: "405 livez", req: request{method: "POST", uri: "/livez"}, status: 405, headers: map[string]string{"Allow": "GET, HEAD"}},
		{name: "405 odd method", req: request{method: "BREW", uri: "/users"}, status: 405, headers: map[string]string{"Allow": "GET, HEAD, POST"}},

		// POST /users
		{name: "create", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"Alan@Example.COM","name":"  Alan  "}`}, status: 201,
			headers: map[string]string{"Idempotent-Replayed": "-", "ETag": `"1"`},
			check: func(t *testing.T, r response) {
				wantUser("alan@example.com", "Alan", 1)(t, r)
				if loc, id := r.header["Location"], r.json(t)["id"]; loc != fmt.Sprintf("/users/%v", id) {
					t.Errorf("Location = %q for id %v", loc, id)
				}
			}},
		{name: "create charset utf-8", req: request{method: "POST", uri: "/users", header: map[string]string{"Content-Type": "Application/JSON; charset=UTF-8"},
			body: `{"email":"c@example.com","name":"C"}`}, status: 201},
		{name: "create duplicate email", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"ADA@example.com","name":"Other"}`}, status: 409,
			problem: &wantProblem{typ: typeEmailTaken, fields: []string{"email"}}},
		{name: "create idempotent", req: request{method: "POST", uri: "/users", header: with(jsonCT, "Idempotency-Key", "k1"), body: `{"email":"idem@example.com","name":"I"}`},
			status: 201, headers: map[string]string{"Idempotent-Replayed": "-"}},
		{name: "create idempotent replay", req: request{method: "POST", uri: "/users", header: with(jsonCT, "Idempotency-Key", "k1"), body: `{"email":"idem@example.com","name":"I"}`},
			status: 201, headers: map[string]string{"Idempotent-Replayed": "true"}, check: wantUser("idem@example.com", "I", 1)},
		{name: "create idempotent mismatch", req: request{method: "POST", uri: "/users", header: with(jsonCT, "Idempotency-Key", "k1"), body: `{"email":"idem@example.com","name":"J"}`},
			status: 422, problem: &wantProblem{typ: typeIdempotencyMismatch}},
		{name: "create idempotency key too long", req: request{method: "POST", uri: "/users", header: with(jsonCT, "Idempotency-Key", strings.Repeat("k", 256)), body: `{"email":"k@example.com","name":"K"}`},
			status: 422, problem: &wantProblem{typ: typeValidation, fields: []string{"Idempotency-Key"}}},
		{name: "create idempotency key not ascii", req: request{method: "POST", uri: "/users", header: with(jsonCT, "Idempotency-Key", "k\xff"), body: `{"email":"k@example.com","name":"K"}`},
			status: 400, problem: &wantProblem{fields: []string{"Idempotency-Key"}}},
		{name: "create no content type", req: request{method: "POST", uri: "/users", body: `{"email":"x@example.com","name":"X"}`}, status: 415},
		{name: "create text/plain", req: request{method: "POST", uri: "/users", header: map[string]string{"Content-Type": "text/plain"}, body: `{"email":"x@example.com","name":"X"}`}, status: 415},
		{name: "create latin1", req: request{method: "POST", uri: "/users", header: map[string]string{"Content-Type": "application/json; charset=latin1"}, body: `{"email":"x@example.com","name":"X"}`}, status: 415},
		{name: "create merge-patch type", req: request{method: "POST", uri: "/users", header: mergeCT, body: `{"email":"x@example.com","name":"X"}`}, status: 415},
		{name: "create malformed", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":`}, status: 400, problem: &wantProblem{fields: []string{"body"}}},
		{name: "create syntax error", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email" "x"}`}, status: 400, problem: &wantProblem{fields: []string{"body"}}},
		{name: "create empty body", req: request{method: "POST", uri: "/users", header: jsonCT}, status: 400, problem: &wantProblem{fields: []string{"body"}}},
		{name: "create array", req: request{method: "POST", uri: "/users", header: jsonCT, body: `[{"email":"x@example.com","name":"X"}]`}, status: 400, problem: &wantProblem{fields: []string{"body"}}},
		{name: "create unknown field", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"x@example.com","name":"X","admin":true}`}, status: 400, problem: &wantProblem{fields: []string{"admin"}}},
		{name: "create field case", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"Email":"x@example.com","name":"X"}`}, status: 400, problem: &wantProblem{fields: []string{"Email"}}},
		{name: "create duplicate field", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"x@example.com","email":"y@example.com","name":"X"}`}, status: 400, problem: &wantProblem{fields: []string{"email"}}},
		{name: "create wrong type", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"x@example.com","name":7}`}, status: 400, problem: &wantProblem{fields: []string{"name"}}},
		{name: "create object value", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":{"a":1},"name":"X"}`}, status: 400, problem: &wantProblem{fields: []string{"email"}}},
		{name: "create trailing data", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"x@example.com","name":"X"} {}`}, status: 400, problem: &wantProblem{fields: []string{"body"}}},
		{name: "create invalid fields", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"not an email","name":" "}`}, status: 422,
			problem: &wantProblem{typ: typeValidation, fields: []string{"email", "name"}}},
		{name: "create missing fields", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{}`}, status: 422,
			problem: &wantProblem{typ: typeValidation, fields: []string{"email", "name"}}},
		{name: "create null fields", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":null,"name":null}`}, status: 422,
			problem: &wantProblem{typ: typeValidation, fields: []string{"email", "name"}}},
		{name: "create display name", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"Ada <x@example.com>","name":"X"}`}, status: 422,
			problem: &wantProblem{typ: typeValidation, fields: []string{"email"}}},
		{name: "create control char", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"x@example.com","name":"a\u0007b"}`}, status: 422,
			problem: &wantProblem{typ: typeValidation, fields: []string{"name"}}},
		{name: "create too large", req: request{method: "POST", uri: "/users", header: jsonCT, body: big}, status: 413},

		// PUT /users/{id}
		{name: "put", req: request{method: "PUT", uri: g, header: jsonCT, body: `{"email":"Grace@Example.com","name":"Grace Hopper"}`}, status: 200,
			check: wantUser("grace@example.com", "Grace Hopper", 2)},
		{name: "put if-match current", req: request{method: "PUT", uri: g, header: with(jsonCT, "If-Match", `"2"`), body: `{"email":"grace@example.com","name":"G"}`}, status: 200,
			check: wantUser("grace@example.com", "G", 3)},
		{name: "put if-match stale", req: request{method: "PUT", uri: g, header: with(jsonCT, "If-Match", `"2"`), body: `{"email":"grace@example.com","name":"G"}`}, status: 412,
			problem: &wantProblem{typ: typeVersionMismatch}},
		{name: "put if-match weak", req: request{method: "PUT", uri: g, header: with(jsonCT, "If-Match", `W/"3"`), body: `{"email":"grace@example.com","name":"G"}`}, status: 412,
			problem: &wantProblem{typ: typeVersionMismatch}},
		{name: "put if-match malformed", req: request{method: "PUT", uri: g, header: with(jsonCT, "If-Match", `3`), body: `{"email":"grace@example.com","name":"G"}`}, status: 412,
			problem: &wantProblem{typ: typeVersionMismatch}},
		{name: "put if-match current then malformed", req: request{method: "PUT", uri: g, header: with(jsonCT, "If-Match", `"3", garbage`), body: `{"email":"grace@example.com","name":"G"}`}, status: 412,
			problem: &wantProblem{typ: typeVersionMismatch}},
		{name: "put if-match foreign tag", req: request{method: "PUT", uri: g, header: with(jsonCT, "If-Match", `"abc"`), body: `{"email":"grace@example.com","name":"G"}`}, status: 412,
			problem: &wantProblem{typ: typeVersionMismatch}},
		{name: "put if-match list", req: request{method: "PUT", uri: g, header: with(jsonCT, "If-Match", `"1", "3"`), body: `{"email":"grace@example.com","name":"G4"}`}, status: 200,
			check: wantUser("grace@example.com", "G4", 4)},
		{name: "put if-match list stale", req: request{method: "PUT", uri: g, header: with(jsonCT, "If-Match", `"1", "3"`), body: `{"email":"grace@example.com","name":"G"}`}, status: 412,
			problem: &wantProblem{typ: typeVersionMismatch}},
		{name: "put if-match star", req: request{method: "PUT", uri: g, header: with(jsonCT, "If-Match", `*`), body: `{"email":"grace@example.com","name":"G5"}`}, status: 200,
			check: wantUser("grace@example.com", "G5", 5)},
		{name: "put absent", req: request{method: "PUT", uri: "/users/999999", header: jsonCT, body: `{"email":"n@example.com","name":"N"}`}, status: 404},
		{name: "put absent with malformed if-match", req: request{method: "PUT", uri: "/users/999999", header: with(jsonCT, "If-Match", `W/"1"`), body: `{"email":"n@example.com","name":"N"}`}, status: 404},
		{name: "put missing name", req: request{method: "PUT", uri: g, header: jsonCT, body: `{"email":"grace@example.com"}`}, status: 422,
			problem: &wantProblem{typ: typeValidation, fields: []string{"name"}}},
		{name: "put null email", req: request{method: "PUT", uri: g, header: jsonCT, body: `{"email":null,"name":"G"}`}, status: 422,
			problem: &wantProblem{typ: typeValidation, fields: []string{"email"}}},
		{name: "put email taken", req: request{method: "PUT", uri: g, header: jsonCT, body: `{"email":"ada@example.com","name":"G"}`}, status: 409,
			problem: &wantProblem{typ: typeEmailTaken, fields: []string{"email"}}},
		{name: "put bad id", req: request{method: "PUT", uri: "/users/x", header: jsonCT, body: `{"email":"grace@example.com","name":"G"}`}, status: 400, problem: &wantProblem{fields: []string{"id"}}},
		{name: "put wrong type", req: request{method: "PUT", uri: g, header: map[string]string{"Content-Type": "application/xml"}, body: `<x/>`}, status: 415},
		{name: "put unknown field", req: request{method: "PUT", uri: g, header: jsonCT, body: `{"email":"grace@example.com","name":"G","id":1}`}, status: 400, problem: &wantProblem{fields: []string{"id"}}},
		{name: "put too large", req: request{method: "PUT", uri: g, header: jsonCT, body: big}, status: 413},

		// PATCH /users/{id}
		{name: "patch name", req: request{method: "PATCH", uri: g, header: mergeCT, body: `{"name":"Rear Admiral"}`}, status: 200,
			check: wantUser("grace@example.com", "Rear Admiral", 6)},
		{name: "patch json type", req: request{method: "PATCH", uri: g, header: jsonCT, body: `{"email":"GH@example.com"}`}, status: 200,
			check: wantUser("gh@example.com", "Rear Admiral", 7)},
		{name: "patch empty", req: request{method: "PATCH", uri: g, header: mergeCT, body: `{}`}, status: 200,
			check: wantUser("gh@example.com", "Rear Admiral", 7)},
		{name: "patch empty stale", req: request{method: "PATCH", uri: g, header: with(mergeCT, "If-Match", `"6"`), body: `{}`}, status: 412,
			problem: &wantProblem{typ: typeVersionMismatch}},
		{name: "patch if-match", req: request{method: "PATCH", uri: g, header: with(mergeCT, "If-Match", `"7"`), body: `{"name":"GMH"}`}, status: 200,
			check: wantUser("gh@example.com", "GMH", 8)},
		{name: "patch if-match stale", req: request{method: "PATCH", uri: g, header: with(mergeCT, "If-Match", `"7"`), body: `{"name":"X"}`}, status: 412,
			problem: &wantProblem{typ: typeVersionMismatch}},
		{name: "patch null", req: request{method: "PATCH", uri: g, header: mergeCT, body: `{"name":null}`}, status: 422,
			problem: &wantProblem{typ: typeValidation, fields: []string{"name"}}},
		{name: "patch invalid", req: request{method: "PATCH", uri: g, header: mergeCT, body: `{"email":"nope"}`}, status: 422,
			problem: &wantProblem{typ: typeValidation, fields: []string{"email"}}},
		{name: "patch unknown", req: request{method: "PATCH", uri: g, header: mergeCT, body: `{"nick":"g"}`}, status: 400, problem: &wantProblem{fields: []string{"nick"}}},
		{name: "patch not object", req: request{method: "PATCH", uri: g, header: mergeCT, body: `"x"`}, status: 400, problem: &wantProblem{fields: []string{"body"}}},
		{name: "patch email taken", req: request{method: "PATCH", uri: g, header: mergeCT, body: `{"email":"ada@example.com"}`}, status: 409,
			problem: &wantProblem{typ: typeEmailTaken, fields: []string{"email"}}},
		{name: "patch wrong type", req: request{method: "PATCH", uri: g, header: map[string]string{"Content-Type": "application/json-patch+json"}, body: `[]`}, status: 415},
		{name: "patch absent", req: request{method: "PATCH", uri: "/users/999999", header: mergeCT, body: `{"name":"N"}`}, status: 404},
		{name: "patch too large", req: request{method: "PATCH", uri: g, header: mergeCT, body: big}, status: 413},

		// DELETE /users/{id}
		{name: "delete stale", req: request{method: "DELETE", uri: g, header: map[string]string{"If-Match": `"1"`}}, status: 412, problem: &wantProblem{typ: typeVersionMismatch}},
		{name: "delete", req: request{method: "DELETE", uri: g, header: map[string]string{"If-Match": `"8"`}}, status: 204, check: emptyBody},
		{name: "delete again", req: request{method: "DELETE", uri: g}, status: 404},
		{name: "get deleted", req: request{method: "GET", uri: g}, status: 404},
		{name: "delete bad id", req: request{method: "DELETE", uri: "/users/1.5"}, status: 400, problem: &wantProblem{fields: []string{"id"}}},

		// GET /users
		{name: "list", req: request{method: "GET", uri: "/users"}, status: 200, check: func(t *testing.T, r response) {
			l := userBody(t, r)
			if items := l["items"].([]any); len(items) != 4 || l["next_cursor"] != nil {
				t.Errorf("list = %s, want 4 users and no next page", r.body)
			}
		}},
		{name: "list by email", req: request{method: "GET", uri: "/users?email=ADA@example.com"}, status: 200, check: func(t *testing.T, r response) {
			items := userBody(t, r)["items"].([]any)
			if len(items) != 1 || items[0].(map[string]any)["email"] != "ada@example.com" {
				t.Errorf("list by email = %s", r.body)
			}
		}},
		{name: "list by unknown email", req: request{method: "GET", uri: "/users?email=who@example.com"}, status: 200, check: func(t *testing.T, r response) {
			if string(r.body) != `{"items":[],"next_cursor":null}` {
				t.Errorf("body = %s", r.body)
			}
		}},
		{name: "list bad email", req: request{method: "GET", uri: "/users?email=nope"}, status: 400, problem: &wantProblem{fields: []string{"email"}}},
		{name: "list limit 0", req: request{method: "GET", uri: "/users?limit=0"}, status: 400, problem: &wantProblem{fields: []string{"limit"}}},
		{name: "list limit 1001", req: request{method: "GET", uri: "/users?limit=1001"}, status: 400, problem: &wantProblem{fields: []string{"limit"}}},
		{name: "list limit text", req: request{method: "GET", uri: "/users?limit=ten"}, status: 400, problem: &wantProblem{fields: []string{"limit"}}},
		{name: "list limit 1000", req: request{method: "GET", uri: "/users?limit=1000"}, status: 200},
		{name: "list bad cursor", req: request{method: "GET", uri: "/users?cursor=abc"}, status: 400, problem: &wantProblem{fields: []string{"cursor"}}},
		{name: "list forged cursor", req: request{method: "GET", uri: "/users?cursor=" + string(appendCursor(nil, 5)[:11]) + "!"}, status: 400, problem: &wantProblem{fields: []string{"cursor"}}},

		// Operations.
		{name: "livez", req: request{method: "GET", uri: "/livez"}, status: 200, check: func(t *testing.T, r response) {
			if userBody(t, r)["status"] != "ok" {
				t.Errorf("livez = %s", r.body)
			}
		}},
		{name: "readyz", req: request{method: "GET", uri: "/readyz"}, status: 200},
		{name: "openapi", req: request{method: "GET", uri: "/openapi.json", header: map[string]string{"Accept-Encoding": "gzip"}}, status: 200,
			headers: map[string]string{"Content-Encoding": "gzip"}, check: func(t *testing.T, r response) {
				if userBody(t, r)["openapi"] != "3.1.0" {
					t.Errorf("not the OpenAPI document")
				}
			}},
		{name: "openapi gzip refused", req: request{method: "GET", uri: "/openapi.json", header: map[string]string{"Accept-Encoding": "gzip;q=0"}}, status: 200,
			headers: map[string]string{"Content-Encoding": "-"}},
		{name: "metrics", req: request{method: "GET", uri: "/metrics"}, status: 200, check: func(t *testing.T, r response) {
			for _, want := range []string{
				`userapi_http_requests_total{method="GET",route="/users/{id}",status="200"}`,
				`userapi_http_requests_total{method="OTHER",route="/users",status="405"}`,
				`userapi_http_requests_total{method="GET",route="unmatched",status="404"}`,
				`userapi_http_request_duration_seconds_bucket{method="POST",route="/users",le="+Inf"}`,
				`userapi_http_requests_in_flight 1`,
			} {
				if !strings.Contains(string(r.body), want) {
					t.Errorf("metrics lack %s", want)
				}
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { f.run(t, c) })
	}

	t.Run("pages", func(t *testing.T) {
		var ids []float64
		uri := "/users?limit=2"
		for range 10 {
			r := f.run(t, apiCase{req: request{method: "GET", uri: uri}, status: 200})
			l := userBody(t, r)
			for _, it := range l["items"].([]any) {
				ids = append(ids, it.(map[string]any)["id"].(float64))
			}
			next, _ := l["next_cursor"].(string)
			if next == "" {
				break
			}
			uri = "/users?limit=2&cursor=" + next
		}
		if len(ids) != 4 || !slices.IsSorted(ids) {
			t.Errorf("paged ids = %v, want 4 ascending", ids)
		}
	})

	t.Run("list gzip", func(t *testing.T) {
		for i := range 10 {
			f.create(t, fmt.Sprintf("many%d@example.com", i), "Many")
		}
		f.run(t, apiCase{req: request{method: "GET", uri: "/users", header: map[string]string{"Accept-Encoding": "br, gzip"}}, status: 200,
			headers: map[string]string{"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}})
		f.run(t, apiCase{req: request{method: "GET", uri: "/users"}, status: 200, headers: map[string]string{"Content-Encoding": "-"}})
	})

	t.Run("faults", func(t *testing.T) {
		defer f.store.set(nil, false, "")
		f.store.set(fmt.Errorf("get user: dial tcp 10.0.0.1: %w", userapi.ErrUnavailable), false, "")
		for _, r := range []request{
			{method: "GET", uri: u},
			{method: "GET", uri: "/users"},
			{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"z@example.com","name":"Z"}`},
			{method: "PATCH", uri: u, header: mergeCT, body: `{"name":"Z"}`},
			{method: "DELETE", uri: u},
			{method: "GET", uri: "/readyz"},
		} {
			resp := f.run(t, apiCase{req: r, status: 503, headers: map[string]string{"Retry-After": "1"}})
			if strings.Contains(string(resp.body), "10.0.0.1") {
				t.Errorf("503 leaks the cause: %s", resp.body)
			}
		}

		f.store.set(errors.New("pq: relation users is corrupt"), false, "")
		r := f.run(t, apiCase{req: request{method: "GET", uri: u, header: map[string]string{"X-Request-ID": "trace-500"}}, status: 500})
		if strings.Contains(string(r.body), "corrupt") {
			t.Errorf("500 leaks the cause: %s", r.body)
		}
		if logs := f.logs.String(); !strings.Contains(logs, "corrupt") || !strings.Contains(logs, "request_id=trace-500") {
			t.Errorf("500 not logged with cause and request id:\n%s", logs)
		}

		f.store.set(nil, false, "boom")
		f.run(t, apiCase{req: request{method: "GET", uri: u, header: map[string]string{"X-Request-ID": "trace-panic"}}, status: 500,
			headers: map[string]string{"X-Request-Id": "trace-panic", "ETag": "-"}})
		if logs := f.logs.String(); !strings.Contains(logs, "panic") || !strings.Contains(logs, "request_id=trace-panic") || !strings.Contains(logs, "goroutine") {
			t.Errorf("panic not logged with stack and request id:\n%s", logs)
		}
	})
}

// TestInvalidUTF8 checks that a body that is not valid UTF-8, or whose
// escapes name a lone UTF-16 surrogate, is refused as a whole: the JSON
// decoder would otherwise store U+FFFD in place of what the client sent.
func TestInvalidUTF8(t *testing.T) {
	f := newFixture(t, false, Options{})
	u := "/users/" + strconv.FormatInt(int64(f.create(t, "ada@example.com", "Ada")["id"].(float64)), 10)
	body := &wantProblem{fields: []string{"body"}}
	for _, c := range []apiCase{
		{name: "create email", req: request{method: "POST", uri: "/users", header: jsonCT, body: "{\"email\":\"\xff\xfe@example.com\",\"name\":\"x\"}"}, status: 400, problem: body},
		{name: "create name", req: request{method: "POST", uri: "/users", header: jsonCT, body: "{\"email\":\"n@example.com\",\"name\":\"Ad\xe9\"}"}, status: 400, problem: body},
		{name: "create truncated sequence", req: request{method: "POST", uri: "/users", header: jsonCT, body: "{\"email\":\"t@example.com\",\"name\":\"\xe2\x82\"}"}, status: 400, problem: body},
		{name: "create overlong encoding", req: request{method: "POST", uri: "/users", header: jsonCT, body: "{\"email\":\"o@example.com\",\"name\":\"\xc0\xaf\"}"}, status: 400, problem: body},
		{name: "create encoded surrogate", req: request{method: "POST", uri: "/users", header: jsonCT, body: "{\"email\":\"s@example.com\",\"name\":\"\xed\xa0\x80\"}"}, status: 400, problem: body},
		{name: "create member name", req: request{method: "POST", uri: "/users", header: jsonCT, body: "{\"email\":\"m@example.com\",\"name\":\"M\",\"\xff\":1}"}, status: 400, problem: body},
		{name: "create outside strings", req: request{method: "POST", uri: "/users", header: jsonCT, body: "{\"email\":\"w@example.com\",\"name\":\"W\"}\xff"}, status: 400, problem: body},
		{name: "create lone high surrogate escape", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"\ud800@example.com","name":"x"}`}, status: 400, problem: body},
		{name: "create lone low surrogate escape", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"l@example.com","name":"\uDC00"}`}, status: 400, problem: body},
		{name: "create reversed surrogate escapes", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"r@example.com","name":"\udc00\ud800"}`}, status: 400, problem: body},
		{name: "create high surrogate then other escape", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"h@example.com","name":"\ud83d\u0041"}`}, status: 400, problem: body},
		{name: "put name", req: request{method: "PUT", uri: u, header: jsonCT, body: "{\"email\":\"ada@example.com\",\"name\":\"\xff\"}"}, status: 400, problem: body},
		{name: "patch email", req: request{method: "PATCH", uri: u, header: mergeCT, body: "{\"email\":\"\xffa@example.com\"}"}, status: 400, problem: body},
		{name: "patch surrogate escape", req: request{method: "PATCH", uri: u, header: mergeCT, body: `{"name":"\udfff"}`}, status: 400, problem: body},
		{name: "idempotency key", req: request{method: "POST", uri: "/users", header: with(jsonCT, "Idempotency-Key", "k\xc3\xa9"), body: `{"email":"k@example.com","name":"K"}`}, status: 400,
			problem: &wantProblem{fields: []string{"Idempotency-Key"}}},
		{name: "list email filter", req: request{method: "GET", uri: "/users?email=%ff%fe@example.com"}, status: 400, problem: &wantProblem{fields: []string{"email"}}},

		// What is valid stays valid: an escaped pair, escaped backslashes
		// before a "u", and U+FFFD itself when the client sends it.
		{name: "create surrogate pair escape", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"p@example.com","name":"\ud83d\ude00"}`}, status: 201,
			check: func(t *testing.T, r response) {
				if name := userBody(t, r)["name"]; name != "\U0001F600" {
					t.Errorf("name = %q, want U+1F600", name)
				}
			}},
		{name: "create escaped backslash", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"b@example.com","name":"\\ud800"}`}, status: 201, check: wantUser("b@example.com", `\ud800`, 1)},
		{name: "create replacement character", req: request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"c@example.com","name":"\ufffd"}`}, status: 201, check: wantUser("c@example.com", "\ufffd", 1)},
	} {
		t.Run(c.name, func(t *testing.T) { f.run(t, c) })
	}

	users, err := f.store.ListUsers(context.Background(), userapi.UserFilter{Limit: userapi.MaxLimit})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, u := range users {
		got = append(got, u.Email)
	}
	if want := []string{"ada@example.com", "p@example.com", "b@example.com", "c@example.com"}; !slices.Equal(got, want) {
		t.Errorf("stored emails %q, want %q", got, want)
	}
	if users[0].Name != "Ada" {
		t.Errorf("user 1 name = %q, want Ada", users[0].Name)
	}
}

func emptyBody(t *testing.T, r response) {
	t.Helper()
	if len(r.body) != 0 {
		t.Errorf("body = %q, want none", r.body)
	}
}

// TestRequestDeadline checks that a store call still running at
// RequestTimeout ends with 503 and Retry-After.
func TestRequestDeadline(t *testing.T) {
	f := newFixture(t, false, Options{RequestTimeout: 50 * time.Millisecond})
	f.store.set(nil, true, "")
	start := time.Now()
	f.run(t, apiCase{req: request{method: "GET", uri: "/users/1"}, status: 503, headers: map[string]string{"Retry-After": "1"}})
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("deadline answered after %v", d)
	}
}

func TestSetReady(t *testing.T) {
	f := newFixture(t, false, Options{})
	f.srv.SetReady(func(context.Context) error { return errors.New("migrations pending") })
	f.run(t, apiCase{req: request{method: "GET", uri: "/readyz"}, status: 503, headers: map[string]string{"Retry-After": "1"}})
	f.srv.SetReady(nil)
	f.run(t, apiCase{req: request{method: "GET", uri: "/readyz"}, status: 200})
}

func TestMetricsNotPublicByDefault(t *testing.T) {
	f := newFixture(t, false, Options{})
	f.run(t, apiCase{req: request{method: "GET", uri: "/metrics"}, status: 404})
}

func TestRequestID(t *testing.T) {
	f := newFixture(t, false, Options{})
	seen := map[string]bool{}
	for _, c := range []struct{ in, want string }{
		{"abc-123", "abc-123"},
		{"4bf92f3577b34da6a3ce929d0e0e4736", "4bf92f3577b34da6a3ce929d0e0e4736"},
		{"has space", ""},
		{"quote\"", ""},
		{strings.Repeat("a", 129), ""},
		{"", ""},
		{"", ""},
	} {
		h := map[string]string{}
		if c.in != "" {
			h["X-Request-ID"] = c.in
		}
		r := f.do(t, request{method: "GET", uri: "/livez", header: h})
		got := r.header["X-Request-Id"]
		if c.want != "" && got != c.want {
			t.Errorf("X-Request-ID %q echoed as %q", c.in, got)
		}
		if c.want == "" {
			if got == c.in || !validRequestID([]byte(got)) || seen[got] {
				t.Errorf("X-Request-ID %q: generated %q, want a new sane id", c.in, got)
			}
			seen[got] = true
		}
	}
}

func TestClientAddr(t *testing.T) {
	s := NewServer(newSQLiteStore(t), Options{TrustedProxies: []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("::1/128"),
	}})
	for _, c := range []struct{ remote, xff, want string }{
		{"192.0.2.1", "", "192.0.2.1"},
		{"192.0.2.1", "198.51.100.7", "192.0.2.1"},                      // untrusted peer: header ignored
		{"10.1.2.3", "198.51.100.7", "198.51.100.7"},                    // one trusted proxy
		{"10.1.2.3", "6.6.6.6, 198.51.100.7, 10.9.9.9", "198.51.100.7"}, // forged left part ignored
		{"::1", "2001:db8::5", "2001:db8::5"},
		{"10.1.2.3", "garbage", "10.1.2.3"},
		{"10.1.2.3", "", "10.1.2.3"},
		{"10.1.2.3", "10.4.4.4", "10.4.4.4"}, // all trusted: the farthest one
	} {
		var req fasthttp.Request
		req.SetRequestURI("/livez")
		if c.xff != "" {
			req.Header.Set("X-Forwarded-For", c.xff)
		}
		var rc fasthttp.RequestCtx
		rc.Init(&req, &net.TCPAddr{IP: net.ParseIP(c.remote)}, nil)
		if got := s.clientAddr(&rc).String(); got != c.want {
			t.Errorf("remote %s XFF %q: client %s, want %s", c.remote, c.xff, got, c.want)
		}
	}
}

func TestParseID(t *testing.T) {
	for in, want := range map[string]int64{
		"1": 1, "007": 7, "9223372036854775807": 9223372036854775807,
		"0": 0, "": 0, "-1": 0, "+1": 0, " 1": 0, "1e3": 0, "9223372036854775808": 0, "99999999999999999999": 0,
	} {
		got, ok := parseID([]byte(in))
		if ok != (want > 0) || (ok && got != want) {
			t.Errorf("parseID(%q) = %d, %v; want %d", in, got, ok, want)
		}
	}
}

func TestCursorRoundTrip(t *testing.T) {
	for _, id := range []int64{1, 255, 1 << 40, 9223372036854775807} {
		c := appendCursor(nil, id)
		got, ok := parseCursor(c)
		if !ok || got != id {
			t.Errorf("cursor %s of %d parsed as %d, %v", c, id, got, ok)
		}
	}
	for _, bad := range []string{"", "AQ", "AAAAAAAAAAAA", "AgAAAAAAAAAB", "AQAAAAAAAAAB=", "AQAAAAAAAAA*"} {
		if _, ok := parseCursor([]byte(bad)); ok {
			t.Errorf("cursor %q accepted", bad)
		}
	}
}

func TestNoneMatch(t *testing.T) {
	for _, c := range []struct {
		h    string
		want bool
	}{
		{`"3"`, true}, {`W/"3"`, true}, {` "1" , W/"3"`, true}, {`*`, true}, {`"1",,"3"`, true},
		{`"4"`, false}, {`3`, false}, {`"3`, false}, {`"03"`, true}, {`"1" x "3"`, false}, {``, false},
	} {
		if got := noneMatch([]byte(c.h), 3); got != c.want {
			t.Errorf("noneMatch(%q, 3) = %v, want %v", c.h, got, c.want)
		}
	}
}

// TestConcurrentHandlers runs the chain from many goroutines, for the race
// detector: metrics children, request ids and contexts are shared state.
func TestConcurrentHandlers(t *testing.T) {
	f := newFixture(t, true, Options{})
	id := f.create(t, "c@example.com", "C")["id"]
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for j := range 20 {
				r := f.do(t, request{method: "GET", uri: fmt.Sprintf("/users/%v", id)})
				if r.status != 200 {
					t.Errorf("GET = %d", r.status)
				}
				f.do(t, request{method: "PATCH", uri: fmt.Sprintf("/users/%v", id), header: mergeCT, body: fmt.Sprintf(`{"name":"C%d-%d"}`, i, j)})
			}
		})
	}
	wg.Wait()
}
