// Package changetable follows a trigger-written change table, the change
// stream of the stores whose database has no stream client here (MySQL and
// MariaDB, SQLite). Each store gives its dialect of the table (Table) and
// its own leader election; Follow is the one reading loop they share.
//
// The table, user_changes, holds only changes not yet applied: triggers on
// users insert a row (seq, user_id, version or 0 for a delete, changed_at)
// in the writer's own transaction, and the leader reads the oldest rows,
// applies them, and then deletes exactly the rows it read. Deleting is the
// acknowledgement and the pruning at once:
//
//   - A sequence number is assigned when a row is inserted, not when its
//     transaction commits, so a row may become visible after rows with
//     higher numbers. Such a row was not read, so it was not deleted, and
//     the next read delivers it: nothing is skipped, whatever the order of
//     commits. (A scan of "seq > last applied" would skip it for good.)
//   - A row is deleted only after apply returned nil for it, so a leader
//     that dies between the two leaves it for the next one: changes may be
//     delivered twice, never not at all. Deletes name runs of consecutive
//     sequence numbers that were all read (Run), so no row that was not
//     read falls in one.
//   - A new leader simply starts with what is left.
//
// Two changes of one user are made by transactions that lock its row in
// turn, so the second's row is inserted after the first committed: per
// user, sequence order is commit order, which is the order the cache needs.
// Across users a late-committing change may come after later ones.
//
// Losses are detected by a marker row (seq 0, user_id 0) that the leader
// inserts and never deletes: a table found without it was emptied,
// truncated or re-created, or has never been followed, and missed is
// called before anything else is applied. Triggers found missing make
// Follow fail and delete the marker, so whichever leader runs once they are
// back calls missed. Not detected: triggers dropped and re-created between
// two checks (TriggerCheck), and a write made with the triggers disabled
// (MySQL's and SQLite's triggers cannot be disabled per session, but a
// table rebuilt under another name and swapped in would bypass them).
package changetable

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"userapi"
)

// PollInterval is how long the leader waits after a read that found the
// table drained. The time from a commit to its invalidation is this wait
// (half of it on average, all of it at worst), plus a read, a Redis round
// trip and a delete: at 25 ms the added lag stays well inside the
// PostgreSQL stream's measured p99 (under 100 ms), while an idle leader
// makes 40 reads a second of an index's first entries, which costs the
// database and this process next to nothing. A read that finds a full
// batch is followed by the next at once.
const PollInterval = 25 * time.Millisecond

// MaxBatch bounds the changes of one apply, as in the PostgreSQL stream.
const MaxBatch = 512

// MassChange: a backlog of more rows than this (a bulk load, a backfill, or
// a long time without a follower) starts every tier afresh, as missed does,
// instead of invalidating each row: cheaper than that many tombstones, as in
// the PostgreSQL stream.
const MassChange = 10_000

// maxRun bounds the rows one delete removes, so pruning a mass change does
// not hold one huge transaction.
const maxRun = 10_000

// TriggerCheck is how often the leader checks that the triggers are there:
// a catalogue query, rare enough to cost nothing.
const TriggerCheck = 5 * time.Second

// countEvery bounds how often a full table is counted for the backlog.
const countEvery = time.Second

// Row is one row of the change table.
type Row struct {
	Seq    int64 // 0 for the marker
	Change userapi.Change
}

// Run is a range of sequence numbers lo..hi that were all read: deleting
// it deletes only rows that were read.
type Run struct{ Lo, Hi int64 }

// Table is one store's dialect of the change table. Every method must see
// every row committed before it was called (no snapshot kept across
// calls).
type Table interface {
	// Oldest returns up to n rows in sequence order; the marker, when
	// present, is the first.
	Oldest(ctx context.Context, n int) ([]Row, error)
	// Count returns how many rows the table holds, the marker excluded.
	Count(ctx context.Context) (int64, error)
	// Seqs calls each for every row's sequence number in order, the
	// marker excluded.
	Seqs(ctx context.Context, each func(seq int64)) error
	// Delete deletes the rows of r.
	Delete(ctx context.Context, r Run) error
	// AddMarker inserts the marker row unless it exists.
	AddMarker(ctx context.Context) error
	// DropMarker deletes the marker row.
	DropMarker(ctx context.Context) error
	// CheckTriggers fails when a trigger that writes the table is missing.
	CheckTriggers(ctx context.Context) error
}

// Follow reads t until ctx ends (it then returns ctx's error) or something
// fails, as the leader: see the package comment and userapi.ChangeFeed.
// backlog is kept at the number of rows not yet applied (exact when below
// MaxBatch, counted at most once a second above), and 0 when Follow returns.
func Follow(ctx context.Context, t Table, backlog *atomic.Int64, apply func(context.Context, []userapi.Change) error, missed func(context.Context) error) error {
	defer backlog.Store(0)
	var checkAt, countAt time.Time
	changes := make([]userapi.Change, 0, MaxBatch)
	for {
		if now := time.Now(); !now.Before(checkAt) {
			if err := t.CheckTriggers(ctx); err != nil {
				// Changes go unrecorded from now on: whoever leads once
				// the triggers are back must start afresh.
				if derr := t.DropMarker(ctx); derr != nil {
					return fmt.Errorf("change table: %w (and dropping the marker: %w)", err, derr)
				}
				return fmt.Errorf("change table: %w", err)
			}
			checkAt = now.Add(TriggerCheck)
		}
		rows, err := t.Oldest(ctx, MaxBatch+1)
		if err != nil {
			return fmt.Errorf("change table: read: %w", err)
		}
		if len(rows) == 0 || rows[0].Seq != 0 {
			// missed first: a marker added before a failed missed would
			// hide the loss from the next leader.
			if err := missed(ctx); err != nil {
				return fmt.Errorf("change table: no marker: %w", err)
			}
			if err := t.AddMarker(ctx); err != nil {
				return fmt.Errorf("change table: add the marker: %w", err)
			}
			continue
		}
		rows = rows[1:]
		full := len(rows) == MaxBatch
		switch {
		case !full:
			backlog.Store(int64(len(rows)))
		case time.Since(countAt) >= countEvery:
			n, err := t.Count(ctx)
			if err != nil {
				return fmt.Errorf("change table: count: %w", err)
			}
			backlog.Store(n)
			countAt = time.Now()
			if n > MassChange {
				if err := skipAll(ctx, t, missed); err != nil {
					return err
				}
				continue
			}
		}
		if len(rows) > 0 {
			changes = changes[:0]
			for _, r := range rows {
				changes = append(changes, r.Change)
			}
			if err := apply(ctx, changes); err != nil {
				return fmt.Errorf("change table: apply: %w", err)
			}
			var runs runs
			for _, r := range rows {
				runs.add(r.Seq)
			}
			if err := deleteRuns(ctx, t, runs); err != nil {
				return err
			}
		}
		if full {
			continue
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(PollInterval):
		}
	}
}

// skipAll handles a mass change: every row read before missed was
// committed before it, so missed covers it and it can go unapplied. Rows
// committed later were not read and stay for the next reads.
func skipAll(ctx context.Context, t Table, missed func(context.Context) error) error {
	var runs runs
	if err := t.Seqs(ctx, runs.add); err != nil {
		return fmt.Errorf("change table: read the backlog: %w", err)
	}
	if err := missed(ctx); err != nil {
		return fmt.Errorf("change table: a backlog of more than %d rows: %w", MassChange, err)
	}
	return deleteRuns(ctx, t, runs)
}

func deleteRuns(ctx context.Context, t Table, rs runs) error {
	for _, r := range rs {
		if err := t.Delete(ctx, r); err != nil {
			return fmt.Errorf("change table: delete applied rows: %w", err)
		}
	}
	return nil
}

// runs collects ascending sequence numbers into Runs of consecutive ones,
// each at most maxRun long.
type runs []Run

func (rs *runs) add(seq int64) {
	if n := len(*rs); n > 0 {
		last := &(*rs)[n-1]
		if seq == last.Hi+1 && last.Hi-last.Lo+1 < maxRun {
			last.Hi = seq
			return
		}
	}
	*rs = append(*rs, Run{seq, seq})
}

// BacklogGauge exports backlog as userapi_change_stream_backlog_rows, the
// stores' counterpart of PostgreSQL's userapi_change_stream_lag_bytes.
func BacklogGauge(backlog *atomic.Int64) prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "userapi_change_stream_backlog_rows",
		Help: "Rows of the change table not yet applied, as of the leader's last read (0 while this instance does not lead).",
	}, func() float64 { return float64(backlog.Load()) })
}
