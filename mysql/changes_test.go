package mysql

import (
	"database/sql"
	"strconv"
	"testing"
	"time"

	"userapi"
	"userapi/internal/changetable"
	"userapi/internal/testenv"
)

// rawDB is a connection pool of its own to the store's database: a writer
// outside the service, as the mysql client would be.
func rawDB(t *testing.T, s *Store) *sql.DB {
	t.Helper()
	db, err := sql.Open("mysql", s.cfg.FormatDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func execRaw(t *testing.T, db interface {
	Exec(string, ...any) (sql.Result, error)
}, query string, args ...any) {
	t.Helper()
	if _, err := db.Exec(query, args...); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
}

func createUser(t *testing.T, s *Store, email string) *userapi.User {
	t.Helper()
	u, _, err := s.CreateUser(testContext(t), userapi.UserCreate{Email: email, Name: "Test"})
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func backlog(t *testing.T, db *sql.DB) int {
	t.Helper()
	var n int
	if err := db.QueryRow(`SELECT COUNT(*) FROM user_changes WHERE seq > 0`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestChangesLateCommit: a change whose transaction took its sequence
// number first but commits after a later one has been read, applied and
// deleted is still delivered (a scan of "seq > last applied" would skip
// it).
func TestChangesLateCommit(t *testing.T) {
	s := newStore(t)
	a := createUser(t, s, "a@example.com")
	b := createUser(t, s, "b@example.com")
	c := createUser(t, s, "c@example.com")
	raw := rawDB(t, s)

	// Sequence numbers in insert order: c's change, then a's (in an open
	// transaction), then b's; the leader first reads c's and b's around
	// the invisible one.
	execRaw(t, raw, `UPDATE users SET name = 'Before' WHERE id = ?`, c.ID)
	late, err := raw.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer late.Rollback()
	execRaw(t, late, `UPDATE users SET name = 'Late' WHERE id = ?`, a.ID)
	execRaw(t, raw, `UPDATE users SET name = 'After' WHERE id = ?`, b.ID)

	f := testenv.Follow(t, s)
	testenv.WaitFor(t, 5*time.Second, "the committed changes delivered and acknowledged", func() bool {
		// The open transaction's row is invisible, to COUNT as to the leader.
		return f.Has(c.ID, 2) && f.Has(b.ID, 2) && backlog(t, raw) == 0
	})
	time.Sleep(3 * changetable.PollInterval) // a few more reads while the row is invisible
	if f.Has(a.ID, 2) {
		t.Fatal("a change of an open transaction was delivered")
	}
	if err := late.Commit(); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 5*time.Second, "the late-committed change delivered", func() bool { return f.Has(a.ID, 2) })
	testenv.WaitFor(t, 5*time.Second, "the table drained", func() bool { return backlog(t, raw) == 0 })
	if f.Missed() != 1 {
		t.Errorf("missed %d times, want once (the first lead)", f.Missed())
	}
}

// TestChangesTriggers: the triggers record inserts, outside updates (which
// move version and updated_at), id changes and deletes; the service's own
// updates move the version by one.
func TestChangesTriggers(t *testing.T) {
	s := newStore(t)
	ctx := testContext(t)
	raw := rawDB(t, s)
	u := createUser(t, s, "t@example.com")
	execRaw(t, raw, `UPDATE users SET name = 'By hand' WHERE id = ?`, u.ID)
	got, err := s.GetUser(ctx, u.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Version != 2 || !got.UpdatedAt.After(u.UpdatedAt) {
		t.Errorf("after an UPDATE by hand: version %d, updated_at %v; want 2 and after %v", got.Version, got.UpdatedAt, u.UpdatedAt)
	}
	name := "By the service"
	upd, err := s.UpdateUser(ctx, u.ID, userapi.UserUpdate{Name: &name})
	if err != nil {
		t.Fatal(err)
	}
	if upd.Version != 3 {
		t.Errorf("the service's update: version %d, want 3 (one step, not two)", upd.Version)
	}
	execRaw(t, raw, `UPDATE users SET id = id + 1000 WHERE id = ?`, u.ID)
	execRaw(t, raw, `DELETE FROM users WHERE id = ?`, u.ID+1000)

	f := testenv.Follow(t, s)
	want := []userapi.Change{
		{ID: u.ID, Version: 1}, {ID: u.ID, Version: 2}, {ID: u.ID, Version: 3},
		{ID: u.ID, Deleted: true}, {ID: u.ID + 1000, Version: 4}, {ID: u.ID + 1000, Deleted: true},
	}
	testenv.WaitFor(t, 5*time.Second, "every change delivered", func() bool { return len(f.Changes()) >= len(want) })
	got2 := f.Changes()
	for i, w := range want {
		g := got2[i]
		if g.ID != w.ID || g.Version != w.Version || g.Deleted != w.Deleted {
			t.Errorf("change %d = %+v, want %+v", i, g, w)
		}
		if g.Committed.IsZero() || time.Since(g.Committed) > time.Minute {
			t.Errorf("change %d committed at %v, want about now", i, g.Committed)
		}
	}
}

// TestChangesMarker: the first lead and a table emptied behind the
// leader's back call missed; a new leader that finds the marker does not;
// missing triggers fail the stream and make the next leader call missed.
func TestChangesMarker(t *testing.T) {
	s := newStore(t)
	raw := rawDB(t, s)
	f := testenv.Follow(t, s)
	u := createUser(t, s, "m@example.com")
	testenv.WaitFor(t, 5*time.Second, "the create delivered", func() bool { return f.Has(u.ID, 1) })
	if f.Missed() != 1 {
		t.Errorf("the first leader called missed %d times, want once", f.Missed())
	}
	f.Stop()
	f = testenv.Follow(t, s)
	rename := func(name string) { execRaw(t, raw, `UPDATE users SET name = ? WHERE id = ?`, name, u.ID) }
	rename("Second leader")
	testenv.WaitFor(t, 5*time.Second, "the update delivered", func() bool { return f.Has(u.ID, 2) })
	if f.Missed() != 0 {
		t.Errorf("a new leader called missed %d times; the marker was there", f.Missed())
	}
	execRaw(t, raw, `TRUNCATE TABLE user_changes`)
	testenv.WaitFor(t, 5*time.Second, "missed after TRUNCATE", func() bool { return f.Missed() == 1 })

	execRaw(t, raw, `DROP TRIGGER users_changes_update`)
	testenv.WaitFor(t, 10*time.Second, "the stream fails without its trigger", func() bool { return f.Err() != nil })
	if err := s.CheckChangeFeed(testContext(t)); err == nil {
		t.Error("CheckChangeFeed = nil with a trigger missing")
	}
	f.Stop()
	execRaw(t, raw, `CREATE TRIGGER users_changes_update AFTER UPDATE ON users FOR EACH ROW
		INSERT INTO user_changes (user_id, version, changed_at) VALUES (NEW.id, NEW.version, UTC_TIMESTAMP(6))`)
	f = testenv.Follow(t, s)
	testenv.WaitFor(t, 5*time.Second, "missed once the triggers are back", func() bool { return f.Missed() == 1 })
}

// TestChangesTakeover: of two followers one leads; when its connection is
// killed the other takes over, and a change made meanwhile is delivered.
func TestChangesTakeover(t *testing.T) {
	s := newStore(t)
	raw := rawDB(t, s)
	a := testenv.Follow(t, s)
	b := testenv.Follow(t, s)
	u := createUser(t, s, "l@example.com")
	testenv.WaitFor(t, 5*time.Second, "the create delivered", func() bool { return a.Has(u.ID, 1) || b.Has(u.ID, 1) })
	leader, standby := a, b
	if b.Has(u.ID, 1) {
		leader, standby = b, a
	}
	if standby.Has(u.ID, 1) {
		t.Fatal("both followers delivered the change")
	}
	var holder int64
	if err := raw.QueryRow(`SELECT IS_USED_LOCK(?)`, lockName(s.cfg.DBName)).Scan(&holder); err != nil {
		t.Fatal(err)
	}
	execRaw(t, raw, `KILL CONNECTION `+strconv.FormatInt(holder, 10))
	execRaw(t, raw, `UPDATE users SET name = 'Taken over' WHERE id = ?`, u.ID)
	testenv.WaitFor(t, 5*time.Second, "the standby delivers the change", func() bool { return standby.Has(u.ID, 2) })
	testenv.WaitFor(t, 5*time.Second, "the old leader's stream fails", func() bool { return leader.Err() != nil })
}

// TestChangesMassChange: a backlog beyond MassChange rows calls missed
// once instead of delivering each row, and the table is emptied.
func TestChangesMassChange(t *testing.T) {
	s := newStore(t)
	raw := rawDB(t, s)
	if err := s.SeedUsers(testContext(t), 1, 12_000, nil); err != nil {
		t.Fatal(err)
	}
	f := testenv.Follow(t, s)
	testenv.WaitFor(t, 10*time.Second, "the backlog emptied", func() bool { return backlog(t, raw) == 0 })
	if n := len(f.Changes()); n > 2*512 {
		t.Errorf("%d changes delivered one by one; want the mass change skipped", n)
	}
	if f.Missed() != 2 {
		t.Errorf("missed %d times, want 2 (the first lead, the mass change)", f.Missed())
	}
}
