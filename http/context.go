package http

import (
	"context"
	"sync/atomic"
	"time"
)

// deadlineSlot is the granularity of request deadlines. Requests that start
// within the same slot share one context, so a request costs an atomic
// load instead of context.WithDeadline's timer and three allocations;
// a new context is made at most once per slot (100 a second under load).
// A deadline is late by at most two slots (a request may get the next
// slot's context): 20 ms on seconds.
const deadlineSlot = 10 * time.Millisecond

// deadlines hands out request contexts: a standard context.WithDeadline
// whose deadline is the request's start plus the timeout, rounded up to the
// end of its slot. Being standard, contexts the stores derive from it link
// to it without a goroutine. The contexts are never canceled early (they
// are shared), only at their deadline, so a request's context outlives
// the request by at most the timeout.
type deadlines struct {
	timeout time.Duration
	current atomic.Pointer[deadlineContext]
}

type deadlineContext struct {
	slot int64
	ctx  context.Context
	// cancel is kept only to release the timer early if ever needed; the
	// context ends on its own at its deadline.
	cancel context.CancelFunc
}

// context returns the context of a request that started at start.
func (d *deadlines) context(start time.Time) context.Context {
	slot := start.UnixNano() / int64(deadlineSlot)
	cur := d.current.Load()
	if cur != nil && cur.slot >= slot {
		// The current slot, or (for a request that started just before
		// another installed the next slot) a deadline up to a slot later.
		return cur.ctx
	}
	return d.next(cur, slot)
}

func (d *deadlines) next(cur *deadlineContext, slot int64) context.Context {
	end := time.Unix(0, (slot+1)*int64(deadlineSlot)).Add(d.timeout)
	ctx, cancel := context.WithDeadline(context.Background(), end)
	n := &deadlineContext{slot: slot, ctx: ctx, cancel: cancel}
	// Losing the race to another request is fine: ctx still has the right
	// deadline and ends by itself.
	d.current.CompareAndSwap(cur, n)
	return ctx
}
