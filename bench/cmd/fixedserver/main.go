// Command fixedserver is the reference point of performance comparisons: a
// minimal fasthttp server that answers every request with the same user JSON
// (and an ETag, like a cached read of userapi). No real service can be
// faster on the same machine, so "userapi's cached reads reach 0.9× of
// fixedserver" is a statement about the service's overhead, and running
// `userapi bench` and wrk against it compares the load generators.
//
// With --delay D every answer leaves D after its handler starts (a sleep on
// a timerfd that ends 50 µs early, then a busy wait: internal/pace), a
// server of known latency against which load generators' latency figures
// can be checked.
//
//	go run ./bench/cmd/fixedserver --addr 127.0.0.1:8090 [--delay 1ms]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"userapi/internal/pace"

	"github.com/valyala/fasthttp"
)

// body is what userapi returns for GET /users/1 (see userapi.User.AppendJSON).
const body = `{"id":1,"email":"user1@example.com","name":"User 1","created_at":"2026-11-25T18:50:00.123456Z","updated_at":"2026-11-25T18:50:00.123456Z","version":1}`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "fixedserver:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("fixedserver", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8090", "listen address")
	delay := fs.Duration("delay", 0, "answer each request this long after reading it")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	fmt.Fprintf(stderr, "fixedserver listening on http://%s\n", ln.Addr())
	b := []byte(body)
	var hold *pace.Hold
	if *delay > 0 {
		hold = pace.NewHold(*delay, 256)
		defer hold.Close()
	}
	srv := &fasthttp.Server{
		Handler: func(c *fasthttp.RequestCtx) {
			if hold != nil {
				hold.Wait(time.Now())
			}
			c.SetContentType("application/json")
			c.Response.Header.Set(fasthttp.HeaderETag, `"1"`)
			c.SetBody(b)
		},
		Name: "fixedserver",
		// The same idle bound as a production server would have; benchmark
		// connections are never idle that long.
		IdleTimeout: 2 * time.Minute,
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.ShutdownWithContext(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}
