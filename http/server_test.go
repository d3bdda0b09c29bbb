package http

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	nethttp "net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"userapi"
)

func TestDeadlines(t *testing.T) {
	d := deadlines{timeout: 30 * time.Millisecond}
	start := time.Now()
	ctx := d.context(start)
	dl, ok := ctx.Deadline()
	if min, max := start.Add(d.timeout), start.Add(d.timeout+deadlineSlot); !ok || dl.Before(min) || dl.After(max) {
		t.Fatalf("deadline %v, want within [%v, %v]", dl, min, max)
	}
	if same := d.context(start); same != ctx {
		t.Error("a request in the same slot got another context")
	}
	if allocs := testing.AllocsPerRun(100, func() { d.context(start) }); allocs != 0 {
		t.Errorf("context for a current slot allocates %v times", allocs)
	}
	later := start.Add(deadlineSlot)
	if next := d.context(later); next == ctx {
		t.Error("a request in the next slot got the previous slot's context")
	} else if dl2, _ := next.Deadline(); dl2.Before(later.Add(d.timeout)) {
		t.Errorf("next slot's deadline %v is before its start plus timeout", dl2)
	}
	if early := d.context(start); early == ctx {
		t.Error("the current slot did not move on")
	}
	select {
	case <-ctx.Done():
		if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			t.Errorf("Err = %v", ctx.Err())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("context did not end at its deadline")
	}
}

// TestServeAndShutdown checks the listener lifecycle: requests in flight
// when Shutdown starts are answered, Serve then returns nil, and the port
// takes no new connections.
func TestServeAndShutdown(t *testing.T) {
	st := &faultStore{Store: newSQLiteStore(t)}
	srv := NewServer(st, Options{RequestTimeout: 300 * time.Millisecond})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	base := "http://" + ln.Addr().String()

	st.set(nil, true, "") // the request waits in the store until its deadline
	type result struct {
		status int
		err    error
	}
	inflight := make(chan result, 1)
	go func() {
		resp, err := nethttp.Get(base + "/users/1")
		if err != nil {
			inflight <- result{err: err}
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		inflight <- result{status: resp.StatusCode}
	}()
	waitInFlight(t, srv)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown = %v", err)
	}
	r := <-inflight
	if r.err != nil || r.status != 503 {
		t.Errorf("in-flight request = %d, %v; want its 503 from the deadline", r.status, r.err)
	}
	if err := <-served; err != nil {
		t.Errorf("Serve = %v after Shutdown", err)
	}
	if c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Error("listener still accepts after Shutdown")
	}
}

func waitInFlight(t *testing.T, srv *Server) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if testutil.ToFloat64(srv.metrics.inFlight) >= 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("request never reached the handler")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestParseErrors checks the answers to requests fasthttp itself refuses,
// over a real connection: they are problem+json too.
func TestParseErrors(t *testing.T) {
	live := startLive(t, Options{MaxBodyBytes: 100})
	addr := strings.TrimPrefix(live.base, "http://")
	for _, c := range []struct {
		name, raw string
		status    int
	}{
		{"body too large", "POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 101\r\n\r\n" + strings.Repeat(" ", 101), 413},
		{"headers too large", "GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", 8192) + "\r\n\r\n", 431},
		{"garbage", "GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400},
	} {
		t.Run(c.name, func(t *testing.T) {
			resp, body := rawRequest(t, addr, c.raw)
			if resp.StatusCode != c.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, c.status, body)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/problem+json" {
				t.Errorf("Content-Type %q", ct)
			}
			if resp.Header.Get("X-Request-Id") == "" {
				t.Error("no X-Request-ID")
			}
		})
	}
}

// rawRequest writes raw to a new connection to addr, byte for byte (no
// client library cleans the request target), and reads the response.
func rawRequest(t *testing.T, addr, raw string) (*nethttp.Response, []byte) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	resp, err := nethttp.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, body
}

// TestRawPathRouting checks over a real connection that the route is
// chosen by the path as sent: percent-encoded slashes and dots, dot
// segments and doubled slashes never reach another route (a proxy that
// lets only /users/* through must not reach /openapi.json or /metrics),
// and an {id} that is not digits as sent is a 400.
func TestRawPathRouting(t *testing.T) {
	live := startLive(t, Options{PublicMetrics: true})
	if _, _, err := live.store.CreateUser(context.Background(), userapi.UserCreate{Email: "ada@example.com", Name: "Ada"}); err != nil {
		t.Fatal(err)
	}
	addr := strings.TrimPrefix(live.base, "http://")
	id := []string{"id"}
	for _, c := range []struct {
		method, target string
		status         int
		fields         []string // of a 400 problem
	}{
		{"GET", "/users/1", 200, nil},
		{"GET", "/users/1?x=..%2F", 200, nil},
		{"GET", "/users?limit=1", 200, nil},
		{"GET", "/openapi.json?x", 200, nil},
		{"GET", "http://x/users/1", 200, nil},
		{"GET", "/users/1#fragment", 200, nil},

		{"GET", "/users/..%2fopenapi.json", 400, id},
		{"GET", "/users/..%2Fmetrics", 400, id},
		{"GET", "/users/%2e%2e%2fopenapi.json", 400, id},
		{"GET", "/users/1%2F", 400, id},
		{"GET", "/users/%31", 400, id},
		{"GET", "/users/1;v=2", 400, id},
		{"GET", "/users/..", 400, id},
		{"GET", "/users/.", 400, id},
		{"GET", "http://x/users/..%2fopenapi.json", 400, id},
		{"PUT", "/users/..%2f1", 400, id},
		{"DELETE", "/users/%2e%2e%2f1", 400, id},

		{"GET", "/users/../openapi.json", 404, nil},
		{"GET", "/users/%2e%2e/openapi.json", 404, nil},
		{"GET", "/users/%2E%2E/metrics", 404, nil},
		{"GET", "/users/./1", 404, nil},
		{"GET", "/./users/1", 404, nil},
		{"GET", "/../users/1", 404, nil},
		{"GET", "/x/../users/1", 404, nil},
		{"GET", "/users//1", 404, nil},
		{"GET", "//users/1", 404, nil},
		{"GET", "/users/1/", 404, nil},
		{"GET", "/users/", 404, nil},
		{"GET", "/users%2F1", 404, nil},
		{"GET", "/openapi%2Ejson", 404, nil},
		{"GET", "/openapi.json/", 404, nil},
		{"GET", "/metrics/../openapi.json", 404, nil},
		{"GET", "/livez/..", 404, nil},
		{"GET", "/USERS/1", 404, nil},
	} {
		t.Run(c.method+" "+c.target, func(t *testing.T) {
			resp, body := rawRequest(t, addr, c.method+" "+c.target+" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"+
				"Authorization: Bearer "+live.keys["all"]+"\r\nConnection: close\r\n\r\n")
			if resp.StatusCode != c.status {
				t.Fatalf("status %d, want %d: %.200s", resp.StatusCode, c.status, body)
			}
			if c.status < 400 {
				return
			}
			checkProblem(t, response{status: resp.StatusCode, header: map[string]string{"Content-Type": resp.Header.Get("Content-Type")}, body: body},
				&wantProblem{fields: c.fields})
		})
	}
}

// TestShutdownDrains checks the drain before the close: during DrainDelay
// the server still answers, /readyz says 503, and every response tells the
// client to close the connection, so a balancer retires its keep-alive
// connections after a finished exchange instead of racing the close.
func TestShutdownDrains(t *testing.T) {
	srv := NewServer(newSQLiteStore(t), Options{DrainDelay: 500 * time.Millisecond})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	base := "http://" + ln.Addr().String()

	get := func(path string) *nethttp.Response {
		t.Helper()
		resp, err := nethttp.Get(base + path)
		if err != nil {
			t.Fatalf("GET %s during drain: %v", path, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	if r := get("/readyz"); r.StatusCode != 200 || r.Close {
		t.Fatalf("before shutdown /readyz = %d close=%v, want 200 keep-alive", r.StatusCode, r.Close)
	}
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(context.Background()) }()
	deadline := time.Now().Add(2 * time.Second)
	for !srv.draining.Load() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if r := get("/readyz"); r.StatusCode != 503 || !r.Close {
		t.Errorf("draining /readyz = %d close=%v, want 503 with Connection: close", r.StatusCode, r.Close)
	}
	if r := get("/livez"); r.StatusCode != 200 || !r.Close {
		t.Errorf("draining /livez = %d close=%v, want 200 with Connection: close", r.StatusCode, r.Close)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown = %v", err)
	}
	if err := <-served; err != nil {
		t.Errorf("Serve = %v after Shutdown", err)
	}
}
