package testenv

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"userapi"
)

// Follower runs a userapi.ChangeFeed's FollowChanges in the background and
// records what it delivers, for the stores' own change-stream tests.
type Follower struct {
	mu      sync.Mutex
	changes []userapi.Change
	missed  int
	err     error
	// Fail, while it returns an error, makes apply fail with it (nothing
	// is acknowledged).
	Fail   func() error
	cancel context.CancelFunc
	done   chan struct{}
}

// Follow starts following feed until Stop or the test's end.
func Follow(tb testing.TB, feed userapi.ChangeFeed) *Follower {
	ctx, cancel := context.WithCancel(context.Background())
	f := &Follower{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(f.done)
		err := feed.FollowChanges(ctx, f.apply, f.miss)
		f.mu.Lock()
		f.err = err
		f.mu.Unlock()
	}()
	tb.Cleanup(f.Stop)
	return f
}

func (f *Follower) apply(_ context.Context, cs []userapi.Change) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.Fail != nil {
		if err := f.Fail(); err != nil {
			return err
		}
	}
	f.changes = append(f.changes, cs...)
	return nil
}

func (f *Follower) miss(context.Context) error {
	f.mu.Lock()
	f.missed++
	f.mu.Unlock()
	return nil
}

// Stop ends FollowChanges and waits for it to return.
func (f *Follower) Stop() {
	f.cancel()
	<-f.done
}

// Err is what FollowChanges returned, nil while it runs.
func (f *Follower) Err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// Changes returns the changes delivered so far, in order.
func (f *Follower) Changes() []userapi.Change {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.changes)
}

// Missed returns how many times missed was called.
func (f *Follower) Missed() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.missed
}

// Has reports whether a change of id at version (0 and Deleted for a
// delete) was delivered.
func (f *Follower) Has(id, version int64) bool {
	return slices.ContainsFunc(f.Changes(), func(c userapi.Change) bool {
		return c.ID == id && c.Version == version && c.Deleted == (version == 0)
	})
}

// WaitFor polls cond every millisecond until it holds, failing the test
// after d.
func WaitFor(tb testing.TB, d time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(time.Millisecond)
	}
}
