package cache

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"userapi"
	"userapi/internal/panics"
	"userapi/internal/pgtest"
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
	s, err := postgres.Open(testContext(t), url, postgres.Options{MaxConns: 8, Migrate: true})
	if err != nil {
		t.Fatalf("postgres.Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, url
}

// streamTiered is fastTiered following db's change stream.
func streamTiered(redisURL, prefix string, db *postgres.Store) Config {
	cfg := fastTiered(redisURL, prefix)
	cfg.Changes = db
	return cfg
}

// outsideWriter is a connection of its own to the database.
func outsideWriter(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(testContext(t), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// outsideUpdate renames id without touching version or updated_at, as a
// hand-written UPDATE would; the schema's trigger moves them. It returns
// the new version.
func outsideUpdate(t *testing.T, c *pgx.Conn, id int64, name string) int64 {
	t.Helper()
	var v int64
	if err := c.QueryRow(testContext(t), `UPDATE users SET name = $1 WHERE id = $2 RETURNING version`, name, id).Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// streaming waits until one of cs follows the stream: it has created the
// slot (a change committed before the slot exists is in no stream, which
// is why a new slot starts every tier afresh).
func streaming(t *testing.T, cs ...*Store) {
	t.Helper()
	eventually(t, 5*time.Second, "the stream's slot created", func() bool {
		for _, c := range cs {
			if value(c.m.changesMissed) > 0 {
				return true
			}
		}
		return false
	})
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
	srv := startRedis(t)
	db, url := logicalDB(t)
	ids := createUsers(t, db, "outside", 50)
	prefix := testPrefix()
	var inst []*Store
	for range 3 {
		inst = append(inst, newCache(t, db, streamTiered(srv.URL(), prefix, db)))
	}
	eventually(t, 5*time.Second, "instances healthy", func() bool {
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

	w := outsideWriter(t, url)
	const writes = 150
	const every = 10 * time.Millisecond // 100 writes/s
	lags := make([]time.Duration, writes)
	var watchers sync.WaitGroup
	for i := range writes {
		id := ids[i%len(ids)]
		v := outsideUpdate(t, w, id, fmt.Sprintf("Outside %d", i))
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
	if n := leading(inst...); n != 1 {
		t.Errorf("%d instances applied changes, want exactly one leader", n)
	}
	for _, c := range inst {
		for _, id := range ids {
			checkTiers(t, c, db, id)
		}
	}
}

// TestChangeStreamTakeover: the leader stops (its connection to the slot
// ends as a crash would end it); a standby takes over, and no change made
// meanwhile is lost.
func TestChangeStreamTakeover(t *testing.T) {
	srv := startRedis(t)
	db, url := logicalDB(t)
	ids := createUsers(t, db, "takeover", 10)
	prefix := testPrefix()
	a := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	b := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	eventually(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	streaming(t, a, b)
	w := outsideWriter(t, url)
	first := outsideUpdate(t, w, ids[0], "First")
	eventually(t, 5*time.Second, "a leader applies the first change", func() bool { return leading(a, b) == 1 })
	leader, standby := a, b
	if value(b.m.changesApplied) > 0 {
		leader, standby = b, a
	}
	eventually(t, time.Second, "the first change served", func() bool { return version(t, standby, ids[0]) == first })
	for _, id := range ids {
		version(t, standby, id)
		version(t, standby, id)
	}
	leader.Close()

	want := map[int64]int64{}
	for _, id := range ids {
		want[id] = outsideUpdate(t, w, id, "WhileTakingOver")
	}
	serves(t, standby, ids, want, 3*time.Second, "the standby")
	if value(standby.m.changesApplied) == 0 {
		t.Error("the standby never applied a change")
	}
}

// TestChangeStreamResumes: the stream's connection is cut (as a PostgreSQL
// restart or a network fault cuts it); the changes committed meanwhile are
// delivered from the slot when it reconnects.
func TestChangeStreamResumes(t *testing.T) {
	srv := startRedis(t)
	db, url := logicalDB(t)
	ids := createUsers(t, db, "resume", 10)
	prefix := testPrefix()
	a := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	eventually(t, 5*time.Second, "instance healthy", func() bool { return healthy(a) })
	streaming(t, a)
	w := outsideWriter(t, url)
	outsideUpdate(t, w, ids[0], "Warm")
	eventually(t, 5*time.Second, "the stream applies", func() bool { return value(a.m.changesApplied) > 0 })
	for _, id := range ids {
		version(t, a, id)
		version(t, a, id)
	}
	want := map[int64]int64{}
	pgtest.Exec(t, url, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = current_database() AND active_pid IS NOT NULL`)
	for _, id := range ids {
		want[id] = outsideUpdate(t, w, id, "WhileCut")
	}
	serves(t, a, ids, want, 3*time.Second, "A after the stream reconnected")
	if value(a.m.changesMissed) != 1 {
		t.Errorf("missed %v times, want once (the new slot at start): a reconnect must resume, not start afresh", value(a.m.changesMissed))
	}
}

// TestChangeStreamSlotDropped: a dropped slot means changes may have been
// missed; the instances move to a new key generation.
func TestChangeStreamSlotDropped(t *testing.T) {
	srv := startRedis(t)
	db, url := logicalDB(t)
	ids := createUsers(t, db, "dropped", 5)
	prefix := testPrefix()
	a := newCache(t, db, streamTiered(srv.URL(), prefix, db))
	b := newCache(t, db, fastTiered(srv.URL(), prefix)) // not following
	eventually(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	eventually(t, 5*time.Second, "the slot created", func() bool { return value(a.m.changesMissed) == 1 })
	for _, id := range ids {
		version(t, b, id)
		version(t, b, id)
	}
	gen := b.redis.gen.Load()
	// Cut the stream and drop its slot before it reconnects; writes made
	// meanwhile are in no slot.
	ctx := testContext(t)
	c := outsideWriter(t, url)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := c.Exec(ctx, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = current_database() AND active_pid IS NOT NULL`); err != nil {
			t.Fatal(err)
		}
		var dropped int
		err := c.QueryRow(ctx, `
SELECT count(pg_drop_replication_slot(slot_name))
FROM pg_replication_slots
WHERE database = current_database() AND NOT active`).Scan(&dropped)
		if err == nil && dropped == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("could not drop the slot: %v", err)
		}
	}
	want := map[int64]int64{}
	for _, id := range ids {
		want[id] = outsideUpdate(t, c, id, "NoSlot")
	}
	eventually(t, 5*time.Second, "a new slot and a new generation", func() bool {
		return value(a.m.changesMissed) == 2 && b.redis.gen.Load() != gen
	})
	serves(t, b, ids, want, time.Second, "B")
}

// TestOutsideUpdateMovesVersion: an UPDATE that leaves version and
// updated_at alone still moves both, so the version guard, ETags and
// If-Match see the change.
func TestOutsideUpdateMovesVersion(t *testing.T) {
	db, url := logicalDB(t)
	u := mustCreate(t, db, "trigger@example.com")
	pgtest.Exec(t, url, `UPDATE users SET name = 'By hand' WHERE id = $1`, u.ID)
	got, err := db.GetUser(testContext(t), u.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Version != u.Version+1 || !got.UpdatedAt.After(u.UpdatedAt) {
		t.Errorf("after a hand-written UPDATE: version %d, updated_at %v; want %d and after %v",
			got.Version, got.UpdatedAt, u.Version+1, u.UpdatedAt)
	}
	upd, err := db.UpdateUser(testContext(t), u.ID, userapi.UserUpdate{Name: ptr("By the service")})
	if err != nil {
		t.Fatal(err)
	}
	if upd.Version != got.Version+1 {
		t.Errorf("the service's update: version %d, want %d (one step, not two)", upd.Version, got.Version+1)
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
	eventually(t, 5*time.Second, "the change applied after the panic", func() bool { return value(c.m.changesApplied) == 1 })
	if got := value(panics.Counter("change_stream")) - before; got != 1 {
		t.Errorf("userapi_panics_total{where=change_stream} went up by %v, want 1", got)
	}
	if n := feed.calls.Load(); n != 2 {
		t.Errorf("FollowChanges called %d times, want 2 (the panic, then the retry)", n)
	}
}
