package cache

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"userapi"
	"userapi/internal/panics"
	"userapi/internal/testenv"
	"userapi/storetest"
)

// cacheModes are the configurations the conformance suite and the
// behaviour tests run against. redis marks those that need Redis.
var cacheModes = []struct {
	name  string
	cfg   Config
	redis bool
}{
	{"off", Config{Mode: ModeOff}, false},
	{"off+coalesce", Config{Mode: ModeOff, Coalesce: true}, false},
	{"local", Config{Mode: ModeLocal, Coalesce: true}, false},
	{"local-nocoalesce", Config{Mode: ModeLocal}, false},
	{"redis", Config{Mode: ModeRedis, Coalesce: true}, true},
	{"redis-nocoalesce", Config{Mode: ModeRedis}, true},
	{"tiered", Config{Mode: ModeTiered, Coalesce: true}, true},
}

// cachingModes are the modes that cache (the stale-fill and negative
// caching tests need a tier).
func cachingModes() []int {
	var idx []int
	for i, m := range cacheModes {
		if m.cfg.Mode != ModeOff {
			idx = append(idx, i)
		}
	}
	return idx
}

func TestParseMode(t *testing.T) {
	for _, s := range []string{"off", "local", "redis", "tiered", " Tiered "} {
		if _, err := ParseMode(s); err != nil {
			t.Errorf("ParseMode(%q): %v", s, err)
		}
	}
	if _, err := ParseMode("memcached"); err == nil {
		t.Error("ParseMode(memcached) succeeded")
	}
	if _, err := New(context.Background(), nil, Config{Mode: ModeRedis}); err == nil {
		t.Error("New(redis mode, no Redis) succeeded")
	}
}

func TestConformance(t *testing.T) {
	backends := []struct {
		name string
		open func(testing.TB) userapi.Store
	}{{"sqlite", newSQLite}}
	if postgresURL() != "" {
		backends = append(backends, struct {
			name string
			open func(testing.TB) userapi.Store
		}{"postgres", newPostgres})
	}
	if bouncerEnabled() {
		backends = append(backends, struct {
			name string
			open func(testing.TB) userapi.Store
		}{"pgbouncer", newPostgresBouncer})
	}
	for _, b := range backends {
		for _, m := range cacheModes {
			if b.name != "sqlite" && !m.cfg.Coalesce {
				continue // the variants without coalescing differ in no store call; SQLite covers them
			}
			t.Run(b.name+"/"+m.name, func(t *testing.T) {
				t.Parallel() // each has its own database and key prefix
				if m.redis {
					needRedis(t)
				}
				storetest.Run(t, func(t *testing.T) userapi.Store {
					return newCache(t, b.open(t), m.cfg)
				})
			})
		}
	}
}

// TestStampede: 1,000 concurrent reads of one cold key make exactly one
// database query. The load is held until every reader has joined it, as a
// slow database would, so no reader can come late and find the load gone.
func TestStampede(t *testing.T) {
	for _, m := range cacheModes {
		if !m.cfg.Coalesce {
			continue
		}
		t.Run(m.name, func(t *testing.T) {
			if m.redis {
				needRedis(t)
			}
			h := &hookStore{Store: newSQLite(t)}
			u := mustCreate(t, h, "stampede@example.com")
			c := newCache(t, h, m.cfg)
			const n = 1000
			release := make(chan struct{})
			h.setHook(func(_ []int64, us []*userapi.User, err error) ([]*userapi.User, error) {
				<-release
				return us, err
			})
			start := make(chan struct{})
			var wg sync.WaitGroup
			errs := make(chan error, n)
			for range n {
				wg.Go(func() {
					<-start
					e, err := c.GetUserEncoded(testenv.Context(t), u.ID)
					if err == nil && e.Version != 1 {
						err = fmt.Errorf("version %d", e.Version)
					}
					if err != nil {
						errs <- err
					}
				})
			}
			close(start)
			testenv.WaitFor(t, 10*time.Second, "all readers joined one load", func() bool {
				return value(c.m.coalesced) == n-1
			})
			close(release)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Errorf("GetUserEncoded: %v", err)
			}
			if got := h.reads(); got != 1 {
				t.Errorf("%d concurrent reads of a cold key made %d store queries, want 1", n, got)
			}
		})
	}
}

// TestBatching: misses of different ids that queue while the loader is busy
// go to the store together, in batches of at most MaxBatch.
func TestBatching(t *testing.T) {
	h := &hookStore{Store: newSQLite(t)}
	ids := createUsers(t, h, "b", 41)
	c := newCache(t, h, Config{Mode: ModeOff, Coalesce: true, Loaders: 1, MaxBatch: 8})
	gate := make(chan struct{})
	var once sync.Once
	h.setHook(func(_ []int64, us []*userapi.User, err error) ([]*userapi.User, error) {
		once.Do(func() { <-gate }) // the first load is slow
		return us, err
	})
	var wg sync.WaitGroup
	wg.Go(func() { version(t, c, ids[0]) })
	testenv.WaitFor(t, 5*time.Second, "first load started", func() bool { return h.getUsers.Load() == 1 })
	readConcurrently(t, &wg, c, ids[1:])
	testenv.WaitFor(t, 5*time.Second, "40 misses queued", func() bool { return len(c.loader.queue) == 40 })
	close(gate)
	wg.Wait()
	if got, want := h.batchSizes(), []int{1, 8, 8, 8, 8, 8}; !slices.Equal(got, want) {
		t.Errorf("batch sizes = %v, want %v", got, want)
	}
}

// TestBatchingBounded: a free-for-all of misses on a slow store is served
// in fewer queries than ids, none larger than MaxBatch.
func TestBatchingBounded(t *testing.T) {
	h := &hookStore{Store: newSQLite(t)}
	ids := createUsers(t, h, "f", 200)
	c := newCache(t, h, Config{Mode: ModeOff, Coalesce: true, Loaders: 2, MaxBatch: 16})
	h.setHook(func(_ []int64, us []*userapi.User, err error) ([]*userapi.User, error) {
		time.Sleep(5 * time.Millisecond)
		return us, err
	})
	var wg sync.WaitGroup
	readConcurrently(t, &wg, c, ids)
	wg.Wait()
	sizes := h.batchSizes()
	total := 0
	for _, n := range sizes {
		total += n
		if n > 16 {
			t.Errorf("batch of %d ids, MaxBatch 16", n)
		}
	}
	if total != len(ids) || len(sizes) >= len(ids)/2 {
		t.Errorf("%d misses took %d queries (%d ids in all), want fewer than %d", len(ids), len(sizes), total, len(ids)/2)
	}
}

// TestIdleMissLoadsAtOnce: with nothing else going on, a miss is loaded
// immediately, not after a batching delay.
func TestIdleMissLoadsAtOnce(t *testing.T) {
	h := &hookStore{Store: newSQLite(t)}
	ids := createUsers(t, h, "i", 21)
	c := newCache(t, h, Config{Mode: ModeOff, Coalesce: true, MaxBatch: 64})
	version(t, c, ids[0]) // warm the SQLite connection
	var took []time.Duration
	for _, id := range ids[1:] {
		start := time.Now()
		version(t, c, id)
		took = append(took, time.Since(start))
	}
	slices.Sort(took)
	if med := took[len(took)/2]; med > 5*time.Millisecond {
		t.Errorf("median idle miss took %v (all: %v); a batching delay?", med, took)
	}
	for _, n := range h.batchSizes() {
		if n != 1 {
			t.Errorf("idle misses batched: sizes %v", h.batchSizes())
			break
		}
	}
}

// TestStaleFillRejected forces the race the version guard exists for: a
// load reads the old row, a write commits and invalidates, and only then
// does the load's fill reach the tiers. The fill must be rejected in every
// tier, and the next read must see the write.
func TestStaleFillRejected(t *testing.T) {
	for _, i := range cachingModes() {
		m := cacheModes[i]
		t.Run(m.name, func(t *testing.T) {
			if m.redis {
				needRedis(t)
			}
			h := &hookStore{Store: newSQLite(t)}
			u := mustCreate(t, h, "race@example.com")
			c := newCache(t, h, m.cfg)

			readDone, proceed := make(chan struct{}), make(chan struct{})
			var once sync.Once
			h.setHook(func(_ []int64, us []*userapi.User, err error) ([]*userapi.User, error) {
				once.Do(func() {
					close(readDone) // the old row is read...
					<-proceed       // ...and held until the write is done
				})
				return us, err
			})
			got := make(chan int64, 1)
			go func() { got <- version(t, c, u.ID) }()
			<-readDone
			if v := rename(t, c, u.ID, "New").Version; v != 2 {
				t.Fatalf("update version %d", v)
			}
			close(proceed)
			if v := <-got; v != 1 {
				t.Errorf("the racing read returned version %d, want the old 1", v)
			}
			waitStaleFill(t, c)
			for range 3 {
				if v := version(t, c, u.ID); v != 2 {
					t.Fatalf("after the write and the stale fill, read version %d, want 2", v)
				}
			}
			checkTiers(t, c, h, u.ID)
		})
	}
}

// TestStaleNegativeFillRejected: a load that read an id as absent before
// the create of that id must not cache the absence after it.
func TestStaleNegativeFillRejected(t *testing.T) {
	for _, i := range cachingModes() {
		m := cacheModes[i]
		t.Run(m.name, func(t *testing.T) {
			if m.redis {
				needRedis(t)
			}
			h := &hookStore{Store: newSQLite(t)}
			next := mustCreate(t, h, "first@example.com").ID + 1 // SQLite ids are sequential
			c := newCache(t, h, m.cfg)

			readDone, proceed := make(chan struct{}), make(chan struct{})
			var once sync.Once
			h.setHook(func(_ []int64, us []*userapi.User, err error) ([]*userapi.User, error) {
				once.Do(func() { close(readDone); <-proceed })
				return us, err
			})
			got := make(chan int64, 1)
			go func() { got <- version(t, c, next) }()
			<-readDone
			if id := mustCreate(t, c, "second@example.com").ID; id != next {
				t.Fatalf("created id %d, expected %d", id, next)
			}
			close(proceed)
			if v := <-got; v != 0 {
				t.Errorf("the racing read found version %d, want absent", v)
			}
			waitStaleFill(t, c)
			if v := version(t, c, next); v != 1 {
				t.Fatalf("after the create, read version %d, want 1", v)
			}
			checkTiers(t, c, h, next)
		})
	}
}

// waitStaleFill waits until every tier of c has rejected one fill as stale.
func waitStaleFill(t *testing.T, c *Store) {
	t.Helper()
	testenv.WaitFor(t, 5*time.Second, "stale fill rejected", func() bool {
		return (c.local == nil || value(c.m.fillLocalStale) == 1) &&
			(c.redis == nil || value(c.m.fillRedisStale) == 1)
	})
}

// checkTiers checks that every tier's entry for id, if any, matches the
// database row.
func checkTiers(t *testing.T, c *Store, db userapi.Store, id int64) {
	t.Helper()
	row, err := db.GetUser(testenv.Context(t), id)
	if err != nil && !errors.Is(err, userapi.ErrNotFound) {
		t.Fatal(err)
	}
	check := func(tier string, e *entry) {
		switch {
		case e == nil || e.kind.guards():
		case e.kind == kindAbsent && row != nil:
			t.Errorf("%s tier caches id %d as absent; the database has version %d", tier, id, row.Version)
		case e.kind == kindValue && row == nil:
			t.Errorf("%s tier caches id %d at version %d; the database has no row", tier, id, e.version)
		case e.kind == kindValue && string(e.json) != string(row.AppendJSON(nil)):
			t.Errorf("%s tier has id %d as %s; the database has %s", tier, id, e.json, row.AppendJSON(nil))
		}
	}
	if c.local != nil {
		if e, ok := c.local.get(id); ok && e.epoch == c.state.Load() {
			check("local", e)
		}
	}
	if c.redis != nil && c.redis.client() != nil {
		e, err := c.redis.getWithin(testenv.Context(t), id, 5*time.Second)
		if err != nil {
			t.Fatalf("redis get: %v", err)
		}
		check("redis", e)
	}
}

// TestNegativeCaching: an absent id is cached as absent (no second query),
// and a create of that id clears it at once.
func TestNegativeCaching(t *testing.T) {
	for _, i := range cachingModes() {
		m := cacheModes[i]
		t.Run(m.name, func(t *testing.T) {
			if m.redis {
				needRedis(t)
			}
			h := &hookStore{Store: newSQLite(t)}
			next := mustCreate(t, h, "first@example.com").ID + 1
			c := newCache(t, h, m.cfg)
			if v := version(t, c, next); v != 0 {
				t.Fatalf("absent id read as version %d", v)
			}
			before := h.reads()
			if v := version(t, c, next); v != 0 {
				t.Fatalf("absent id read as version %d", v)
			}
			if h.reads() != before {
				t.Errorf("second read of an absent id queried the store")
			}
			if id := mustCreate(t, c, "second@example.com").ID; id != next {
				t.Fatalf("created id %d, expected %d", id, next)
			}
			if v := version(t, c, next); v != 1 {
				t.Errorf("after create, read version %d, want 1", v)
			}
		})
	}
}

// TestReadYourWrites: a read on the writing instance that starts after the
// write returned sees that write, even while other readers keep loads of
// the same id in flight and fill the tiers.
func TestReadYourWrites(t *testing.T) {
	for _, m := range cacheModes {
		t.Run(m.name, func(t *testing.T) {
			if m.redis {
				needRedis(t)
			}
			h := &hookStore{Store: newSQLite(t)}
			u := mustCreate(t, h, "ryw@example.com")
			c := newCache(t, h, m.cfg)
			ctx, cancel := context.WithCancel(testenv.Context(t))
			var wg sync.WaitGroup
			for range 4 {
				wg.Go(func() {
					for ctx.Err() == nil {
						c.GetUserEncoded(ctx, u.ID)
					}
				})
			}
			for i := range 50 {
				want := rename(t, c, u.ID, fmt.Sprint("N", i)).Version
				if got := version(t, c, u.ID); got < want {
					t.Errorf("read after write %d: version %d", want, got)
				}
				// And through GetUser, which decodes.
				got, err := c.GetUser(testenv.Context(t), u.ID)
				if err != nil || got.Version < want {
					t.Errorf("GetUser after write %d: %+v, %v", want, got, err)
				}
			}
			cancel()
			wg.Wait()
			checkTiers(t, c, h, u.ID)
		})
	}
}

// TestDeleteInvalidates: a deleted user is not served from any tier.
func TestDeleteInvalidates(t *testing.T) {
	for _, i := range cachingModes() {
		m := cacheModes[i]
		t.Run(m.name, func(t *testing.T) {
			if m.redis {
				needRedis(t)
			}
			h := &hookStore{Store: newSQLite(t)}
			u := mustCreate(t, h, "del@example.com")
			c := newCache(t, h, m.cfg)
			version(t, c, u.ID)
			version(t, c, u.ID)
			if err := c.DeleteUser(testenv.Context(t), u.ID, 0); err != nil {
				t.Fatal(err)
			}
			if v := version(t, c, u.ID); v != 0 {
				t.Errorf("deleted user read as version %d", v)
			}
			checkTiers(t, c, h, u.ID)
		})
	}
}

// TestNotFoundWriteInvalidates: a writer that died between its commit and
// its invalidation leaves the old row cached. The next write of that id is
// answered 404 (a retried DELETE, say); that answer proves the row is gone,
// so it must clear the cached copy, in every tier, instead of leaving it to
// its TTL.
func TestNotFoundWriteInvalidates(t *testing.T) {
	writes := map[string]func(c *Store, id int64) error{
		"delete": func(c *Store, id int64) error { return c.DeleteUser(testenv.Context(t), id, 0) },
		"update": func(c *Store, id int64) error {
			_, err := c.UpdateUser(testenv.Context(t), id, userapi.UserUpdate{Name: ptr("X")})
			return err
		},
	}
	for _, i := range cachingModes() {
		m := cacheModes[i]
		for name, write := range writes {
			t.Run(m.name+"/"+name, func(t *testing.T) {
				if m.redis {
					needRedis(t)
				}
				h := &hookStore{Store: newSQLite(t)}
				u := mustCreate(t, h, "gone@example.com")
				c := newCache(t, h, m.cfg)
				version(t, c, u.ID)
				// The dead writer's commit, without its invalidation.
				if err := h.Store.DeleteUser(testenv.Context(t), u.ID, 0); err != nil {
					t.Fatal(err)
				}
				if v := version(t, c, u.ID); v != 1 {
					t.Fatalf("before the 404: version %d, want the stale 1 (the test needs it cached)", v)
				}
				if err := write(c, u.ID); !errors.Is(err, userapi.ErrNotFound) {
					t.Fatalf("%s of a deleted row: %v, want ErrNotFound", name, err)
				}
				if v := version(t, c, u.ID); v != 0 {
					t.Errorf("after a 404 %s the cache still serves version %d", name, v)
				}
				checkTiers(t, c, h, u.ID)
			})
		}
	}
}

// TestDatabaseDown: with the database unreachable, cached entries are still
// served, misses fail with ErrUnavailable, and service resumes when it
// returns.
func TestDatabaseDown(t *testing.T) {
	for _, i := range cachingModes() {
		m := cacheModes[i]
		t.Run(m.name, func(t *testing.T) {
			if m.redis {
				needRedis(t)
			}
			h := &hookStore{Store: newSQLite(t)}
			cached := mustCreate(t, h, "cached@example.com")
			other := mustCreate(t, h, "other@example.com")
			absent := other.ID + 100
			c := newCache(t, h, m.cfg)
			version(t, c, cached.ID)
			version(t, c, absent)

			h.down.Store(true)
			if v := version(t, c, cached.ID); v != 1 {
				t.Errorf("cached user while the database is down: version %d", v)
			}
			if v := version(t, c, absent); v != 0 {
				t.Errorf("cached absence while the database is down: version %d", v)
			}
			if _, err := c.GetUserEncoded(testenv.Context(t), other.ID); !errors.Is(err, userapi.ErrUnavailable) {
				t.Errorf("uncached read while the database is down: %v, want ErrUnavailable", err)
			}
			if _, err := c.UpdateUser(testenv.Context(t), other.ID, userapi.UserUpdate{Name: ptr("X")}); !errors.Is(err, userapi.ErrUnavailable) {
				t.Errorf("write while the database is down: %v, want ErrUnavailable", err)
			}
			h.down.Store(false)
			if v := version(t, c, other.ID); v != 1 {
				t.Errorf("after the database returned: version %d, want 1", v)
			}
		})
	}
}

// TestGetUserDecodes: GetUser through the cache returns exactly the row,
// from every tier.
func TestGetUserDecodes(t *testing.T) {
	for _, m := range cacheModes {
		t.Run(m.name, func(t *testing.T) {
			if m.redis {
				needRedis(t)
			}
			h := &hookStore{Store: newSQLite(t)}
			u := mustCreate(t, h, "dec@example.com")
			u = rename(t, h, u.ID, "Zoë \"quoted\" \u2028 name")
			c := newCache(t, h, m.cfg)
			for range 3 { // load, then hits
				got, err := c.GetUser(testenv.Context(t), u.ID)
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(u, got); diff != "" {
					t.Errorf("GetUser mismatch (-want +got):\n%s", diff)
				}
			}
		})
	}
}

// TestCloseFailsWaiters: Close ends the loader; reads still queued fail
// with ErrUnavailable instead of hanging.
func TestCloseFailsWaiters(t *testing.T) {
	h := &hookStore{Store: newSQLite(t)}
	u := mustCreate(t, h, "close@example.com")
	c, err := New(testenv.Context(t), h, Config{Mode: ModeLocal, Coalesce: true, Loaders: 1})
	if err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	h.setHook(func(_ []int64, us []*userapi.User, err error) ([]*userapi.User, error) {
		<-gate
		return us, err
	})
	errs := make(chan error, 2)
	go func() { _, err := c.GetUserEncoded(context.Background(), u.ID); errs <- err }()
	testenv.WaitFor(t, 5*time.Second, "load started", func() bool { return h.getUsers.Load() == 1 })
	go func() { _, err := c.GetUserEncoded(context.Background(), u.ID+1); errs <- err }()
	testenv.WaitFor(t, 5*time.Second, "second load queued", func() bool { return len(c.loader.queue) == 1 })
	closed := make(chan struct{})
	go func() { c.Close(); close(closed) }()
	time.Sleep(10 * time.Millisecond)
	close(gate)
	<-closed
	var ok, unavailable int
	for range 2 {
		switch err := <-errs; {
		case err == nil:
			ok++
		case errors.Is(err, userapi.ErrUnavailable):
			unavailable++
		default:
			t.Errorf("read during Close: %v, want success or ErrUnavailable", err)
		}
	}
	if ok != 1 || unavailable != 1 {
		t.Errorf("reads during Close: %d succeeded, %d unavailable; want the running load to finish and the queued one to fail", ok, unavailable)
	}
}

// TestLoaderPanic: a store whose GetUsers panics does not kill the
// process. The readers waiting on that load get the panic as an error at
// once, it is counted and logged, the worker lives on (there is only one),
// and the next load works.
func TestLoaderPanic(t *testing.T) {
	h := &hookStore{Store: newSQLite(t)}
	u := mustCreate(t, h, "panic@example.com")
	c := newCache(t, h, Config{Mode: ModeLocal, Coalesce: true, Loaders: 1})
	gate := make(chan struct{})
	var loads atomic.Int32
	h.setHook(func(_ []int64, us []*userapi.User, err error) ([]*userapi.User, error) {
		if loads.Add(1) == 1 {
			<-gate
			panic("store bug")
		}
		return us, err
	})
	before := value(panics.Counter("cache_loader"))

	const readers = 8
	errs := make(chan error, readers)
	for range readers {
		go func() { _, err := c.GetUserEncoded(testenv.Context(t), u.ID); errs <- err }()
	}
	testenv.WaitFor(t, 5*time.Second, "readers joined the load", func() bool {
		return h.getUsers.Load() == 1 && value(c.m.coalesced) == readers-1
	})
	close(gate)
	for range readers {
		select {
		case err := <-errs:
			var pe *panics.Error
			if !errors.As(err, &pe) || pe.Value != "store bug" {
				t.Errorf("reader of the panicked load: %v, want the panic as its error", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a reader of the panicked load is still waiting")
		}
	}
	if got := value(panics.Counter("cache_loader")) - before; got != 1 {
		t.Errorf("userapi_panics_total{where=cache_loader} went up by %v, want 1", got)
	}
	if v := version(t, c, u.ID); v != 1 {
		t.Errorf("read after the panic: version %d, want 1", v)
	}
	if n := inflightCalls(c); n != 0 {
		t.Errorf("%d calls left in flight", n)
	}
}

func ptr(s string) *string { return &s }

// TestReadAfterClose: reads that reach the loader after Close fail at once
// with ErrUnavailable; none waits out its deadline, and none leaves its id
// stuck for the next reader.
func TestReadAfterClose(t *testing.T) {
	c := newCache(t, newSQLite(t), Config{Mode: ModeOff, Coalesce: true})
	c.Close()
	for id := range int64(100) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := c.GetUserEncoded(ctx, id+1)
		cancel()
		if !errors.Is(err, userapi.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("read %d after Close = %v, want an immediate ErrUnavailable", id+1, err)
		}
	}
}

// TestBatchingTakesRunnableMisses: a worker that takes a call first lets
// the handlers that are already runnable queue their misses, so they go to
// the store in the same batch instead of one query for the first and
// another for the rest. With one P the interleaving is mostly the
// scheduler's order.
func TestBatchingTakesRunnableMisses(t *testing.T) {
	h := &hookStore{Store: newSQLite(t)}
	ids := createUsers(t, h, "r", 10)
	c := newCache(t, h, Config{Mode: ModeOff, Coalesce: true, Loaders: 1, MaxBatch: 64})
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	var wg sync.WaitGroup
	readConcurrently(t, &wg, c, ids)
	wg.Wait()
	// Usually one batch of ten; the scheduler may run the yielded worker
	// before the last handlers now and then (it takes from the global run
	// queue every 61st schedule, and other tests leave goroutines behind),
	// which splits it in two. Without the yield it is ten batches of one.
	if got := h.batchSizes(); len(got) > 3 {
		t.Errorf("batch sizes = %v, want the ten misses in at most 3 batches", got)
	}
}

// TestSecondLoadWaitsForFullBatch: while one load runs, a second starts only
// with minParallel ids; fewer wait for the running load to finish. With
// three loaders, the two free ones must not split the waiting calls between
// them (then neither would reach minParallel).
func TestSecondLoadWaitsForFullBatch(t *testing.T) {
	for _, loaders := range []int{2, 3} {
		t.Run(fmt.Sprintf("loaders=%d", loaders), func(t *testing.T) {
			h := &hookStore{Store: newSQLite(t)}
			ids := createUsers(t, h, "p", 1+5+minParallel)
			c := newCache(t, h, Config{Mode: ModeOff, Coalesce: true, Loaders: loaders, MaxBatch: 64})
			c.loader.gatherWait = time.Hour // only the running load's end releases a small batch
			release := gateFirstLoad(t, h)
			var wg sync.WaitGroup
			readConcurrently(t, &wg, c, ids[:1])
			testenv.WaitFor(t, 5*time.Second, "first load started", func() bool { return h.getUsers.Load() == 1 })

			// Five misses: a free worker gathers them but starts no load.
			readConcurrently(t, &wg, c, ids[1:6])
			testenv.WaitFor(t, 5*time.Second, "5 misses gathered", func() bool {
				return inflightCalls(c) == 6 && len(c.loader.queue) == 0
			})
			if n := h.getUsers.Load(); n != 1 {
				t.Fatalf("%d loads with one running and 5 ids waiting, want 1", n)
			}

			// minParallel more: a second load starts with minParallel of
			// them while the first still runs; the 5 left over wait again.
			readConcurrently(t, &wg, c, ids[6:])
			testenv.WaitFor(t, 5*time.Second, "second load done, 5 gathered", func() bool {
				return h.getUsers.Load() == 2 && inflightCalls(c) == 6 && len(c.loader.queue) == 0
			})
			release()
			wg.Wait()
			if got, want := h.batchSizes(), []int{1, minParallel, 5}; !slices.Equal(got, want) {
				t.Errorf("batch sizes = %v, want %v", got, want)
			}
		})
	}
}

// TestStalledLoadReleasesSmallBatch: a load that hangs holds up the misses
// behind it only for gatherWait, then a second load takes them.
func TestStalledLoadReleasesSmallBatch(t *testing.T) {
	h := &hookStore{Store: newSQLite(t)}
	ids := createUsers(t, h, "s", 2)
	c := newCache(t, h, Config{Mode: ModeOff, Coalesce: true, Loaders: 2, MaxBatch: 64})
	c.loader.gatherWait = 10 * time.Millisecond
	release := gateFirstLoad(t, h)
	var wg sync.WaitGroup
	readConcurrently(t, &wg, c, ids[:1])
	testenv.WaitFor(t, 5*time.Second, "first load started", func() bool { return h.getUsers.Load() == 1 })
	readConcurrently(t, &wg, c, ids[1:])
	testenv.WaitFor(t, 5*time.Second, "second load done while the first hangs", func() bool {
		return h.getUsers.Load() == 2 && inflightCalls(c) == 1
	})
	release()
	wg.Wait()
	if got, want := h.batchSizes(), []int{1, 1}; !slices.Equal(got, want) {
		t.Errorf("batch sizes = %v, want %v", got, want)
	}
}
