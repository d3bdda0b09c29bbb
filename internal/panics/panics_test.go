package panics

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestRecover(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	before := testutil.ToFloat64(Counter("test_recover"))
	call := func(fail bool) (err error) {
		defer Recover(log, "test_recover", &err)
		if fail {
			panic("boom")
		}
		return nil
	}
	if err := call(false); err != nil {
		t.Fatalf("no panic: err = %v", err)
	}
	err := call(true)
	var pe *Error
	if !errors.As(err, &pe) || pe.Where != "test_recover" || pe.Value != "boom" {
		t.Fatalf("err = %#v, want the panic as an *Error", err)
	}
	if got := testutil.ToFloat64(Counter("test_recover")) - before; got != 1 {
		t.Errorf("counted %v panics, want 1", got)
	}
	if l := logs.String(); !strings.Contains(l, "panic recovered") || !strings.Contains(l, "where=test_recover") || !strings.Contains(l, "panics_test.go") {
		t.Errorf("log lacks the panic, where or stack:\n%s", l)
	}
}

// TestLoop checks that a function that panics runs again after
// RestartDelay, and that Loop returns once it returns, or when ctx ends
// while it waits to restart.
func TestLoop(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	runs := 0
	start := time.Now()
	Loop(context.Background(), log, "test_loop", func() {
		runs++
		if runs < 3 {
			panic("again")
		}
	})()
	if runs != 3 {
		t.Errorf("ran %d times, want 3 (two panics, then a return)", runs)
	}
	if d := time.Since(start); d < 2*RestartDelay {
		t.Errorf("two restarts took %v, want at least %v", d, 2*RestartDelay)
	}
	if got := testutil.ToFloat64(Counter("test_loop")); got != 2 {
		t.Errorf("counted %v panics, want 2", got)
	}

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(Loop(ctx, log, "test_loop_stop", func() { panic("always") }))
	time.Sleep(10 * time.Millisecond)
	cancel()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(RestartDelay / 2):
		t.Fatal("Loop did not return when ctx ended during the restart delay")
	}
}

func TestRegisterTwice(t *testing.T) {
	reg := prometheus.NewRegistry()
	for range 2 {
		if err := Register(reg); err != nil {
			t.Fatal(err)
		}
	}
	Counter("test_register").Inc()
	if n, err := testutil.GatherAndCount(reg, "userapi_panics_total"); err != nil || n == 0 {
		t.Errorf("gathered %d series, %v", n, err)
	}
}
