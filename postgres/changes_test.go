package postgres_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"userapi"
	"userapi/internal/pgtest"
	"userapi/internal/testenv"
	"userapi/postgres"
)

// TestChangeLagBytes: userapi_change_stream_lag_bytes is the WAL the slot
// holds that its follower has not applied. It rises while the follower is
// busy, falls once it has caught up, and rises again while no one follows.
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
	create := func(n int, what string) {
		t.Helper()
		for i := range n {
			if _, _, err := s.CreateUser(testenv.Context(t), userapi.UserCreate{Email: fmt.Sprintf("lag-%s-%d@example.com", what, i), Name: "Lag"}); err != nil {
				t.Fatal(err)
			}
		}
	}

	ctx, cancel := context.WithCancel(testenv.Context(t))
	following := make(chan struct{})
	release := make(chan struct{})
	applied := make(chan struct{}, 100)
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
			applied <- struct{}{}
			return nil
		}, func(context.Context) error { close(following); return nil })
	}()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("FollowChanges: %v", err)
		}
	}
	t.Cleanup(stop)
	select {
	case <-following:
	case <-time.After(10 * time.Second):
		t.Fatal("the stream did not create its slot")
	}
	create(1, "first")
	<-applied
	create(20, "held")
	testenv.WaitFor(t, 5*time.Second, "lag while the consumer is held", func() bool { return lag() > 0 })
	held := lag()
	close(release)
	// Caught up: what is left is WAL written since (the server's own, or
	// other databases' on a shared server).
	testenv.WaitFor(t, 10*time.Second, "the lag back down", func() bool { return lag() < held })
	caughtUp := lag()

	stop()
	create(50, "unfollowed")
	if got := lag(); got <= caughtUp {
		t.Errorf("with no follower, 50 writes later the lag is %v bytes, was %v: it must grow", got, caughtUp)
	}
	t.Logf("lag held %v bytes, caught up %v, with no follower %v", held, caughtUp, lag())
}

// TestOpenRefusesBadSlotName: a slot name outside PostgreSQL's rule is
// refused when the store opens, not by the stream's retries later.
func TestOpenRefusesBadSlotName(t *testing.T) {
	for _, name := range []string{"Users", "user-api", "a b", "x'); DROP TABLE users; --", strings.Repeat("a", 64)} {
		_, err := postgres.Open(testenv.Context(t), "postgres://postgres@127.0.0.1:1/none", postgres.Options{ChangeSlot: name})
		if err == nil || !strings.Contains(err.Error(), "slot name") {
			t.Errorf("ChangeSlot %q: Open gave %v, want the slot name refused", name, err)
		}
	}
}
