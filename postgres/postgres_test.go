package postgres_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"userapi"
	"userapi/internal/pgtest"
	"userapi/internal/testenv"
	"userapi/postgres"
	"userapi/storetest"
)

const envURL = pgtest.Env

// newDatabase creates an empty database of its own, dropped at cleanup,
// and returns its URL (see pgtest.Database).
func newDatabase(t testing.TB) string { return pgtest.Database(t) }

// openStore opens a store on a fresh, migrated database, closed at cleanup.
func openStore(t testing.TB, opts postgres.Options) (*postgres.Store, string) {
	t.Helper()
	dbURL := newDatabase(t)
	opts.Migrate = true
	s, err := postgres.Open(testenv.Context(t), dbURL, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, dbURL
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) userapi.Store {
		s, _ := openStore(t, postgres.Options{})
		return s
	})
}

func TestKeyConformance(t *testing.T) {
	storetest.RunKeys(t, func(t *testing.T) userapi.KeyStore {
		s, _ := openStore(t, postgres.Options{})
		return s
	})
}

// The benchmark ladder's bottom step must behave exactly like the pool.
func TestConformanceNoPool(t *testing.T) {
	storetest.Run(t, func(t *testing.T) userapi.Store {
		s, _ := openStore(t, postgres.Options{NoPool: true})
		return s
	})
}

func TestNoPoolClosesConnections(t *testing.T) {
	s, dbURL := openStore(t, postgres.Options{NoPool: true})
	ctx := testenv.Context(t)
	if s.Pool() != nil {
		t.Fatal("Pool() != nil in NoPool mode")
	}
	u, _, err := s.CreateUser(ctx, userapi.UserCreate{Email: "a@example.com", Name: "A"})
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if _, err := s.GetUser(ctx, u.ID); err != nil {
			t.Fatal(err)
		}
	}
	name := strings.TrimPrefix(mustParse(t, dbURL).Path, "/")
	waitBackends(t, name, 0)
}

func mustParse(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// waitBackends waits until database name has want client connections, or
// fails the test after a few seconds.
func waitBackends(t testing.TB, name string, want int) {
	t.Helper()
	ctx := testenv.Context(t)
	admin, err := pgx.Connect(ctx, os.Getenv(envURL))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	var n int
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = $1`, name).Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		if n == want {
			return
		}
	}
	t.Fatalf("database %s has %d connections, want %d", name, n, want)
}

func TestOpenRefusesStaleSchema(t *testing.T) {
	dbURL := newDatabase(t)
	ctx := testenv.Context(t)
	for _, noPool := range []bool{false, true} {
		_, err := postgres.Open(ctx, dbURL, postgres.Options{NoPool: noPool})
		if !errors.Is(err, userapi.ErrStaleSchema) {
			t.Fatalf("Open(NoPool=%v) on an empty database = %v, want ErrStaleSchema", noPool, err)
		}
	}
	if err := postgres.Migrate(ctx, dbURL); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	s, err := postgres.Open(ctx, dbURL, postgres.Options{})
	if err != nil {
		t.Fatalf("Open after Migrate: %v", err)
	}
	defer s.Close()
	if err := s.Ping(ctx); err != nil {
		t.Fatalf("Ping: %v", err)
	}

	// A schema rolled back under a running store makes it unready.
	if _, err := s.Pool().Exec(ctx, `DELETE FROM goose_db_version WHERE version_id > 0`); err != nil {
		t.Fatal(err)
	}
	if err := s.Ping(ctx); !errors.Is(err, userapi.ErrStaleSchema) {
		t.Fatalf("Ping after rollback = %v, want ErrStaleSchema", err)
	}
}

// silentListener accepts connections and never answers, like a host whose
// database hangs.
func silentListener(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	return ln.Addr().String()
}

// closedPort returns an address where nothing listens.
func closedPort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestOpenUnreachableIsUnavailable(t *testing.T) {
	const timeout = 300 * time.Millisecond
	tests := []struct {
		name string
		addr string
	}{
		{"refused", closedPort(t)},
		{"silent", silentListener(t)},
	}
	for _, tt := range tests {
		for _, noPool := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/NoPool=%v", tt.name, noPool), func(t *testing.T) {
				start := time.Now()
				s, err := postgres.Open(context.Background(), "postgres://postgres@"+tt.addr+"/test?sslmode=disable",
					postgres.Options{QueryTimeout: timeout, NoPool: noPool})
				if err == nil {
					s.Close()
				}
				if !errors.Is(err, userapi.ErrUnavailable) {
					t.Fatalf("Open = %v, want ErrUnavailable", err)
				}
				// Open tries the connection a few times (goose's checks), each
				// bounded by the connect timeout.
				if el := time.Since(start); el > 10*timeout {
					t.Errorf("Open took %v, want about %v", el, timeout)
				}
			})
		}
	}
}

// A database that goes away under a running store turns calls into
// ErrUnavailable, and the pool recovers when it is back.
func TestTerminatedConnectionsAreUnavailable(t *testing.T) {
	s, dbURL := openStore(t, postgres.Options{MaxConns: 2})
	ctx := testenv.Context(t)
	u, _, err := s.CreateUser(ctx, userapi.UserCreate{Email: "a@example.com", Name: "A"})
	if err != nil {
		t.Fatal(err)
	}
	name := strings.TrimPrefix(mustParse(t, dbURL).Path, "/")
	admin, err := pgx.Connect(ctx, os.Getenv(envURL))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1`, name); err != nil {
		t.Fatal(err)
	}
	waitBackends(t, name, 0)

	if _, err := s.GetUser(ctx, u.ID); !errors.Is(err, userapi.ErrUnavailable) {
		t.Fatalf("GetUser on a terminated connection = %v, want ErrUnavailable", err)
	}
	if _, err := s.GetUser(ctx, u.ID); err != nil {
		t.Fatalf("GetUser after the pool replaced its connection = %v", err)
	}
}

func TestAcquireTimeoutIsUnavailable(t *testing.T) {
	tests := []struct {
		name string
		opts postgres.Options
		wait time.Duration
	}{
		{"AcquireTimeout", postgres.Options{AcquireTimeout: 100 * time.Millisecond}, 100 * time.Millisecond},
		{"default: QueryTimeout", postgres.Options{QueryTimeout: 150 * time.Millisecond}, 150 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.MaxConns = 1
			s, _ := openStore(t, tt.opts)
			ctx := testenv.Context(t)
			held, err := s.Pool().Acquire(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer held.Release()

			start := time.Now()
			_, err = s.GetUser(ctx, 1)
			if !errors.Is(err, userapi.ErrUnavailable) {
				t.Fatalf("GetUser with the pool exhausted = %v, want ErrUnavailable", err)
			}
			if el := time.Since(start); el < tt.wait || el > tt.wait+time.Second {
				t.Errorf("GetUser waited %v, want about %v", el, tt.wait)
			}
		})
	}
}

// A query that outlives QueryTimeout fails with ErrUnavailable within about
// the timeout, is canceled on the server (its backend stops waiting), and
// the store recovers.
func TestQueryTimeoutIsUnavailable(t *testing.T) {
	const timeout = 200 * time.Millisecond
	s, dbURL := openStore(t, postgres.Options{MaxConns: 1, QueryTimeout: timeout})
	ctx := testenv.Context(t)
	u, _, err := s.CreateUser(ctx, userapi.UserCreate{Email: "a@example.com", Name: "A"})
	if err != nil {
		t.Fatal(err)
	}

	// Lock the table from another connection so the read waits past its
	// deadline.
	admin, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	tx, err := admin.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `LOCK TABLE users IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	if _, err := s.GetUser(ctx, u.ID); !errors.Is(err, userapi.ErrUnavailable) {
		t.Fatalf("GetUser behind a lock = %v, want ErrUnavailable", err)
	}
	if el := time.Since(start); el > timeout+time.Second {
		t.Errorf("GetUser took %v, want about %v", el, timeout)
	}
	// pgx closes a connection whose deadline passed and sends the server a
	// cancel request, so the abandoned query stops waiting soon.
	var waiting int
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		err = admin.QueryRow(ctx, `
SELECT count(*)
FROM pg_stat_activity
WHERE datname = current_database()
	AND wait_event_type = 'Lock'`).Scan(&waiting)
		if err != nil {
			t.Fatal(err)
		}
		if waiting == 0 {
			break
		}
	}
	if waiting != 0 {
		t.Errorf("%d backends still wait for the lock after the call timed out", waiting)
	}

	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetUser(ctx, u.ID); err != nil {
		t.Fatalf("GetUser after the lock was released: %v", err)
	}
}

func TestSeedUsers(t *testing.T) {
	const n = 20_000
	s, _ := openStore(t, postgres.Options{})
	ctx := testenv.Context(t)
	var calls []int
	if err := s.SeedUsers(ctx, 1, n, func(done int) { calls = append(calls, done) }); err != nil {
		t.Fatalf("SeedUsers: %v", err)
	}
	if len(calls) == 0 || calls[len(calls)-1] != n {
		t.Errorf("progress calls = %v, want them to end with %d", calls, n)
	}

	var count, maxID int64
	var reltuples float64
	err := s.Pool().QueryRow(ctx, `
SELECT
	count(*),
	max(id),
	(SELECT reltuples FROM pg_class WHERE relname = 'users')
FROM users`).Scan(&count, &maxID, &reltuples)
	if err != nil {
		t.Fatal(err)
	}
	if count != n || maxID != n {
		t.Errorf("after seeding: count %d, max id %d, want %d and %d", count, maxID, n, n)
	}
	if reltuples != n {
		t.Errorf("pg_class.reltuples = %v, want %d (ANALYZE after seeding)", reltuples, n)
	}

	// User i has id i.
	got, err := s.GetUser(ctx, 12345)
	if err != nil {
		t.Fatal(err)
	}
	email, name := userapi.SeedUser(12345)
	if got.Email != email || got.Name != name || got.Version != 1 {
		t.Errorf("GetUser(12345) = %+v, want %s, %s, version 1", got, email, name)
	}

	u, _, err := s.CreateUser(ctx, userapi.UserCreate{Email: "new@example.com", Name: "New"})
	if err != nil {
		t.Fatalf("CreateUser after seeding: %v", err)
	}
	if u.ID <= n {
		t.Errorf("CreateUser after seeding got id %d, want > %d", u.ID, n)
	}

	// Seeding users that exist fails and reports the conflict.
	if err := s.SeedUsers(ctx, n, 10, nil); err == nil {
		t.Error("seeding an existing user succeeded")
	}
}

func TestRegisterMetrics(t *testing.T) {
	s, _ := openStore(t, postgres.Options{MaxConns: 3})
	reg := prometheus.NewRegistry()
	s.RegisterMetrics(reg)
	for range 4 {
		if _, err := s.GetUser(testenv.Context(t), 1); !errors.Is(err, userapi.ErrNotFound) {
			t.Fatal(err)
		}
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		m := f.GetMetric()[0]
		switch {
		case m.GetGauge() != nil:
			got[f.GetName()] = m.GetGauge().GetValue()
		case m.GetCounter() != nil:
			got[f.GetName()] = m.GetCounter().GetValue()
		}
	}
	if got["userapi_db_pool_max_conns"] != 3 {
		t.Errorf("max_conns = %v, want 3", got["userapi_db_pool_max_conns"])
	}
	if got["userapi_db_pool_acquires_total"] < 4 {
		t.Errorf("acquires_total = %v, want >= 4", got["userapi_db_pool_acquires_total"])
	}
	if got["userapi_db_pool_acquired_conns"] != 0 || got["userapi_db_pool_total_conns"] < 1 {
		t.Errorf("acquired %v, total %v, want 0 and >= 1", got["userapi_db_pool_acquired_conns"], got["userapi_db_pool_total_conns"])
	}
	for _, name := range []string{"idle_conns", "waits_total", "wait_seconds_total",
		"acquire_duration_seconds_total", "canceled_acquires_total"} {
		if _, ok := got["userapi_db_pool_"+name]; !ok {
			t.Errorf("metric userapi_db_pool_%s missing", name)
		}
	}
}

// BenchmarkGetUser measures the hot read path: one pooled point read on a
// prepared statement, scanned into a User.
func BenchmarkGetUser(b *testing.B) {
	const n = 10_000
	s, _ := openStore(b, postgres.Options{})
	ctx := testenv.Context(b)
	if err := s.SeedUsers(ctx, 1, n, nil); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if _, err := s.GetUser(ctx, int64(i%n)+1); err != nil {
			b.Fatal(err)
		}
	}
}

// TestConformanceThroughPgBouncer: the store behind PgBouncer in transaction
// mode, where consecutive statements of one connection may run on different
// server connections and named prepared statements do not survive, with
// migrations applied on the server itself (DirectURL).
func TestConformanceThroughPgBouncer(t *testing.T) {
	storetest.Run(t, func(t *testing.T) userapi.Store {
		direct := newDatabase(t)
		s, err := postgres.Open(testenv.Context(t), pgtest.Bouncer(t, direct), postgres.Options{Migrate: true, DirectURL: direct})
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	})
}
