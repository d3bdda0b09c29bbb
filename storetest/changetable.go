package storetest

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"userapi"
	"userapi/internal/changetable"
	"userapi/internal/testenv"
)

// ChangeTableStore is a store whose change stream is the trigger-written
// user_changes table (internal/changetable): MySQL and SQLite.
type ChangeTableStore interface {
	userapi.Store
	userapi.ChangeFeed
	userapi.Seeder
	CheckChangeFeed(ctx context.Context) error
}

// ChangeTable is what RunChangeTable needs of one store.
type ChangeTable struct {
	// NewStore returns a fresh, empty store on a database of its own,
	// and a second store on the same database (another instance).
	NewStore func(t *testing.T) (ChangeTableStore, ChangeTableStore)
	// DB is a connection pool of its own to the store's database: a
	// writer outside the service, as the database's shell would be.
	DB func(t *testing.T, s ChangeTableStore) *sql.DB
	// CreateUpdateTrigger re-creates the users_changes_update trigger
	// (a simplified one is enough).
	CreateUpdateTrigger string
	// LateCommit: a transaction may commit after transactions that
	// inserted their change rows later (not on SQLite: one writer at a
	// time).
	LateCommit bool
	// CutLeader ends the leader's hold on the lead as a crash would, or
	// is nil when only the leader's end releases it.
	CutLeader func(t *testing.T, s ChangeTableStore, db *sql.DB)
}

// RunChangeTable runs the change table's tests against the store.
func RunChangeTable(t *testing.T, ct ChangeTable) {
	t.Run("Triggers", func(t *testing.T) { testTriggers(t, ct) })
	t.Run("NotSkippedWhileUncommitted", func(t *testing.T) { testUncommitted(t, ct) })
	t.Run("Marker", func(t *testing.T) { testMarker(t, ct) })
	t.Run("Takeover", func(t *testing.T) { testTakeover(t, ct) })
	t.Run("MassChange", func(t *testing.T) { testMassChange(t, ct) })
}

func execRaw(t *testing.T, db interface {
	Exec(string, ...any) (sql.Result, error)
}, query string, args ...any) {
	t.Helper()
	if _, err := db.Exec(query, args...); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
}

// backlog counts the rows a reader on db sees, the marker excluded.
func backlog(t *testing.T, db *sql.DB) int {
	t.Helper()
	var n int
	if err := db.QueryRow(`SELECT COUNT(*) FROM user_changes WHERE seq > 0`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// testTriggers: the triggers record inserts, outside updates (which move
// version and updated_at), id changes and deletes; the service's own
// updates move the version by one.
func testTriggers(t *testing.T, ct ChangeTable) {
	s, _ := ct.NewStore(t)
	c := ctx(t)
	db := ct.DB(t, s)
	u := create(t, s, "t@example.com", "Test")
	time.Sleep(2 * time.Millisecond) // SQLite's clock counts milliseconds
	execRaw(t, db, `UPDATE users SET name = 'By hand' WHERE id = ?`, u.ID)
	got, err := s.GetUser(c, u.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Version != 2 || !got.UpdatedAt.After(u.UpdatedAt) || got.Name != "By hand" {
		t.Errorf("after an UPDATE by hand: %+v; want version 2, updated_at after %v", got, u.UpdatedAt)
	}
	name := "By the service"
	upd, err := s.UpdateUser(c, u.ID, userapi.UserUpdate{Name: &name})
	if err != nil {
		t.Fatal(err)
	}
	if upd.Version != 3 {
		t.Errorf("the service's update: version %d, want 3 (one step, not two)", upd.Version)
	}
	execRaw(t, db, `UPDATE users SET id = id + 1000 WHERE id = ?`, u.ID)
	execRaw(t, db, `DELETE FROM users WHERE id = ?`, u.ID+1000)

	f := testenv.Follow(t, s)
	// An id change records the old id's delete and the new id's version
	// (SQLite records the new id twice: unmoved, then moved).
	for _, w := range []struct {
		id, version int64
	}{{u.ID, 1}, {u.ID, 2}, {u.ID, 3}, {u.ID, 0}, {u.ID + 1000, 4}, {u.ID + 1000, 0}} {
		testenv.WaitFor(t, 5*time.Second, "every change delivered", func() bool { return f.Has(w.id, w.version) })
	}
	for i, c := range f.Changes() {
		if c.Committed.IsZero() || time.Since(c.Committed) > time.Minute || time.Until(c.Committed) > time.Second {
			t.Errorf("change %d committed at %v, want about now", i, c.Committed)
		}
	}
}

// testUncommitted: a change whose transaction is still open is not
// delivered, and not skipped: it is delivered once committed. Where
// commits may come out of sequence order, the leader first reads a change
// numbered below the open one's and one above it, applies and deletes
// them; a scan of "seq > last applied" would then skip the open one for
// good.
func testUncommitted(t *testing.T, ct ChangeTable) {
	s, _ := ct.NewStore(t)
	a := create(t, s, "a@example.com", "Test")
	b := create(t, s, "b@example.com", "Test")
	c := create(t, s, "c@example.com", "Test")
	db := ct.DB(t, s)
	f := testenv.Follow(t, s)
	testenv.WaitFor(t, 5*time.Second, "the creates delivered", func() bool { return f.Has(a.ID, 1) && f.Has(b.ID, 1) && f.Has(c.ID, 1) })
	if ct.LateCommit {
		f.Stop() // so that one read finds c's and b's changes around a's
		execRaw(t, db, `UPDATE users SET name = 'Before' WHERE id = ?`, c.ID)
	}
	late, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer late.Rollback()
	execRaw(t, late, `UPDATE users SET name = 'Late' WHERE id = ?`, a.ID)
	if ct.LateCommit {
		execRaw(t, db, `UPDATE users SET name = 'After' WHERE id = ?`, b.ID)
		f = testenv.Follow(t, s)
		testenv.WaitFor(t, 5*time.Second, "the committed changes delivered and acknowledged", func() bool {
			// The open transaction's row is invisible, to COUNT as to the leader.
			return f.Has(c.ID, 2) && f.Has(b.ID, 2) && backlog(t, db) == 0
		})
	}
	time.Sleep(4 * changetable.PollInterval) // reads while the row is invisible
	if f.Has(a.ID, 2) {
		t.Fatal("a change of an open transaction was delivered")
	}
	if err := late.Commit(); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 5*time.Second, "the change delivered once committed", func() bool { return f.Has(a.ID, 2) })
	testenv.WaitFor(t, 5*time.Second, "the table drained", func() bool { return backlog(t, db) == 0 })
	if err := f.Err(); err != nil {
		t.Errorf("the stream failed: %v", err)
	}
}

// testMarker: the first lead and a table emptied behind the leader's back
// call missed; a new leader that finds the marker does not; a missing
// trigger fails the stream and makes the next leader call missed.
func testMarker(t *testing.T, ct ChangeTable) {
	s, _ := ct.NewStore(t)
	db := ct.DB(t, s)
	f := testenv.Follow(t, s)
	u := create(t, s, "m@example.com", "Test")
	testenv.WaitFor(t, 5*time.Second, "the create delivered", func() bool { return f.Has(u.ID, 1) })
	if f.Missed() != 1 {
		t.Errorf("the first leader called missed %d times, want once", f.Missed())
	}
	f.Stop()
	f = testenv.Follow(t, s)
	execRaw(t, db, `UPDATE users SET name = 'Second leader' WHERE id = ?`, u.ID)
	testenv.WaitFor(t, 5*time.Second, "the update delivered", func() bool { return f.Has(u.ID, 2) })
	if f.Missed() != 0 {
		t.Errorf("a new leader called missed %d times; the marker was there", f.Missed())
	}
	execRaw(t, db, `DELETE FROM user_changes`)
	testenv.WaitFor(t, 5*time.Second, "missed after the table was emptied", func() bool { return f.Missed() == 1 })

	execRaw(t, db, `DROP TRIGGER users_changes_update`)
	testenv.WaitFor(t, 2*changetable.TriggerCheck, "the stream fails without its trigger", func() bool { return f.Err() != nil })
	if err := s.CheckChangeFeed(ctx(t)); err == nil {
		t.Error("CheckChangeFeed = nil with a trigger missing")
	}
	f.Stop()
	execRaw(t, db, ct.CreateUpdateTrigger)
	f = testenv.Follow(t, s)
	testenv.WaitFor(t, 5*time.Second, "missed once the trigger is back", func() bool { return f.Missed() == 1 })
}

// testTakeover: of two instances one leads; when it goes away (its
// connection cut, or its follow ended) the other takes over, and a change
// made meanwhile is delivered.
func testTakeover(t *testing.T, ct ChangeTable) {
	s1, s2 := ct.NewStore(t)
	db := ct.DB(t, s1)
	a := testenv.Follow(t, s1)
	b := testenv.Follow(t, s2)
	u := create(t, s1, "l@example.com", "Test")
	testenv.WaitFor(t, 5*time.Second, "the create delivered", func() bool { return a.Has(u.ID, 1) || b.Has(u.ID, 1) })
	leader, standby, ls := a, b, s1
	if b.Has(u.ID, 1) {
		leader, standby, ls = b, a, s2
	}
	time.Sleep(2 * changetable.PollInterval)
	if standby.Has(u.ID, 1) {
		t.Fatal("both instances delivered the change")
	}
	if ct.CutLeader != nil {
		ct.CutLeader(t, ls, db)
	} else {
		leader.Stop()
	}
	execRaw(t, db, `UPDATE users SET name = 'Taken over' WHERE id = ?`, u.ID)
	testenv.WaitFor(t, 5*time.Second, "the standby delivers the change", func() bool { return standby.Has(u.ID, 2) })
	if ct.CutLeader != nil {
		testenv.WaitFor(t, 5*time.Second, "the old leader's stream fails", func() bool { return leader.Err() != nil })
	}
}

// testMassChange: a backlog beyond MassChange rows calls missed once
// instead of delivering each row, and the table is emptied.
func testMassChange(t *testing.T, ct ChangeTable) {
	s, _ := ct.NewStore(t)
	db := ct.DB(t, s)
	if err := s.SeedUsers(ctx(t), 1, changetable.MassChange+2000, nil); err != nil {
		t.Fatal(err)
	}
	f := testenv.Follow(t, s)
	testenv.WaitFor(t, 10*time.Second, "the backlog emptied", func() bool { return backlog(t, db) == 0 })
	if n := len(f.Changes()); n > 2*changetable.MaxBatch {
		t.Errorf("%d changes delivered one by one; want the mass change skipped", n)
	}
	if f.Missed() != 2 {
		t.Errorf("missed %d times, want 2 (the first lead, the mass change)", f.Missed())
	}
}
