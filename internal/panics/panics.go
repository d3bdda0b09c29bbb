// Package panics keeps a panic in a background goroutine from killing the
// process. Every goroutine the service starts runs its function through
// Loop, and a call whose callers wait on it defers Recover: a panic is then
// counted in userapi_panics_total{where}, logged at error level with its
// stack, and the goroutine's duty goes on (Loop runs the function again;
// Recover makes the panic the interrupted call's error, so whoever waits
// for it gets an answer).
//
// Panics in HTTP handlers are not counted here: the server's own recovery
// answers them with a 500 (http/routes.go).
package panics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// total is process-wide, as a panic is the process's event, whichever
// component recovered it.
var total = prometheus.NewCounterVec(prometheus.CounterOpts{
	Name: "userapi_panics_total",
	Help: "Panics recovered in background goroutines, by where (logged at error level with the stack).",
}, []string{"where"})

// Register adds the panics counter to reg. Registering it again (several
// components, one registry) is not an error.
func Register(reg prometheus.Registerer) error {
	if err := reg.Register(total); err != nil {
		var already prometheus.AlreadyRegisteredError
		if !errors.As(err, &already) {
			return fmt.Errorf("register panics counter: %w", err)
		}
	}
	return nil
}

// Counter returns the count of panics recovered at where, for reading
// (testutil.ToFloat64).
func Counter(where string) prometheus.Counter { return total.WithLabelValues(where) }

// Error is what a recovered panic becomes.
type Error struct {
	Where string
	Value any // what was passed to panic
}

func (e *Error) Error() string { return fmt.Sprintf("panic in %s: %v", e.Where, e.Value) }

// Recover must be deferred directly (defer panics.Recover(…)). When the
// deferring function panics, it recovers, counts and logs the panic, and
// stores it as an *Error in *errp (if errp is not nil), so that function
// returns the error instead of unwinding the goroutine. Without a panic it
// does nothing.
func Recover(log *slog.Logger, where string, errp *error) {
	v := recover()
	if v == nil {
		return
	}
	total.WithLabelValues(where).Inc()
	log.Error("panic recovered", "where", where, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
	if errp != nil {
		*errp = &Error{Where: where, Value: v}
	}
}

// RestartDelay is how long Loop waits before running a function that
// panicked again: long enough that a panic on every run costs one log line
// a second rather than a spinning core, short enough for the duty (a probe
// loop, a loader worker) to resume soon.
const RestartDelay = time.Second

// Loop returns a function, for `go` or sync.WaitGroup.Go, that runs fn until
// it returns. Each time fn panics the panic is recovered as Recover does,
// and fn runs again after RestartDelay, unless ctx has ended by then. fn
// must be safe to start afresh: it keeps what must survive a panic outside
// its own frame.
func Loop(ctx context.Context, log *slog.Logger, where string, fn func()) func() {
	total.WithLabelValues(where) // the series exists, at 0, from the start
	return func() {
		for !returns(log, where, fn) {
			t := time.NewTimer(RestartDelay)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

// returns runs fn and reports whether it returned (false: it panicked).
func returns(log *slog.Logger, where string, fn func()) (ok bool) {
	defer Recover(log, where, nil)
	fn()
	return true
}
