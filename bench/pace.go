package bench

import "time"

// An open-loop sender waits for the intended send time of its next request
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
// microsecond, and the sender's goroutine runs as soon as a core is free. It
// costs a few system calls per wait, paid only when the sender is early.
// Elsewhere it is a Go timer (pace_other.go), with the lateness above.

// spinBelow is the wait under which a sender checks the clock in a loop
// instead of sleeping. Waking from a sleep costs tens of microseconds on a
// virtual machine (about 50 µs on the 2-core development VM), so a shorter
// sleep would end late by more than it waits; a spin of at most this long
// costs less CPU than the system calls of a sleep would.
const spinBelow = 50 * time.Microsecond

// waitUntil returns once the run's clock (time since t0) reaches at, in ns.
// It returns false at once, or as soon as it can, when the pacer is
// stopped: the run is ending and the request must not be sent.
func (p *pacer) waitUntil(t0 time.Time, at int64) bool {
	for {
		left := time.Duration(at - int64(time.Since(t0)))
		switch {
		case left <= 0:
			return true
		case left <= spinBelow:
			for int64(time.Since(t0)) < at {
			}
			return true
		case !p.sleep(left):
			return false
		}
	}
}
