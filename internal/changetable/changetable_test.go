package changetable

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"userapi"
	"userapi/internal/testenv"
)

func TestRuns(t *testing.T) {
	tests := []struct {
		seqs []int64
		want runs
	}{
		{nil, nil},
		{[]int64{5}, runs{{5, 5}}},
		{[]int64{1, 2, 3}, runs{{1, 3}}},
		{[]int64{1, 2, 4, 5, 9}, runs{{1, 2}, {4, 5}, {9, 9}}},
	}
	for _, tt := range tests {
		var got runs
		for _, s := range tt.seqs {
			got.add(s)
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("runs of %v = %v, want %v", tt.seqs, got, tt.want)
		}
	}
	var long runs
	for s := range int64(maxRun + 1) {
		long.add(s + 1)
	}
	if want := (runs{{1, maxRun}, {maxRun + 1, maxRun + 1}}); !slices.Equal(long, want) {
		t.Errorf("a run longer than maxRun = %v, want %v", long, want)
	}
}

// memTable is a change table in memory whose rows can be hidden, as rows
// of transactions not yet committed are.
type memTable struct {
	mu       sync.Mutex
	rows     map[int64]Row
	hidden   map[int64]bool
	triggers bool
}

func newMemTable() *memTable {
	return &memTable{rows: map[int64]Row{}, hidden: map[int64]bool{}, triggers: true}
}

func (m *memTable) put(seq, id, version int64, hidden bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.rows[seq] = Row{Seq: seq, Change: userapi.Change{ID: id, Version: version}}
	m.hidden[seq] = hidden
}

func (m *memTable) commit(seq int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.hidden[seq] = false
}

func (m *memTable) visible() []Row {
	var out []Row
	for s, r := range m.rows {
		if !m.hidden[s] {
			out = append(out, r)
		}
	}
	slices.SortFunc(out, func(a, b Row) int { return int(a.Seq - b.Seq) })
	return out
}

func (m *memTable) Oldest(_ context.Context, n int) ([]Row, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.visible()
	return v[:min(n, len(v))], nil
}

func (m *memTable) Count(context.Context) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, r := range m.visible() {
		if r.Seq > 0 {
			n++
		}
	}
	return int64(n), nil
}

func (m *memTable) Seqs(_ context.Context, each func(int64)) error {
	m.mu.Lock()
	v := m.visible()
	m.mu.Unlock()
	for _, r := range v {
		if r.Seq > 0 {
			each(r.Seq)
		}
	}
	return nil
}

func (m *memTable) Delete(_ context.Context, r Run) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for s := r.Lo; s <= r.Hi; s++ {
		if m.hidden[s] {
			panic("a delete reached a row that was not read")
		}
		delete(m.rows, s)
	}
	return nil
}

func (m *memTable) AddMarker(context.Context) error {
	m.put(0, 0, 0, false)
	return nil
}

func (m *memTable) DropMarker(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.rows, 0)
	return nil
}

func (m *memTable) CheckTriggers(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.triggers {
		return errors.New("triggers missing")
	}
	return nil
}

func (m *memTable) left() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.rows)
}

type recorder struct {
	mu      sync.Mutex
	got     []userapi.Change
	missed  int
	failing bool
	tries   int
}

func (r *recorder) apply(_ context.Context, cs []userapi.Change) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.tries++
	if r.failing {
		return errors.New("apply failed")
	}
	r.got = append(r.got, cs...)
	return nil
}

func (r *recorder) miss(context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.missed++
	return nil
}

func (r *recorder) has(id, version int64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.ContainsFunc(r.got, func(c userapi.Change) bool { return c.ID == id && c.Version == version })
}

func follow(t *testing.T, m *memTable, r *recorder) (stop func() error) {
	ctx, cancel := context.WithCancel(context.Background())
	var backlog atomic.Int64
	done := make(chan error, 1)
	go func() { done <- Follow(ctx, m, &backlog, r.apply, r.miss) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() { cancel(); err = <-done })
		return err
	}
	t.Cleanup(func() { stop() })
	return stop
}

// TestFollowLateCommit: a row hidden while rows on both sides of it are
// read, applied and deleted is delivered once it shows.
func TestFollowLateCommit(t *testing.T) {
	m := newMemTable()
	m.put(1, 10, 2, false)
	m.put(2, 20, 2, true) // its transaction is still open
	m.put(3, 30, 2, false)
	r := &recorder{}
	follow(t, m, r)
	testenv.WaitFor(t, 5*time.Second, "rows 1 and 3 applied and deleted", func() bool { return r.has(10, 2) && r.has(30, 2) && m.left() == 2 })
	if r.has(20, 2) || r.missed != 1 {
		t.Fatalf("delivered %v, missed %d; want rows 1 and 3 and one missed (no marker yet)", r.got, r.missed)
	}
	m.commit(2)
	testenv.WaitFor(t, 5*time.Second, "the late row delivered", func() bool { return r.has(20, 2) && m.left() == 1 })
}

// TestFollowApplyFails: rows whose apply failed are not deleted, and are
// delivered by the next follower.
func TestFollowApplyFails(t *testing.T) {
	m := newMemTable()
	m.AddMarker(context.Background())
	m.put(1, 10, 1, false)
	r := &recorder{failing: true}
	stop := follow(t, m, r)
	testenv.WaitFor(t, 5*time.Second, "an apply tried", func() bool { r.mu.Lock(); defer r.mu.Unlock(); return r.tries > 0 })
	if err := stop(); err == nil || errors.Is(err, context.Canceled) || m.left() != 2 {
		t.Fatalf("Follow = %v with %d rows left, want the apply error and both rows", err, m.left())
	}
	r.failing = false
	follow(t, m, r)
	testenv.WaitFor(t, 5*time.Second, "the row delivered by the next follower", func() bool { return r.has(10, 1) && m.left() == 1 })
	if r.missed != 0 {
		t.Errorf("missed %d times with the marker in place", r.missed)
	}
}

// TestFollowTriggersMissing: Follow fails and drops the marker, so the
// next leader calls missed.
func TestFollowTriggersMissing(t *testing.T) {
	m := newMemTable()
	m.AddMarker(context.Background())
	m.triggers = false
	r := &recorder{}
	stop := follow(t, m, r)
	testenv.WaitFor(t, 5*time.Second, "the marker dropped", func() bool { return m.left() == 0 })
	stop()
	m.triggers = true
	follow(t, m, r)
	testenv.WaitFor(t, 5*time.Second, "missed", func() bool { r.mu.Lock(); defer r.mu.Unlock(); return r.missed == 1 })
}

// TestFollowMassChange: a backlog beyond MassChange calls missed once and
// deletes what it read; a row hidden meanwhile stays and is delivered.
func TestFollowMassChange(t *testing.T) {
	m := newMemTable()
	m.AddMarker(context.Background())
	for s := int64(1); s <= MassChange+10; s++ {
		m.put(s, s, 1, s == 5)
	}
	r := &recorder{}
	follow(t, m, r)
	testenv.WaitFor(t, 5*time.Second, "the backlog skipped", func() bool { return m.left() == 2 })
	m.commit(5)
	testenv.WaitFor(t, 5*time.Second, "the hidden row delivered", func() bool { return r.has(5, 1) })
	if len(r.got) > MaxBatch+1 || r.missed != 1 {
		t.Errorf("%d changes delivered, missed %d; want the backlog skipped by one missed", len(r.got), r.missed)
	}
}
