package http

import (
	"bufio"
	"fmt"
	"io"
	"net"
	nethttp "net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"userapi"
	"userapi/internal/testenv"
	"userapi/ratelimit"
)

func TestRateLimit(t *testing.T) {
	proxy := netip.MustParsePrefix("127.0.0.1/32")
	srv := NewServer(newSQLiteStore(t), Options{
		RateLimit:      ratelimit.Limit{Rate: 1, Burst: 3},
		TrustedProxies: []netip.Prefix{proxy},
	})
	h := srv.Handler()
	get := func(remote, xff, uri string) response {
		r := request{method: "GET", uri: uri, remote: remote}
		if xff != "" {
			r.header = map[string]string{"X-Forwarded-For": xff}
		}
		return serveDirect(t, h, r)
	}

	for i := range 3 {
		r := get("127.0.0.2", "", "/users/1")
		if r.status != 404 {
			t.Fatalf("request %d: status %d, want 404 (allowed)", i+1, r.status)
		}
		if got, want := r.header["RateLimit-Policy"], `"client";q=3;w=3`; got != want {
			t.Errorf("RateLimit-Policy = %q, want %q", got, want)
		}
		if got, want := r.header["RateLimit"], fmt.Sprintf(`"client";r=%d;t=%d`, 2-i, i+1); got != want {
			t.Errorf("request %d: RateLimit = %q, want %q", i+1, got, want)
		}
	}
	r := get("127.0.0.2", "", "/users/1")
	if r.status != 429 || r.header["Content-Type"] != "application/problem+json" || r.header["Retry-After"] != "1" {
		t.Fatalf("4th request: %d %q Retry-After %q, want 429 problem+json with Retry-After 1", r.status, r.header["Content-Type"], r.header["Retry-After"])
	}
	if got := r.json(t)["type"]; got != typeRateLimited {
		t.Errorf("type = %v, want %s", got, typeRateLimited)
	}
	if got, want := r.header["RateLimit"], `"client";r=0;t=3`; got != want {
		t.Errorf("429: RateLimit = %q, want %q", got, want)
	}
	if got := testutil.ToFloat64(srv.metrics.rateLimited); got != 1 {
		t.Errorf("userapi_http_rate_limited_total = %v, want 1", got)
	}

	tests := []struct {
		name        string
		remote, xff string
		uri         string
		want        int
	}{
		{"health checks are never limited", "127.0.0.2", "", "/readyz", 200},
		{"another client is not affected", "127.0.0.3", "", "/users/1", 404},
		{"behind the trusted proxy, the forwarded client", "127.0.0.1", "127.0.0.2", "/users/1", 429},
		{"behind the trusted proxy, another client", "127.0.0.1", "127.0.0.4", "/users/1", 404},
		{"an untrusted peer cannot forge another address", "127.0.0.2", "127.0.0.5", "/users/1", 429},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if r := get(tt.remote, tt.xff, tt.uri); r.status != tt.want {
				t.Errorf("status %d, want %d", r.status, tt.want)
			}
		})
	}
}

func TestRateLimitOff(t *testing.T) {
	srv := NewServer(newSQLiteStore(t), Options{})
	for range 100 {
		r := serveDirect(t, srv.Handler(), request{method: "GET", uri: "/users/1"})
		if r.status != 404 || r.header["RateLimit"] != "" {
			t.Fatalf("status %d, RateLimit %q; want 404 without rate limit fields", r.status, r.header["RateLimit"])
		}
	}
}

// TestOverloadedProblem: the shedder's error is a 503 with Retry-After, of
// its own type, not logged one by one.
func TestOverloadedProblem(t *testing.T) {
	st := &faultStore{Store: newSQLiteStore(t)}
	var logs testenv.Buffer
	srv := NewServer(encodingStore{st}, Options{Logger: testLogger(&logs)})
	st.set(fmt.Errorf("get user 1: %w", userapi.ErrOverloaded), false, "")
	r := serveDirect(t, srv.Handler(), request{method: "GET", uri: "/users/1"})
	if r.status != 503 || r.header["Retry-After"] != "1" || r.json(t)["type"] != typeOverloaded {
		t.Errorf("%d Retry-After %q type %v, want 503, 1, %s", r.status, r.header["Retry-After"], r.json(t)["type"], typeOverloaded)
	}
	if strings.Contains(logs.String(), "request failed") {
		t.Errorf("shed request logged:\n%s", logs.String())
	}
}

// TestConnectionCaps: past MaxConnsPerIP a client's connection gets a 429,
// past MaxConns anyone's a 503, both problem+json with Retry-After, and a
// closed connection frees its slot.
func TestConnectionCaps(t *testing.T) {
	srv := NewServer(newSQLiteStore(t), Options{MaxConns: 3, MaxConnsPerIP: 2})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown(t.Context()) })
	addr := ln.Addr().String()

	a1, a2 := dialFrom(t, "127.0.0.2", addr), dialFrom(t, "127.0.0.2", addr)
	for _, c := range []net.Conn{a1, a2} {
		if st := roundTrip(t, c); st != 200 {
			t.Fatalf("connection within the caps: status %d", st)
		}
	}
	status, retry := rejected(t, dialFrom(t, "127.0.0.2", addr))
	if status != 429 || retry != "1" {
		t.Errorf("3rd connection from one address: %d Retry-After %q, want 429 and 1", status, retry)
	}
	b1 := dialFrom(t, "127.0.0.3", addr)
	if st := roundTrip(t, b1); st != 200 {
		t.Fatalf("another address's connection: status %d", st)
	}
	status, retry = rejected(t, dialFrom(t, "127.0.0.4", addr))
	if status != 503 || retry != "1" {
		t.Errorf("connection over the total: %d Retry-After %q, want 503 and 1", status, retry)
	}
	a1.Close()
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(srv.metrics.connsOpen) > 2 {
		if time.Now().After(deadline) {
			t.Fatal("closed connection still counted")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if st := roundTrip(t, dialFrom(t, "127.0.0.2", addr)); st != 200 {
		t.Errorf("after a close, a new connection: status %d", st)
	}
	for reason, want := range map[string]float64{"per_ip": 1, "total": 1} {
		if got := testutil.ToFloat64(srv.metrics.connsRejected.WithLabelValues(reason)); got != want {
			t.Errorf("rejected{%s} = %v, want %v", reason, got, want)
		}
	}
}

func dialFrom(t *testing.T, from, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip sends GET /livez on c and returns the status.
func roundTrip(t *testing.T, c net.Conn) int {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := nethttp.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// rejected reads the answer the server writes at accept on c.
func rejected(t *testing.T, c net.Conn) (status int, retryAfter string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	resp, err := nethttp.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/problem+json" {
		t.Errorf("Content-Type %q, want application/problem+json", ct)
	}
	return resp.StatusCode, resp.Header.Get("Retry-After")
}
