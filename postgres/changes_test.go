package postgres_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"userapi"
	"userapi/internal/pgtest"
	"userapi/internal/testenv"
	"userapi/postgres"
)

// TestChangeLagBytes: while the change stream's consumer is busy, the WAL
// it has not applied shows in userapi_change_stream_lag_bytes, and goes
// back to zero once it has caught up.
func TestChangeLagBytes(t *testing.T) {
	url := pgtest.DatabaseOn(t, pgtest.LogicalURL(t))
	s, err := postgres.Open(testenv.Context(t), url, postgres.Options{MaxConns: 4, Migrate: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	reg := prometheus.NewRegistry()
	s.RegisterMetrics(reg)
	lag := func() float64 { return testenv.Sum(t, reg, "userapi_change_stream_lag_bytes", "", "") }

	ctx, cancel := context.WithCancel(testenv.Context(t))
	following := make(chan struct{})
	release := make(chan struct{})
	applied := make(chan int, 100)
	done := make(chan error, 1)
	go func() {
		calls := 0
		done <- s.FollowChanges(ctx, func(ctx context.Context, cs []userapi.Change) error {
			calls++
			if calls == 2 { // hold the second batch: the consumer is busy
				select {
				case <-release:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			applied <- len(cs)
			return nil
		}, func(context.Context) error { close(following); return nil })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("FollowChanges: %v", err)
		}
	})
	select {
	case <-following:
	case <-time.After(10 * time.Second):
		t.Fatal("the stream did not create its slot")
	}
	create := func(email string) {
		t.Helper()
		if _, _, err := s.CreateUser(testenv.Context(t), userapi.UserCreate{Email: email, Name: "Lag"}); err != nil {
			t.Fatal(err)
		}
	}
	create("lag-first@example.com")
	<-applied
	create("lag-held@example.com")
	testenv.WaitFor(t, 5*time.Second, "the held change read", func() bool { return lag() > 0 })
	for i := range 20 {
		create("lag-" + string(rune('a'+i)) + "@example.com")
	}
	held := lag()
	close(release)
	testenv.WaitFor(t, 10*time.Second, "the stream caught up", func() bool { return lag() == 0 })
	t.Logf("lag while the consumer was held: %v bytes", held)
}
