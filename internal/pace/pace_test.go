package pace

import (
	"testing"
	"time"
)

// TestPacerAllocatesNothing: waiting for an intended send time, by sleep or
// by spin, allocates nothing either.
func TestPacerAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's instrumentation allocates")
	}
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	t0 := time.Now()
	for _, wait := range []time.Duration{spinLast / 2, 4 * spinLast} {
		if got := testing.AllocsPerRun(100, func() {
			if !p.WaitUntil(t0, int64(time.Since(t0)+wait)) {
				t.Fatal("pacer stopped")
			}
		}); got != 0 {
			t.Errorf("wait of %v: %.2f allocations, want 0", wait, got)
		}
	}
}
