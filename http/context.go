package http

import (
	"context"
	"sync"
	"time"
)

// requestContext is the context handlers pass to the store: it has no
// values and ends at the request deadline, or with Canceled when the
// request is done.
//
// It exists because context.WithDeadline costs a timer and three
// allocations per request, and fasthttp.RequestCtx has no deadline (and
// as a parent would make every derived context start a goroutine). Here
// the timer is armed only when someone waits on Done or registers an
// AfterFunc, which a read served from the local cache never does, so the
// whole context is one small allocation. It implements AfterFunc, so
// contexts the stores derive from it (context.WithTimeout) are linked
// without a goroutine, as they are to the standard library's contexts.
//
// It is a fresh allocation per request, not pooled: a store may keep a
// context past the call (a shared load, a detached goroutine), and a
// reused one would come back to life with another request's deadline.
type requestContext struct {
	deadline time.Time

	mu     sync.Mutex
	err    error         // non-nil once ended
	done   chan struct{} // made on first Done or AfterFunc; closed when ended
	timer  *time.Timer   // armed with done while not ended
	afters []*afterFunc  // functions to start when ended
}

type afterFunc struct{ f func() }

func newRequestContext(deadline time.Time) *requestContext {
	return &requestContext{deadline: deadline}
}

func (c *requestContext) Deadline() (time.Time, bool) { return c.deadline, true }

func (c *requestContext) Value(any) any { return nil }

func (c *requestContext) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.armLocked()
	return c.done
}

// Err reports DeadlineExceeded once the deadline has passed, Canceled once
// the request is done, and nil before. When nobody waits on Done it reads
// the clock instead of relying on the timer, which is then never armed.
func (c *requestContext) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil && c.done == nil && !time.Now().Before(c.deadline) {
		c.err = context.DeadlineExceeded // Done, when first called, is closed
	}
	return c.err
}

// AfterFunc starts f in its own goroutine when c ends, as
// context.AfterFunc does; stop unregisters it and reports whether it did.
// The context package uses this method to link derived contexts.
func (c *requestContext) AfterFunc(f func()) (stop func() bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.armLocked()
	if c.err != nil {
		go f()
		return func() bool { return false }
	}
	a := &afterFunc{f: f}
	c.afters = append(c.afters, a)
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		for i, x := range c.afters {
			if x == a {
				c.afters = append(c.afters[:i], c.afters[i+1:]...)
				return true
			}
		}
		return false
	}
}

// armLocked makes the done channel and starts the deadline timer, or
// closes done at once if c has already ended.
func (c *requestContext) armLocked() {
	if c.done != nil {
		return
	}
	c.done = make(chan struct{})
	if c.err == nil {
		if d := time.Until(c.deadline); d > 0 {
			c.timer = time.AfterFunc(d, c.expire)
			return
		}
		c.err = context.DeadlineExceeded
	}
	close(c.done)
}

func (c *requestContext) expire() { c.end(context.DeadlineExceeded) }

// cancel ends c when its request is done, releasing the timer.
func (c *requestContext) cancel() { c.end(context.Canceled) }

func (c *requestContext) end(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = err
	if c.done == nil {
		return // nobody waits: nothing to close or stop
	}
	c.timer.Stop()
	close(c.done)
	for _, a := range c.afters {
		go a.f()
	}
	c.afters = nil
}

func (c *requestContext) String() string { return "http.requestContext" }
