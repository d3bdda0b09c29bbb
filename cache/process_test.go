package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"userapi"
	"userapi/internal/pgtest"
	"userapi/internal/testenv"
	"userapi/postgres"
)

// Faults made by real processes: an instance SIGKILLed (the change
// stream's leader, a writer between its commit and its invalidation), and
// PostgreSQL itself restarted or dropping a slot that fell too far behind.

// childEnv names the variable that makes this test binary run as one
// instance of the cache instead of the tests (TestMain); the instance's
// database, Redis and key prefix come in childDB, childRedis and
// childPrefix.
const (
	childEnv    = "USERAPI_TEST_CACHE_CHILD"
	childDB     = "USERAPI_TEST_CACHE_CHILD_DB"
	childRedis  = "USERAPI_TEST_CACHE_CHILD_REDIS"
	childPrefix = "USERAPI_TEST_CACHE_CHILD_PREFIX"
	childUser   = "USERAPI_TEST_CACHE_CHILD_USER"
)

func TestMain(m *testing.M) {
	if role := os.Getenv(childEnv); role != "" {
		if err := runChild(role); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(2)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runChild is one instance over PostgreSQL and Redis, in a role:
//
//   - "leader" follows the change stream; it prints "following" once it
//     has created the slot and "applied" once it has applied a change (so
//     it holds the slot), then runs until killed;
//   - "writer" renames the user childUser through the cache and SIGKILLs
//     itself once the database has committed, before the invalidation.
func runChild(role string) error {
	ctx := context.Background()
	db, err := postgres.Open(ctx, os.Getenv(childDB), postgres.Options{MaxConns: 4})
	if err != nil {
		return err
	}
	cfg := fastTiered(os.Getenv(childRedis), os.Getenv(childPrefix))
	switch role {
	case "leader":
		cfg.Changes = db
		c, err := New(ctx, db, cfg)
		if err != nil {
			return err
		}
		if err := within(30*time.Second, func() bool { return value(c.m.changesMissed) > 0 }); err != nil {
			return fmt.Errorf("no slot: %w", err)
		}
		fmt.Println("following")
		if err := within(30*time.Second, func() bool { return value(c.m.changesApplied) > 0 }); err != nil {
			return fmt.Errorf("no change applied: %w", err)
		}
		fmt.Println("applied")
		select {}
	case "writer":
		id, err := strconv.ParseInt(os.Getenv(childUser), 10, 64)
		if err != nil {
			return err
		}
		c, err := New(ctx, killAfterCommit{db}, cfg)
		if err != nil {
			return err
		}
		if err := within(30*time.Second, func() bool { return healthy(c) }); err != nil {
			return fmt.Errorf("never healthy: %w", err)
		}
		name := "Killed writer"
		_, err = c.UpdateUser(ctx, id, userapi.UserUpdate{Name: &name})
		return fmt.Errorf("the writer lived on after its commit: %v", err)
	}
	return fmt.Errorf("unknown role %q", role)
}

// within polls cond every millisecond until it holds, or fails after d.
func within(d time.Duration, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %v", d)
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// killAfterCommit is a store whose process dies the moment an update has
// committed.
type killAfterCommit struct{ userapi.Store }

func (s killAfterCommit) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	u, err := s.Store.UpdateUser(ctx, id, upd)
	if err == nil {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	return u, err
}

// child is an instance running in a process of its own.
type child struct {
	cmd   *exec.Cmd
	lines chan string    // what it prints
	log   testenv.Buffer // what it writes to stderr
	done  chan struct{}  // closed once it has exited
	err   error          // cmd.Wait's, once done
}

// lineWriter hands each line written to it to a channel.
type lineWriter struct {
	partial []byte
	lines   chan<- string
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.partial = append(w.partial, p...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			return len(p), nil
		}
		w.lines <- string(w.partial[:i])
		w.partial = w.partial[i+1:]
	}
}

// startChild runs this test binary as an instance in role (runChild) over
// the database dbURL and Redis redisURL with prefix. The child dies with
// the test binary (Pdeathsig), and is killed at cleanup if the test has not
// killed it.
func startChild(t *testing.T, role, dbURL, redisURL, prefix string, env ...string) *child {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: exec.Command(exe, "-test.run=^$"), lines: make(chan string, 16), done: make(chan struct{})}
	c.cmd.Env = append(os.Environ(), childEnv+"="+role, childDB+"="+dbURL, childRedis+"="+redisURL, childPrefix+"="+prefix)
	c.cmd.Env = append(c.cmd.Env, env...)
	c.cmd.Stdout = &lineWriter{lines: c.lines}
	c.cmd.Stderr = &c.log
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		c.err = c.cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		c.cmd.Process.Kill()
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			t.Errorf("child %s did not end after SIGKILL", role)
		}
		if t.Failed() {
			t.Logf("child %s's stderr:\n%s", role, c.log.String())
		}
	})
	return c
}

// await waits up to d for the child to print line.
func (c *child) await(t *testing.T, line string, d time.Duration) {
	t.Helper()
	timeout := time.After(d)
	for {
		select {
		case got := <-c.lines:
			if got == line {
				return
			}
		case <-c.done:
			t.Fatalf("the child exited (%v) before printing %q", c.err, line)
		case <-timeout:
			t.Fatalf("the child did not print %q within %v", line, d)
		}
	}
}

// killed waits until the child has died of SIGKILL.
func (c *child) killed(t *testing.T) {
	t.Helper()
	select {
	case <-c.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the child did not end within 30s")
	}
	var ee *exec.ExitError
	if !errors.As(c.err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("the child ended with %v, want SIGKILL", c.err)
	}
}

// TestChangeStreamLeaderKilled: the stream's leader is a process of its
// own, SIGKILLed right after a burst of outside writes, before it could
// apply and acknowledge them all. A standby takes over from the slot's
// acknowledged position, so no change is lost: every tier of every
// instance serves the last version of every row.
func TestChangeStreamLeaderKilled(t *testing.T) {
	srv := startRedis(t)
	db, url := logicalDB(t)
	ids := createUsers(t, db, "killed-leader", 20)
	prefix := testPrefix()
	leader := startChild(t, "leader", url, srv.URL(), prefix)
	want := map[int64]int64{}
	rename := outsideRenamer(t, url, want)
	// The leader holds the slot once it has applied a change.
	leader.await(t, "following", 10*time.Second)
	rename(ids[0], "First")
	leader.await(t, "applied", 10*time.Second)

	standby := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	testenv.WaitFor(t, 5*time.Second, "the standby healthy", func() bool { return healthy(standby) })
	testenv.WaitFor(t, 5*time.Second, "the first change served", func() bool { return version(t, standby, ids[0]) == want[ids[0]] })
	before := noticesIn(standby)
	rename(ids[1], "Second")
	testenv.WaitFor(t, 5*time.Second, "the leader's invalidation heard", func() bool { return noticesIn(standby) > before })
	if value(standby.m.changesApplied) != 0 {
		t.Fatal("the standby applied a change while the child led")
	}
	for _, id := range ids {
		version(t, standby, id)
		version(t, standby, id)
	}

	for _, id := range ids {
		rename(id, "Before the kill")
	}
	killedAt := time.Now()
	leader.cmd.Process.Signal(syscall.SIGKILL)
	leader.killed(t)
	serves(t, standby, ids, want, 3*time.Second, "the standby")
	t.Logf("from the SIGKILL until the standby served all %d rows written before it: %v (changes applied by the standby: %v)",
		len(ids), time.Since(killedAt), value(standby.m.changesApplied))
	if value(standby.m.changesApplied) == 0 {
		t.Error("the standby never applied a change")
	}
	for _, id := range ids {
		checkTiers(t, standby, db, id)
	}
}

// TestWriterKilledAfterCommit: a writer instance is SIGKILLed between its
// commit and its invalidation. Another instance, warm with the old row,
// serves the new one within the stream's bound, and no tier keeps the old.
func TestWriterKilledAfterCommit(t *testing.T) {
	srv := startRedis(t)
	db, url := logicalDB(t)
	u := mustCreate(t, db, "killed-writer@example.com")
	prefix := testPrefix()
	b := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	testenv.WaitFor(t, 5*time.Second, "B healthy", func() bool { return healthy(b) })
	streaming(t, b)
	version(t, b, u.ID)
	version(t, b, u.ID)

	writer := startChild(t, "writer", url, srv.URL(), prefix, fmt.Sprintf("%s=%d", childUser, u.ID))
	writer.killed(t)
	row, err := db.GetUser(testenv.Context(t), u.ID)
	if err != nil {
		t.Fatal(err)
	}
	if row.Version != u.Version+1 || row.Name != "Killed writer" {
		t.Fatalf("the database has %+v: the writer's update did not commit", row)
	}
	serves(t, b, []int64{u.ID}, map[int64]int64{u.ID: row.Version}, 5*time.Second, "B")
	checkTiers(t, b, db, u.ID)
}

// logicalCluster starts a PostgreSQL cluster of the test's own with
// wal_level=logical and returns it with a migrated store on its database
// userapi and that database's URL.
func logicalCluster(t *testing.T) (*pgtest.Cluster, *postgres.Store, string) {
	t.Helper()
	pg := pgtest.StartLogical(t)
	pgtest.Exec(t, pg.URL("postgres"), "CREATE DATABASE userapi")
	url := pg.URL("userapi")
	db, err := postgres.Open(testenv.Context(t), url, postgres.Options{MaxConns: 8, Migrate: true})
	if err != nil {
		t.Fatalf("postgres.Open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return pg, db, url
}

// TestChangeStreamPostgresRestart: PostgreSQL restarts (a fast shutdown,
// as an operator's restart) with changes committed just before that the
// stream may not have applied, and more are committed before the stream
// has reconnected. It resumes from the slot: every change is served, and
// no instance starts afresh.
func TestChangeStreamPostgresRestart(t *testing.T) {
	srv := startRedis(t)
	pg, db, url := logicalCluster(t)
	ids := createUsers(t, db, "pg-restart", 20)
	a, b := followerPair(t, srv.URL(), db, ids)

	want := map[int64]int64{}
	half := len(ids) / 2
	rename := outsideRenamer(t, url, want)
	for _, id := range ids[:half] {
		rename(id, "Before the restart")
	}
	pg.Restart()
	rename = outsideRenamer(t, url, want)
	for _, id := range ids[half:] {
		rename(id, "After the restart")
	}
	// The pool's connections died with the server; reads answer again
	// once it has new ones.
	testenv.WaitFor(t, 10*time.Second, "reads answer after the restart", func() bool {
		_, err := b.GetUserEncoded(testenv.Context(t), ids[0])
		return err == nil
	})
	serves(t, b, ids, want, 5*time.Second, "B after the restart")
	if n := value(a.m.changesMissed); n != 1 {
		t.Errorf("missed %v times, want once (the new slot at start): a restart must resume from the slot, not start afresh", n)
	}
	for _, c := range []*Store{a, b} {
		for _, id := range ids {
			checkTiers(t, c, db, id)
		}
	}
}

// outsideRenamer renames users on a connection of its own to url, as a
// program outside the service would, and records each new version in want.
func outsideRenamer(t *testing.T, url string, want map[int64]int64) func(id int64, name string) {
	w := outsideWriter(t, url)
	return func(id int64, name string) {
		t.Helper()
		var v int64
		if err := w.QueryRow(testenv.Context(t), `UPDATE users SET name = $1 WHERE id = $2 RETURNING version`, name, id).Scan(&v); err != nil {
			t.Fatal(err)
		}
		want[id] = v
	}
}

// TestChangeStreamSlotLost: the slot falls further behind than
// max_slot_wal_keep_size allows while no instance follows it, and
// PostgreSQL invalidates it: the changes it held are gone. The next
// follower must not retry it forever; it drops it, creates a new one, and
// every instance moves to a new key generation, so the changes the slot
// lost are not served stale.
func TestChangeStreamSlotLost(t *testing.T) {
	srv := startRedis(t)
	pg, db, url := logicalCluster(t)
	ids := createUsers(t, db, "slot-lost", 10)
	a, b := followerPair(t, srv.URL(), db, ids)
	gen := b.redis.shards()[0].gen.Load()
	a.Close()

	want := map[int64]int64{}
	rename := outsideRenamer(t, url, want)
	for _, id := range ids {
		rename(id, "Lost with the slot")
	}
	admin := pg.URL("postgres")
	pgtest.Exec(t, admin, `ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'`)
	pgtest.Exec(t, admin, `SELECT pg_reload_conf()`)
	testenv.WaitFor(t, 10*time.Second, "the slot invalidated", func() bool {
		pgtest.Exec(t, url, `CREATE TABLE IF NOT EXISTS filler (n int)`)
		pgtest.Exec(t, url, `INSERT INTO filler SELECT generate_series(1, 1000)`)
		pgtest.Exec(t, url, `SELECT pg_switch_wal()`)
		pgtest.Exec(t, url, `CHECKPOINT`)
		var status string
		err := db.Pool().QueryRow(testenv.Context(t), `SELECT wal_status FROM pg_replication_slots WHERE database = current_database()`).Scan(&status)
		return err == nil && status == "lost"
	})

	c := newCache(t, db, streamTiered(srv.URL(), b.cfg.KeyPrefix, db))
	testenv.WaitFor(t, 5*time.Second, "a new slot and a new generation", func() bool {
		return value(c.m.changesMissed) == 1 && b.redis.shards()[0].gen.Load() != gen
	})
	serves(t, b, ids, want, time.Second, "B")
	// The new slot streams.
	rename(ids[0], "On the new slot")
	serves(t, b, ids[:1], want, 3*time.Second, "B on the new slot")
}
