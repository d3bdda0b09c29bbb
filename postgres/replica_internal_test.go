package postgres

import (
	"math"
	"testing"
	"time"

	"userapi"
)

// sampled is a routing that sampled the primary at 100 for its first
// second, at 200 for the next and at 300 for the third; at gives the time
// ms after it began.
func sampled() (rt *routing, at func(ms int) time.Time) {
	t0 := time.Now()
	at = func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	return &routing{samples: []sample{
		{pos: 100, first: at(0), last: at(1000)},
		{pos: 200, first: at(1005), last: at(2000)},
		{pos: 300, first: at(2005), last: at(3000)},
	}}, at
}

func TestReplicaLag(t *testing.T) {
	rt, at := sampled()
	now := at(3000)
	for _, c := range []struct {
		replay userapi.Position
		want   time.Duration
	}{
		{300, 0},               // caught up
		{400, 0},               // ahead of the last sample
		{250, time.Second},     // lacks what the primary wrote after 2 s
		{200, time.Second},     // has everything up to the second sample
		{150, 2 * time.Second}, // lacks what came after 1 s
		{50, 3 * time.Second},  // older than every sample
	} {
		if got := rt.lagOf(c.replay, now); got != c.want {
			t.Errorf("lag at replay %d = %v, want %v", c.replay, got, c.want)
		}
	}
	// The primary's poll stopped 10 minutes ago: a replica at its last
	// sample is not "caught up", it is at least that far behind.
	if got := rt.lagOf(300, at(603000)); got != 10*time.Minute {
		t.Errorf("lag at the last sample, 10 min after it = %v, want 10m", got)
	}
	if got := (&routing{}).lagOf(300, now); got != lagUnknown {
		t.Errorf("lag with no sample of the primary = %v, want unknown", got)
	}
}

// TestReplicaFloor: what the primary had maxLag ago bounds every replica
// read, from the samples.
func TestReplicaFloor(t *testing.T) {
	rt, at := sampled()
	for _, c := range []struct {
		t    time.Time
		want userapi.Position
	}{
		{at(2500), 300}, // the primary had 300 from 2.005 s on
		{at(1500), 200},
		{at(1000), 100},
		{at(-500), 100}, // before every sample: the oldest known
	} {
		if got := rt.floorAt(c.t); got != c.want {
			t.Errorf("floor at %v = %d, want %d", c.t.Sub(at(0)), got, c.want)
		}
	}
	if got := (&routing{}).floorAt(at(0)); got != userapi.Position(math.MaxUint64) {
		t.Errorf("floor with no sample = %d, want beyond every replica", got)
	}
}

func TestReplicaNeeds(t *testing.T) {
	rt := &routing{maxLag: time.Second, recent: map[int64]userapi.Position{}}
	rt.acked(1, 10)
	rt.acked(2, 20)
	rt.acked(1, 30)
	for _, c := range []struct {
		ids   []int64
		after userapi.Position
		want  userapi.Position
	}{
		{[]int64{1}, 0, 30},
		{[]int64{2}, 0, 20},
		{[]int64{3}, 0, 0},
		{[]int64{3}, 25, 25},
		{[]int64{2, 3}, 0, 20},
		{[]int64{1, 2}, 40, 40},
	} {
		if got := rt.needOf(c.ids, c.after); got != c.want {
			t.Errorf("need of %v after %d = %d, want %d", c.ids, c.after, got, c.want)
		}
	}
	if got := rt.newest.Load(); got != 30 {
		t.Errorf("newest %d, want 30", got)
	}
	// Past the horizon every acknowledged write is needed by every read.
	rt.mu.Lock()
	for i := range rt.acks {
		rt.acks[i].at = rt.acks[i].at.Add(-2 * time.Second)
	}
	rt.mu.Unlock()
	if got := rt.needOf([]int64{3}, 0); got != 30 {
		t.Errorf("need of an unwritten id past the horizon = %d, want 30", got)
	}
	if len(rt.recent) != 0 || len(rt.acks) != 0 {
		t.Errorf("recent %v, acks %v after the horizon; want both empty", rt.recent, rt.acks)
	}
}
