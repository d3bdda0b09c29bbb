package pace

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Pacer is a timerfd read through the runtime's poller: the goroutine parks
// like on a socket, and the timer's expiry wakes the poller at once instead
// of at its next whole millisecond (see pace.go).
type Pacer struct {
	fd  int
	f   *os.File // owns fd; reads on it park the goroutine in the poller
	buf [8]byte  // the expiration count a read returns
}

// New returns a pacer; Close releases it.
func New() (*Pacer, error) {
	fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("timerfd_create: %w", err)
	}
	return &Pacer{fd: fd, f: os.NewFile(uintptr(fd), "pacer")}, nil
}

// sleep waits d (> 0), and reports false if the pacer was stopped.
func (p *Pacer) sleep(d time.Duration) bool {
	spec := unix.ItimerSpec{Value: unix.NsecToTimespec(int64(d))}
	if err := unix.TimerfdSettime(p.fd, 0, &spec, nil); err != nil {
		return false // only on a closed descriptor: stopped
	}
	_, err := p.f.Read(p.buf[:])
	return err == nil
}

// Stop makes the sleep in progress and every later one return false at
// once; it may be called while the sender sleeps.
func (p *Pacer) Stop() { _ = p.f.SetReadDeadline(time.Unix(1, 0)) }

func (p *Pacer) Close() error { return p.f.Close() }
