//go:build !linux

package pace

import "time"

// Pacer is a Go timer where there is no timerfd: its wake-ups are late by up
// to a millisecond when the process is idle (see pace.go), which the
// schedule lag then shows.
type Pacer struct {
	timer   *time.Timer
	stopped chan struct{}
}

// New returns a pacer; Close releases it.
func New() (*Pacer, error) {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return &Pacer{timer: t, stopped: make(chan struct{})}, nil
}

// sleep waits d (> 0), and reports false if the pacer was stopped.
func (p *Pacer) sleep(d time.Duration) bool {
	p.timer.Reset(d)
	select {
	case <-p.timer.C:
		return true
	case <-p.stopped:
		p.timer.Stop()
		return false
	}
}

// Stop makes the sleep in progress and every later one return false at
// once. It is called once, by the run, while the sender may be sleeping.
func (p *Pacer) Stop() { close(p.stopped) }

func (p *Pacer) Close() error { return nil }
