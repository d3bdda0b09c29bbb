// Package pace waits until a given time to the microsecond, where Go's
// timers are late by up to a millisecond.
//
// An open-loop sender (package bench) waits for the intended send time of its next request
// on a pacer of its own. Go's timers cannot do this job: when the process
// has nothing else to run, the runtime sleeps in epoll_wait, whose timeout
// is in whole milliseconds, rounded up below one. A timer due in 0.3 ms
// fires after about 1 ms, so a sender woken by one leaves 0 to 1 ms late,
// 0.5 ms on average, and since open-loop latency counts from the intended
// time, that lateness was reported as the server's: a server answering in
// 0.2 ms at 2,000 req/s showed a p50 of 0.64 ms.
//
// On Linux the pacer is a timerfd (pace_linux.go): the kernel's
// high-resolution timer wakes the runtime's poller at the set time, to the
// microsecond, and the sender's goroutine runs as soon as a core is free;
// the last few tens of microseconds are spun (see spinLast). It costs a few
// system calls per wait, paid only when the sender is early.
// Elsewhere it is a Go timer (pace_other.go), with the lateness above.
package pace

import "time"

// spinLast is how much of a wait is spent checking the clock in a loop
// rather than asleep: a sleep is set to end this long before the intended
// time. Waking from a sleep takes tens of microseconds on a virtual machine
// (a timerfd read by a blocked thread wakes 55-70 µs late at p50 on the
// 2-core development VM, whatever the timer slack), so a sleep to the
// intended time itself would leave that late; ending it early and spinning
// the rest sends on time. The spin costs CPU only when the wake-up was quick,
// and at most this long per request.
const spinLast = 50 * time.Microsecond

// WaitUntil returns once the run's clock (time since t0) reaches at, in ns.
// It returns false at once, or as soon as it can, when the pacer is
// stopped: the run is ending and the request must not be sent.
func (p *Pacer) WaitUntil(t0 time.Time, at int64) bool {
	for {
		left := time.Duration(at - int64(time.Since(t0)))
		switch {
		case left <= 0:
			return true
		case left <= spinLast:
			for int64(time.Since(t0)) < at {
			}
			return true
		case !p.sleep(left - spinLast):
			return false
		}
	}
}

// Hold holds answers for a fixed time after their start: the handler of a
// server of known latency, against which load generators' figures are
// checked (the bench tests, bench/cmd/fixedserver --delay). It keeps idle
// pacers for reuse; any number of handlers may wait at once.
type Hold struct {
	d    time.Duration
	idle chan *Pacer
}

// NewHold returns a Hold of d that keeps up to keep idle pacers.
func NewHold(d time.Duration, keep int) *Hold {
	return &Hold{d: d, idle: make(chan *Pacer, keep)}
}

// Wait returns d after start, to within the machine's wake-up time when a
// core is free. Without a pacer (the process is out of descriptors) it
// spins.
func (h *Hold) Wait(start time.Time) {
	var p *Pacer
	select {
	case p = <-h.idle:
	default:
		var err error
		if p, err = New(); err != nil {
			for time.Since(start) < h.d {
			}
			return
		}
	}
	p.WaitUntil(start, int64(h.d))
	select {
	case h.idle <- p:
	default:
		_ = p.Close()
	}
}

// Close releases the idle pacers; call it when no Wait is running.
func (h *Hold) Close() {
	for {
		select {
		case p := <-h.idle:
			_ = p.Close()
		default:
			return
		}
	}
}
