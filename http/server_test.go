package http

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	nethttp "net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestRequestContextDeadline(t *testing.T) {
	t.Run("unobserved", func(t *testing.T) {
		c := newRequestContext(time.Now().Add(20 * time.Millisecond))
		if err := c.Err(); err != nil {
			t.Fatalf("Err before deadline = %v", err)
		}
		time.Sleep(30 * time.Millisecond)
		if err := c.Err(); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Err after deadline = %v", err)
		}
		select {
		case <-c.Done():
		default:
			t.Fatal("Done not closed after Err reported the deadline")
		}
		c.cancel()
		if err := c.Err(); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Err after cancel = %v, want it to stay DeadlineExceeded", err)
		}
	})
	t.Run("waited", func(t *testing.T) {
		c := newRequestContext(time.Now().Add(20 * time.Millisecond))
		defer c.cancel()
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("Done not closed at the deadline")
		}
		if err := c.Err(); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Err = %v", err)
		}
		if d, ok := c.Deadline(); !ok || time.Until(d) > 0 {
			t.Fatalf("Deadline = %v, %v", d, ok)
		}
	})
	t.Run("canceled", func(t *testing.T) {
		c := newRequestContext(time.Now().Add(time.Hour))
		done := c.Done()
		ran := make(chan struct{})
		context.AfterFunc(c, func() { close(ran) })
		c.cancel()
		<-done
		<-ran
		if err := c.Err(); !errors.Is(err, context.Canceled) {
			t.Fatalf("Err = %v", err)
		}
	})
	t.Run("derived", func(t *testing.T) {
		c := newRequestContext(time.Now().Add(50 * time.Millisecond))
		defer c.cancel()
		child, cancel := context.WithTimeout(c, time.Hour)
		defer cancel()
		if d, _ := child.Deadline(); d != c.deadline {
			t.Errorf("child deadline %v, want the request's %v", d, c.deadline)
		}
		select {
		case <-child.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("derived context outlived the request deadline")
		}
		if !errors.Is(child.Err(), context.DeadlineExceeded) {
			t.Errorf("child Err = %v", child.Err())
		}
	})
	t.Run("no goroutine per derived context", func(t *testing.T) {
		c := newRequestContext(time.Now().Add(time.Hour))
		before := runtime.NumGoroutine()
		var cancels []context.CancelFunc
		for range 100 {
			_, cancel := context.WithCancel(c)
			cancels = append(cancels, cancel)
		}
		if grown := runtime.NumGoroutine() - before; grown > 10 {
			t.Errorf("100 derived contexts started %d goroutines", grown)
		}
		for _, cancel := range cancels {
			cancel()
		}
		c.mu.Lock()
		left := len(c.afters)
		c.mu.Unlock()
		if left != 0 {
			t.Errorf("%d after-funcs left registered after the children were canceled", left)
		}
		c.cancel()
	})
	t.Run("after func stop", func(t *testing.T) {
		c := newRequestContext(time.Now().Add(time.Hour))
		stop := c.AfterFunc(func() { t.Error("stopped func ran") })
		if !stop() {
			t.Error("stop before end = false")
		}
		c.cancel()
		if stop() {
			t.Error("second stop = true")
		}
		ran := make(chan struct{})
		if c.AfterFunc(func() { close(ran) })() {
			t.Error("stop of a func registered after the end = true")
		}
		<-ran
	})
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
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.WriteString(conn, c.raw); err != nil {
				t.Fatal(err)
			}
			resp, err := nethttp.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
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
