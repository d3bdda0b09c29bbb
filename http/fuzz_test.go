package http

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/valyala/fasthttp"

	"userapi/internal/testenv"
)

// FuzzHandler sends arbitrary methods, URIs, headers and bodies through the
// whole chain over a real SQLite store. Bad input must get a 4xx, never a
// 5xx or a panic (a panic would be recovered as a 500), and every error must
// be a well-formed problem+json. `go test` runs the seeds below; run
// `go test -fuzz FuzzHandler ./http` to explore.
func FuzzHandler(f *testing.F) {
	seeds := []struct{ method, uri, header, body string }{
		{"GET", "/users/1", "", ""},
		{"GET", "/users/1", "If-None-Match: W/\"1\", \"2\"", ""},
		{"HEAD", "/users/1", "", ""},
		{"GET", "/users/18446744073709551616", "", ""},
		{"GET", "/users/%31", "", ""},
		{"GET", "/users?limit=2&cursor=AQAAAAAAAAAB&email=ADA@example.com", "", ""},
		{"GET", "/users?limit=-1&cursor=%00", "", ""},
		{"POST", "/users", "Content-Type: application/json\nIdempotency-Key: k", `{"email":"f@example.com","name":"F"}`},
		{"POST", "/users", "Content-Type: application/json", `{"email":"f@example.com","name":"F","name":"G"}`},
		{"POST", "/users", "Content-Type: application/json", `{"email":"\ud800@example.com","name":"\u0000"}`},
		{"POST", "/users", "Content-Type: application/json", `{"email":1e999,"name":[]}`},
		{"POST", "/users", "Content-Type: application/json; charset=\"utf-8\"", `{"email":"g@example.com","name":"` + strings.Repeat("é", 201) + `"}`},
		{"PUT", "/users/1", "Content-Type: application/json\nIf-Match: \"1\"", `{"email":"f@example.com","name":"F"}`},
		{"PUT", "/users/1", "Content-Type: application/json\nIf-Match: \"1\", \"2\", W/\"3\"", `{"email":"f@example.com","name":"F"}`},
		{"PATCH", "/users/1", "Content-Type: application/merge-patch+json\nIf-Match: *", `{"name":null}`},
		{"PATCH", "/users/1", "Content-Type: application/merge-patch+json", `{}`},
		{"DELETE", "/users/1", "If-Match: \"", ""},
		{"DELETE", "/users/2", "", ""},
		{"OPTIONS", "*", "", ""},
		{"GET", "/livez", "X-Request-ID: \x00\n", ""},
		{"GET", "/readyz", "X-Forwarded-For: 1.2.3.4, ::1", ""},
		{"GET", "/openapi.json", "Accept-Encoding: gzip;q=0.5", ""},
		{"GET", "/metrics", "Accept: application/openmetrics-text", ""},
		{"GET", "/../users/./1", "", ""},
		{"\x00", "//users//1", "", ""},
	}
	for _, s := range seeds {
		f.Add(s.method, s.uri, s.header, []byte(s.body))
	}

	st := newSQLiteStore(f)
	srv := NewServer(st, Options{PublicMetrics: true, MaxBodyBytes: 4096})
	h := srv.Handler()
	for _, email := range []string{"a@example.com", "b@example.com"} {
		r := serveDirect(f, h, request{method: "POST", uri: "/users", header: jsonCT, body: `{"email":"` + email + `","name":"Seed"}`})
		if r.status != 201 {
			f.Fatalf("seed user: %d %s", r.status, r.body)
		}
	}

	f.Fuzz(func(t *testing.T, method, uri, header string, body []byte) {
		var req fasthttp.Request
		req.Header.SetMethod(method)
		req.SetRequestURI(uri)
		for line := range strings.SplitSeq(header, "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			if strings.EqualFold(strings.TrimSpace(k), "Content-Type") {
				req.Header.SetContentType(strings.TrimSpace(v))
				continue
			}
			req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
		}
		req.SetBody(body)
		var rc fasthttp.RequestCtx
		rc.Init(&req, &net.TCPAddr{IP: net.IPv6loopback}, nil)
		h(&rc)

		status := rc.Response.StatusCode()
		if status < 200 || status >= 500 {
			t.Fatalf("%q %q (header %q, body %q) = %d: %s", method, uri, header, body, status, rc.Response.Body())
		}
		if status < 400 {
			return
		}
		if ct := string(rc.Response.Header.ContentType()); ct != "application/problem+json" {
			t.Fatalf("%d with Content-Type %q", status, ct)
		}
		var p struct {
			Type, Title, Detail string
			Status              int
		}
		if err := json.Unmarshal(rc.Response.Body(), &p); err != nil || p.Status != status || p.Type == "" || p.Title == "" || p.Detail == "" {
			t.Fatalf("%d problem %q: %v", status, rc.Response.Body(), err)
		}
	})
}

// FuzzDecodeUserFields checks the body decoder alone: it answers every
// input with fields or a 400 problem, and the fields it returns are valid
// UTF-8 holding U+FFFD only where the client wrote one (raw or escaped),
// never as the stand-in for bytes or escapes it could not decode.
func FuzzDecodeUserFields(f *testing.F) {
	for _, s := range []string{
		`{"email":"a@example.com","name":"Ada"}`,
		`{"email":null}`,
		"{\"email\":\"\xff\xfe@example.com\",\"name\":\"x\"}",
		`{"name":"\ud83d\ude00"}`,
		`{"name":"\ud800"}`,
		`{"name":"\\ud800"}`,
		`{"name":"\ufffd\uFFFD�"}`,
		`{"name":"\u00e9\"\\\/\b\f\n\r\t"}`,
		`{"name":"x"} `,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		fields, err := decodeUserFields(body)
		if err != nil {
			var p *problem
			if !errors.As(err, &p) || p.Status != 400 {
				t.Fatalf("decode %q: %v, want a 400 problem", body, err)
			}
			return
		}
		sent := bytes.Contains(body, []byte("\ufffd")) || bytes.Contains(bytes.ToLower(body), []byte(`\ufffd`))
		for _, s := range []string{fields.email, fields.name} {
			if !utf8.ValidString(s) {
				t.Fatalf("decode %q: field %q is not valid UTF-8", body, s)
			}
			if strings.ContainsRune(s, utf8.RuneError) && !sent {
				t.Fatalf("decode %q: field %q has a U+FFFD the body did not", body, s)
			}
		}
	})
}

// FuzzRawPath checks that a request reaches the route its path names as
// sent, segment by segment, whatever percent-encodings or dot segments it
// holds: the route in the request's log line must be the one wantRoute
// reads off the raw path, and an {id} that is not digits is a 400.
// Run it with `go test -fuzz FuzzRawPath ./http`.
func FuzzRawPath(f *testing.F) {
	for _, s := range []string{
		"/users/1", "/users", "/users/..%2fopenapi.json", "/users/%2e%2e/metrics", "/users/../openapi.json",
		"/users/./1", "/./openapi.json", "/users/1%2F", "/users%2f1", "/users/%31", "/users/1?x=/../metrics",
		"/openapi.json#/../users", "/livez/..", "/users/..;/metrics", "/users/\\..\\metrics", "/users/1/",
	} {
		f.Add(s)
	}
	logs := &testenv.Buffer{}
	srv := NewServer(newSQLiteStore(f), Options{PublicMetrics: true, Logger: testLogger(logs)})
	h := srv.Handler()
	routeRE := regexp.MustCompile(` route=(\S+)`)
	f.Fuzz(func(t *testing.T, target string) {
		// Origin-form targets only, as a client sends them; a target
		// starting with "//" would be read as an authority.
		if !strings.HasPrefix(target, "/") || strings.HasPrefix(target, "//") || strings.ContainsFunc(target, func(r rune) bool { return r <= ' ' || r >= 0x7f }) {
			return
		}
		var req fasthttp.Request
		req.Header.SetHost("example.com")
		req.SetRequestURI(target)
		var rc fasthttp.RequestCtx
		rc.Init(&req, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, nil)
		logs.Reset()
		h(&rc)

		m := routeRE.FindStringSubmatch(logs.String())
		if m == nil {
			t.Fatalf("GET %q: no route in the log %q", target, logs.String())
		}
		path, _, _ := strings.Cut(target, "?")
		path, _, _ = strings.Cut(path, "#")
		want, id := wantRoute(path)
		if m[1] != want {
			t.Fatalf("GET %q reached route %s, want %s", target, m[1], want)
		}
		status := rc.Response.StatusCode()
		if want == "/users/{id}" && strings.Trim(id, "0123456789") != "" && status != 400 {
			t.Fatalf("GET %q with id %q = %d, want 400", target, id, status)
		}
		if status >= 500 {
			t.Fatalf("GET %q = %d: %s", target, status, rc.Response.Body())
		}
	})
}

// wantRoute names the route a raw path's segments spell, compared byte for
// byte with the templates, and the {id} segment if any.
func wantRoute(path string) (route, id string) {
	switch path {
	case "/users", "/livez", "/readyz", "/openapi.json", "/metrics":
		return path, ""
	}
	if seg := strings.Split(path, "/"); len(seg) == 3 && seg[0] == "" && seg[1] == "users" && seg[2] != "" {
		return "/users/{id}", seg[2]
	}
	return routeUnmatched, ""
}
