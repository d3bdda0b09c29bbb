package cache

import (
	"os"
	"sync"
	"testing"
	"time"

	"userapi"
	"userapi/internal/pgtest"
	"userapi/internal/testenv"
	"userapi/postgres"
)

// PostgreSQL behind PgBouncer in transaction mode: the cache's batched
// loads, its writes and the change stream (on the server's own address)
// work through it.

// bouncerEnabled reports whether the PgBouncer tests run.
func bouncerEnabled() bool { return os.Getenv(pgtest.BouncerEnv) != "" && postgresURL() != "" }

// newPostgresBouncer opens a store on a database of its own behind a
// PgBouncer of the test's own, migrated on the server itself.
func newPostgresBouncer(tb testing.TB) userapi.Store {
	tb.Helper()
	s, _ := openBouncer(tb, pgtest.Database(tb))
	return s
}

// openBouncer opens a store on the database at direct through a PgBouncer
// of the test's own.
func openBouncer(tb testing.TB, direct string) (*postgres.Store, string) {
	tb.Helper()
	via := pgtest.Bouncer(tb, direct)
	s, err := postgres.Open(testenv.Context(tb), via, postgres.Options{MaxConns: 8, Migrate: true, DirectURL: direct})
	if err != nil {
		tb.Fatalf("postgres.Open through PgBouncer: %v", err)
	}
	tb.Cleanup(func() { s.Close() })
	return s, via
}

// TestPgBouncerTiered: three tiered instances share a database behind
// PgBouncer. Concurrent misses are batched into multi-key queries through
// it, writes through one instance reach the others, and a write made
// outside the service reaches every instance through the change stream,
// which connects to the server itself.
func TestPgBouncerTiered(t *testing.T) {
	direct := pgtest.DatabaseOn(t, pgtest.LogicalURL(t))
	db, _ := openBouncer(t, direct)
	srv := startRedis(t)
	cfg := fastTiered(srv.URL(), testPrefix())
	cfg.Changes = db
	var inst []*Store
	for range 3 {
		inst = append(inst, newCache(t, db, cfg))
	}
	testenv.WaitFor(t, 5*time.Second, "instances healthy and streaming", func() bool {
		missed := 0.0
		for _, c := range inst {
			if !healthy(c) {
				return false
			}
			missed += value(c.m.changesMissed)
		}
		return missed > 0 // the slot is created
	})
	ids := createUsers(t, inst[0], "bouncer", 64)
	var wg sync.WaitGroup
	for _, c := range inst {
		readConcurrently(t, &wg, c, ids)
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	renamed := rename(t, inst[1], ids[0], "Through the service")
	for _, c := range inst {
		testenv.WaitFor(t, 5*time.Second, "every instance serves the service's write", func() bool {
			return version(t, c, ids[0]) == renamed.Version
		})
	}

	pgtest.Exec(t, direct, `UPDATE users SET name = 'By hand' WHERE id = $1`, ids[1])
	for _, c := range inst {
		testenv.WaitFor(t, 5*time.Second, "every instance serves the outside write", func() bool {
			return version(t, c, ids[1]) == 2
		})
	}
	for _, c := range inst {
		for _, id := range ids {
			checkTiers(t, c, db, id)
		}
	}
}
