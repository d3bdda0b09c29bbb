//go:build !linux

package bench

import "time"

// pacer is a Go timer where there is no timerfd: its wake-ups are late by up
// to a millisecond when the process is idle (see pace.go), which the
// schedule lag then shows.
type pacer struct {
	timer   *time.Timer
	stopped chan struct{}
}

func newPacer() (*pacer, error) {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return &pacer{timer: t, stopped: make(chan struct{})}, nil
}

// sleep waits d (> 0), and reports false if the pacer was stopped.
func (p *pacer) sleep(d time.Duration) bool {
	p.timer.Reset(d)
	select {
	case <-p.timer.C:
		return true
	case <-p.stopped:
		p.timer.Stop()
		return false
	}
}

// stop makes the sleep in progress and every later one return false at
// once. It is called once, by the run, while the sender may be sleeping.
func (p *pacer) stop() { close(p.stopped) }

func (p *pacer) close() error { return nil }
