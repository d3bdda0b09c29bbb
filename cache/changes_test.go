package cache

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	dto "github.com/prometheus/client_model/go"

	"userapi"
	"userapi/internal/panics"
	"userapi/internal/pgtest"
	"userapi/internal/sqlitetest"
	"userapi/internal/testenv"
	"userapi/mysql"
	"userapi/postgres"
)

// The change stream: writes made outside the service, on another
// connection as psql would, reach every tier of every instance.

// logicalDB opens a PostgreSQL store on a database of its own on the
// logical-replication server, with a slot of its own, and returns it with
// the database's URL.
func logicalDB(t *testing.T) (*postgres.Store, string) {
	t.Helper()
	url := pgtest.DatabaseOn(t, pgtest.LogicalURL(t))
	s, err := postgres.Open(testenv.Context(t), url, postgres.Options{MaxConns: 8, Migrate: true})
	if err != nil {
		t.Fatalf("postgres.Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, url
}

// feedStore is a store with a change stream.
type feedStore interface {
	userapi.Store
	userapi.ChangeFeed
}

// feedDB is a database whose store streams its changes, with the means to
// change it as a program outside the service would.
type feedDB struct {
	store feedStore
	// update renames id on a connection of its own, leaving version and
	// updated_at to the schema's trigger, and returns the new version.
	update func(t *testing.T, id int64, name string) int64
	// cut ends the stream's connection as a database restart or a network
	// fault would; nil where the stream has no connection to cut.
	cut func(t *testing.T)
	// lose makes the stream lose its position: the slot dropped, the
	// change table emptied.
	lose func(t *testing.T)
}

// feedDBs are the databases with a change stream: PostgreSQL with
// $USERAPI_TEST_POSTGRES_LOGICAL_URL, MariaDB with $USERAPI_TEST_MYSQL_URL,
// SQLite always.
var feedDBs = []struct {
	name string
	open func(t *testing.T) feedDB
}{
	{"postgres", func(t *testing.T) feedDB {
		db, url := logicalDB(t)
		w := outsideWriter(t, url)
		terminate := func(c *pgx.Conn) error {
			_, err := c.Exec(testenv.Context(t), `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = current_database() AND active_pid IS NOT NULL`)
			return err
		}
		return feedDB{
			store: db,
			update: func(t *testing.T, id int64, name string) int64 {
				t.Helper()
				var v int64
				if err := w.QueryRow(testenv.Context(t), `UPDATE users SET name = $1 WHERE id = $2 RETURNING version`, name, id).Scan(&v); err != nil {
					t.Fatal(err)
				}
				return v
			},
			cut: func(t *testing.T) {
				if err := terminate(w); err != nil {
					t.Fatal(err)
				}
			},
			// Cut the stream and drop its slot before it reconnects.
			lose: func(t *testing.T) {
				deadline := time.Now().Add(5 * time.Second)
				for {
					if err := terminate(w); err != nil {
						t.Fatal(err)
					}
					var dropped int
					err := w.QueryRow(testenv.Context(t), `
SELECT count(pg_drop_replication_slot(slot_name))
FROM pg_replication_slots
WHERE database = current_database() AND NOT active`).Scan(&dropped)
					if err == nil && dropped == 1 {
						return
					}
					if time.Now().After(deadline) {
						t.Fatalf("could not drop the slot: %v", err)
					}
				}
			},
		}
	}},
	{"mysql", func(t *testing.T) feedDB {
		url, w := testenv.MySQLDatabase(t)
		db, err := mysql.Open(testenv.Context(t), url, mysql.Options{MaxConns: 8, Migrate: true})
		if err != nil {
			t.Fatalf("mysql.Open: %v", err)
		}
		t.Cleanup(func() { db.Close() })
		return feedDB{
			store:  db,
			update: sqlUpdate(w),
			// The server frees the lead with the connection.
			cut: func(t *testing.T) {
				var holder int64
				if err := w.QueryRow(`SELECT IS_USED_LOCK(CONCAT('userapi_changes.', DATABASE()))`).Scan(&holder); err != nil {
					t.Fatal(err)
				}
				if _, err := w.Exec(fmt.Sprintf("KILL CONNECTION %d", holder)); err != nil {
					t.Fatal(err)
				}
			},
			lose: sqlEmptyChanges(w),
		}
	}},
	{"sqlite", func(t *testing.T) feedDB {
		db, path := sqlitetest.Open(t)
		// Another connection to the file, as another process would have.
		w, err := sql.Open("sqlite3", "file:"+path+"?_pragma=busy_timeout(5000)")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { w.Close() })
		return feedDB{store: db, update: sqlUpdate(w), lose: sqlEmptyChanges(w)}
	}},
}

// sqlUpdate renames a user on w; the trigger moves the version, which a
// second statement reads (SQLite's RETURNING shows the row before its
// AFTER trigger's update).
func sqlUpdate(w *sql.DB) func(t *testing.T, id int64, name string) int64 {
	return func(t *testing.T, id int64, name string) int64 {
		t.Helper()
		if _, err := w.Exec(`UPDATE users SET name = ? WHERE id = ?`, name, id); err != nil {
			t.Fatal(err)
		}
		var v int64
		if err := w.QueryRow(`SELECT version FROM users WHERE id = ?`, id).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func sqlEmptyChanges(w *sql.DB) func(t *testing.T) {
	return func(t *testing.T) {
		if _, err := w.Exec(`DELETE FROM user_changes`); err != nil {
			t.Fatal(err)
		}
	}
}

// forEachFeed runs test on every database with a change stream.
func forEachFeed(t *testing.T, test func(t *testing.T, fd feedDB)) {
	for _, f := range feedDBs {
		t.Run(f.name, func(t *testing.T) { test(t, f.open(t)) })
	}
}

// streamTiered is fastTiered following db's change stream.
func streamTiered(redisURL, prefix string, db userapi.ChangeFeed) Config {
	cfg := fastTiered(redisURL, prefix)
	cfg.Changes = db
	return cfg
}

// outsideWriter is a connection of its own to the database.
func outsideWriter(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(testenv.Context(t), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// streaming waits until one of cs follows the stream: it has created the
// slot or the change table's marker (a change committed before either
// exists is in no stream, which is why a new one starts every tier
// afresh).
func streaming(t *testing.T, cs ...*Store) {
	t.Helper()
	testenv.WaitFor(t, 5*time.Second, "the stream's slot created", func() bool {
		for _, c := range cs {
			if value(c.m.changesMissed) > 0 {
				return true
			}
		}
		return false
	})
}

// followerPair starts two tiered instances over db with Redis at url, the
// first following db's change stream and the second not, waits until both
// are healthy and the first follows, and reads ids twice on each (Redis
// and both local tiers hold them).
func followerPair(t *testing.T, url string, db feedStore, ids []int64) (follower, other *Store) {
	t.Helper()
	prefix := testPrefix()
	follower = newCache(t, db, streamTiered(url, prefix, db))
	other = newCache(t, db, fastTiered(url, prefix))
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(follower) && healthy(other) })
	streaming(t, follower)
	for _, c := range []*Store{follower, other} {
		for _, id := range ids {
			version(t, c, id)
			version(t, c, id)
		}
	}
	return follower, other
}

func leading(cs ...*Store) int {
	n := 0
	for _, c := range cs {
		if value(c.m.changesApplied) > 0 {
			n++
		}
	}
	return n
}

// TestChangeStreamOutsideWrites: three tiered instances serve reads while
// another connection writes straight into the database at a steady rate.
// Per write, the time from its commit until every instance serves the new
// version is measured; the guarantee is that it is bounded.
func TestChangeStreamOutsideWrites(t *testing.T) {
	forEachFeed(t, testOutsideWrites)
}

func testOutsideWrites(t *testing.T, fd feedDB) {
	srv := startRedis(t)
	db := fd.store
	ids := createUsers(t, db, "outside", 50)
	prefix := testPrefix()
	var inst []*Store
	for range 3 {
		inst = append(inst, newCache(t, db, streamTiered(srv.URL(), prefix, db)))
	}
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool {
		for _, c := range inst {
			if !healthy(c) {
				return false
			}
		}
		return true
	})
	streaming(t, inst...)
	// Warm every tier of every instance.
	for _, c := range inst {
		for _, id := range ids {
			version(t, c, id)
			version(t, c, id)
		}
	}
	stop := make(chan struct{})
	var readers sync.WaitGroup
	for _, c := range inst {
		readers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				version(t, c, ids[rand.N(len(ids))])
			}
		})
	}

	const writes = 150
	const every = 10 * time.Millisecond // 100 writes/s
	lags := make([]time.Duration, writes)
	var watchers sync.WaitGroup
	for i := range writes {
		id := ids[i%len(ids)]
		v := fd.update(t, id, fmt.Sprintf("Outside %d", i))
		committed := time.Now()
		watchers.Go(func() {
			for _, c := range inst {
				for {
					got := version(t, c, id)
					if got >= v {
						break
					}
					if time.Since(committed) > 5*time.Second {
						t.Errorf("write %d (user %d v%d): an instance still serves v%d after 5s", i, id, v, got)
						return
					}
					time.Sleep(200 * time.Microsecond)
				}
			}
			lags[i] = time.Since(committed)
		})
		time.Sleep(every)
	}
	watchers.Wait()
	close(stop)
	readers.Wait()
	if t.Failed() {
		return
	}
	p50, p99, maxd := percentiles(lags)
	t.Logf("outside write → every instance serves it, %d writes at %d/s: p50 %v, p99 %v, max %v",
		writes, time.Second/every, p50, p99, maxd)
	if maxd > time.Second {
		t.Errorf("max %v: above the 1 s bound", maxd)
	}
	// The stream's own lag metric saw every write, from its commit to its
	// invalidation, within the same bound.
	var observed uint64
	var total float64
	for _, c := range inst {
		var m dto.Metric
		if err := c.m.changeLag.Write(&m); err != nil {
			t.Fatal(err)
		}
		observed += m.GetHistogram().GetSampleCount()
		total += m.GetHistogram().GetSampleSum()
	}
	if observed < writes || total/float64(observed) > 1 {
		t.Errorf("userapi_change_stream_lag_seconds: %d changes observed, mean %.3fs; want >= %d, at most 1s", observed, total/float64(observed), writes)
	}
	// One leader, unless the lead passed on when a leader's stream failed
	// (a Redis timeout on a loaded machine): each interruption may hand it
	// to another instance, which is correct.
	interrupted := 0
	for _, c := range inst {
		interrupted += int(value(c.m.changesInterrupted))
	}
	if n := leading(inst...); n < 1 || n > 1+interrupted {
		t.Errorf("%d instances applied changes after %d interruptions, want one leader (plus at most one per interruption)", n, interrupted)
	}
	for _, c := range inst {
		for _, id := range ids {
			checkTiers(t, c, db, id)
		}
	}
}

// TestChangeStreamTakeover: the leader stops (its hold on the lead ends as
// a crash would end it); a standby takes over, and no change made
// meanwhile is lost.
func TestChangeStreamTakeover(t *testing.T) {
	forEachFeed(t, testTakeover)
}

func testTakeover(t *testing.T, fd feedDB) {
	srv := startRedis(t)
	db := fd.store
	ids := createUsers(t, db, "takeover", 10)
	prefix := testPrefix()
	a := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	b := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	streaming(t, a, b)
	first := fd.update(t, ids[0], "First")
	testenv.WaitFor(t, 5*time.Second, "a leader applies the first change", func() bool { return leading(a, b) == 1 })
	leader, standby := a, b
	if value(b.m.changesApplied) > 0 {
		leader, standby = b, a
	}
	testenv.WaitFor(t, time.Second, "the first change served", func() bool { return version(t, standby, ids[0]) == first })
	for _, id := range ids {
		version(t, standby, id)
		version(t, standby, id)
	}
	leader.Close()

	want := map[int64]int64{}
	for _, id := range ids {
		want[id] = fd.update(t, id, "WhileTakingOver")
	}
	serves(t, standby, ids, want, 3*time.Second, "the standby")
	if value(standby.m.changesApplied) == 0 {
		t.Error("the standby never applied a change")
	}
}

// TestChangeStreamResumes: the stream's connection is cut (as a database
// restart or a network fault cuts it); the changes committed meanwhile are
// delivered when it reconnects, without starting afresh.
func TestChangeStreamResumes(t *testing.T) {
	forEachFeed(t, testResumes)
}

func testResumes(t *testing.T, fd feedDB) {
	if fd.cut == nil {
		t.Skip("this store's stream has no connection to cut (SQLite reads the file)")
	}
	srv := startRedis(t)
	db := fd.store
	ids := createUsers(t, db, "resume", 10)
	prefix := testPrefix()
	a := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	testenv.WaitFor(t, 5*time.Second, "instance healthy", func() bool { return healthy(a) })
	streaming(t, a)
	fd.update(t, ids[0], "Warm")
	testenv.WaitFor(t, 5*time.Second, "the stream applies", func() bool { return value(a.m.changesApplied) > 0 })
	for _, id := range ids {
		version(t, a, id)
		version(t, a, id)
	}
	want := map[int64]int64{}
	fd.cut(t)
	for _, id := range ids {
		want[id] = fd.update(t, id, "WhileCut")
	}
	serves(t, a, ids, want, 3*time.Second, "A after the stream reconnected")
	if value(a.m.changesMissed) != 1 {
		t.Errorf("missed %v times, want once (the new slot or marker at start): a reconnect must resume, not start afresh", value(a.m.changesMissed))
	}
}

// TestChangeStreamPositionLost: a dropped slot or an emptied change table
// means changes may have been missed; the instances move to a new key
// generation.
func TestChangeStreamPositionLost(t *testing.T) {
	forEachFeed(t, testPositionLost)
}

func testPositionLost(t *testing.T, fd feedDB) {
	srv := startRedis(t)
	db := fd.store
	ids := createUsers(t, db, "dropped", 5)
	prefix := testPrefix()
	a := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	b := newCache(t, db, fastTiered(srv.URL(), prefix)) // not following
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	testenv.WaitFor(t, 5*time.Second, "the stream's position created", func() bool { return value(a.m.changesMissed) == 1 })
	for _, id := range ids {
		version(t, b, id)
		version(t, b, id)
	}
	gen := b.redis.shards()[0].gen.Load()
	fd.lose(t)
	want := map[int64]int64{}
	for _, id := range ids {
		want[id] = fd.update(t, id, "NoPosition")
	}
	testenv.WaitFor(t, 5*time.Second, "a new position and a new generation", func() bool {
		return value(a.m.changesMissed) == 2 && b.redis.shards()[0].gen.Load() != gen
	})
	serves(t, b, ids, want, time.Second, "B")
}

// TestOutsideUpdateMovesVersion: an UPDATE that leaves version and
// updated_at alone still moves both, so the version guard, ETags and
// If-Match see the change.
func TestOutsideUpdateMovesVersion(t *testing.T) {
	forEachFeed(t, testOutsideUpdateMovesVersion)
}

func testOutsideUpdateMovesVersion(t *testing.T, fd feedDB) {
	db := fd.store
	u := mustCreate(t, db, "trigger@example.com")
	time.Sleep(2 * time.Millisecond) // SQLite's clock counts milliseconds
	fd.update(t, u.ID, "By hand")
	got, err := db.GetUser(testenv.Context(t), u.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Version != u.Version+1 || !got.UpdatedAt.After(u.UpdatedAt) {
		t.Errorf("after a hand-written UPDATE: version %d, updated_at %v; want %d and after %v",
			got.Version, got.UpdatedAt, u.Version+1, u.UpdatedAt)
	}
	upd, err := db.UpdateUser(testenv.Context(t), u.ID, userapi.UserUpdate{Name: ptr("By the service")})
	if err != nil {
		t.Fatal(err)
	}
	if upd.Version != got.Version+1 {
		t.Errorf("the service's update: version %d, want %d (one step, not two)", upd.Version, got.Version+1)
	}
}

// TestChangeStreamReplayHarmless: the same changes applied again (a
// leader that died before acknowledging them) change nothing: every
// instance still serves the current version, and no tier holds an older
// one.
func TestChangeStreamReplayHarmless(t *testing.T) {
	forEachFeed(t, testReplayHarmless)
}

func testReplayHarmless(t *testing.T, fd feedDB) {
	srv := startRedis(t)
	db := fd.store
	ids := createUsers(t, db, "replay", 5)
	prefix := testPrefix()
	a := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	b := newCache(t, db, fastTiered(srv.URL(), prefix))
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	streaming(t, a)
	var old []userapi.Change
	want := map[int64]int64{}
	for _, id := range ids {
		old = append(old, userapi.Change{ID: id, Version: 1})
		want[id] = fd.update(t, id, "Replayed")
	}
	serves(t, b, ids, want, 3*time.Second, "B")
	for _, id := range ids {
		version(t, b, id)
	}
	// Replay the old changes, then the current ones, as a new leader would.
	for range 2 {
		if err := a.applyChanges(testenv.Context(t), old); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []*Store{a, b} {
		for _, id := range ids {
			if v := version(t, c, id); v != want[id] {
				t.Errorf("after a replay, user %d at version %d, want %d", id, v, want[id])
			}
			checkTiers(t, c, db, id)
		}
	}
}

// panickingFeed panics in its first FollowChanges; later calls deliver a
// deletion of id and then follow until ctx ends.
type panickingFeed struct {
	id    int64
	calls atomic.Int32
}

func (f *panickingFeed) FollowChanges(ctx context.Context, apply func(context.Context, []userapi.Change) error, _ func(context.Context) error) error {
	if f.calls.Add(1) == 1 {
		panic("stream decoder bug")
	}
	if err := apply(ctx, []userapi.Change{{ID: f.id, Version: 2, Deleted: true}}); err != nil {
		return err
	}
	<-ctx.Done()
	return ctx.Err()
}

// TestChangeStreamPanic: a panic in the change stream is counted and the
// follower goes on (as after a stream error), so changes still invalidate.
func TestChangeStreamPanic(t *testing.T) {
	db := newSQLite(t)
	u := mustCreate(t, db, "stream-panic@example.com")
	before := value(panics.Counter("change_stream"))
	feed := &panickingFeed{id: u.ID}
	c := newCache(t, db, Config{Mode: ModeLocal, Coalesce: true, Changes: feed})
	testenv.WaitFor(t, 5*time.Second, "the change applied after the panic", func() bool { return value(c.m.changesApplied) == 1 })
	if got := value(panics.Counter("change_stream")) - before; got != 1 {
		t.Errorf("userapi_panics_total{where=change_stream} went up by %v, want 1", got)
	}
	if n := feed.calls.Load(); n != 2 {
		t.Errorf("FollowChanges called %d times, want 2 (the panic, then the retry)", n)
	}
}

// TestChangeStreamKeepsLostPending: a writer that cannot reach Redis keeps
// its invalidations pending in memory; restarted before Redis is back, it
// loses them, and Redis still holds the old rows. The stream delivers
// those commits all the same once Redis answers again.
func TestChangeStreamKeepsLostPending(t *testing.T) {
	forEachFeed(t, testKeepsLostPending)
}

func testKeepsLostPending(t *testing.T, fd feedDB) {
	srv := startRedis(t)
	db := fd.store
	ids := createUsers(t, db, "lost-pending", 5)
	b, a := followerPair(t, srv.URL(), db, ids) // a writes, b leads the stream
	srv.Pause()
	want := map[int64]int64{}
	for _, id := range ids {
		want[id] = rename(t, a, id, "Pending").Version
	}
	if n := a.redis.npending.Load(); n != int64(len(ids)) {
		t.Fatalf("the writer has %d invalidations pending, want %d", n, len(ids))
	}
	a.Close() // its pending invalidations go with it
	restarted := newCache(t, db, fastTiered(srv.URL(), a.cfg.KeyPrefix))
	time.Sleep(500 * time.Millisecond) // the stream's invalidations time out meanwhile
	srv.Resume()
	testenv.WaitFor(t, 5*time.Second, "instances healthy again", func() bool { return healthy(restarted) && healthy(b) })
	for _, c := range []*Store{restarted, b} {
		serves(t, c, ids, want, 3*time.Second, "an instance after Redis came back")
		for _, id := range ids {
			checkTiers(t, c, db, id)
		}
	}
}
