package mysql

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/prometheus/client_golang/prometheus"

	"userapi"
	"userapi/internal/testenv"
	"userapi/storetest"
)

// The tests that need a server run when USERAPI_TEST_MYSQL_URL is set, each
// store in a database of its own, created empty and dropped afterwards.

func TestStore(t *testing.T) {
	serverURL(t)
	storetest.Run(t, func(t *testing.T) userapi.Store { return newStore(t) })
}

func TestKeyConformance(t *testing.T) {
	serverURL(t)
	storetest.RunKeys(t, func(t *testing.T) userapi.KeyStore { return newStore(t) })
}

func TestConfig(t *testing.T) {
	tests := []struct {
		url  string
		want mysql.Config // only the fields compared below
	}{
		{
			url:  "mysql://root@127.0.0.1:3306/test",
			want: mysql.Config{User: "root", Addr: "127.0.0.1:3306", DBName: "test", Timeout: 5 * time.Second, ReadTimeout: ioTimeout},
		},
		{
			url:  "mysql://app:p%40ss:w%2Frd@db.internal/users",
			want: mysql.Config{User: "app", Passwd: "p@ss:w/rd", Addr: "db.internal:3306", DBName: "users", Timeout: 5 * time.Second, ReadTimeout: ioTimeout},
		},
		{
			url:  "mysql://root@[::1]:3307/test?timeout=1s&readTimeout=90s&parseTime=false&interpolateParams=true",
			want: mysql.Config{User: "root", Addr: "[::1]:3307", DBName: "test", Timeout: time.Second, ReadTimeout: 90 * time.Second},
		},
	}
	for _, tt := range tests {
		t.Run(tt.url, func(t *testing.T) {
			cfg, err := config(tt.url, Options{DialTimeout: 5 * time.Second, QueryTimeout: 1500 * time.Millisecond}.withDefaults())
			if err != nil {
				t.Fatal(err)
			}
			// What sql.Open receives, parsed back by the driver.
			got, err := mysql.ParseDSN(cfg.FormatDSN())
			if err != nil {
				t.Fatalf("ParseDSN(FormatDSN()): %v", err)
			}
			if got.User != tt.want.User || got.Passwd != tt.want.Passwd || got.Net != "tcp" ||
				got.Addr != tt.want.Addr || got.DBName != tt.want.DBName {
				t.Errorf("got %s:%s@%s(%s)/%s, want %s:%s@tcp(%s)/%s", got.User, got.Passwd, got.Net, got.Addr, got.DBName,
					tt.want.User, tt.want.Passwd, tt.want.Addr, tt.want.DBName)
			}
			if got.Timeout != tt.want.Timeout || got.ReadTimeout != tt.want.ReadTimeout || got.WriteTimeout != ioTimeout {
				t.Errorf("timeouts dial %v read %v write %v, want %v %v %v", got.Timeout, got.ReadTimeout, got.WriteTimeout,
					tt.want.Timeout, tt.want.ReadTimeout, ioTimeout)
			}
			if !got.ParseTime || got.Loc != time.UTC || got.InterpolateParams {
				t.Errorf("parseTime %v loc %v interpolateParams %v, want true UTC false", got.ParseTime, got.Loc, got.InterpolateParams)
			}
			if w := got.Params["innodb_lock_wait_timeout"]; w != "2" {
				t.Errorf("innodb_lock_wait_timeout = %q, want 2 (the query timeout, rounded up)", w)
			}
		})
	}
}

func TestConfigRejects(t *testing.T) {
	for _, u := range []string{
		"postgres://root@127.0.0.1:5432/test",
		"mysql://root@127.0.0.1:3306",
		"mysql://root@127.0.0.1:3306/",
		"mysql://root@127.0.0.1:3306/a/b",
		"mysql://root@127.0.0.1:3306/test?timeout=soon",
		"mysql://root:secret@127.0.0.1:bad/test",
	} {
		_, err := config(u, Options{}.withDefaults())
		if err == nil {
			t.Errorf("config(%q) = nil error, want one", u)
		} else if strings.Contains(err.Error(), "secret") {
			t.Errorf("config(%q) error %q reveals the password", u, err)
		}
	}
}

func TestViolatedKey(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{&mysql.MySQLError{Number: 1062, Message: "Duplicate entry 'a@example.com' for key 'users_email_key'"}, emailKey},
		{&mysql.MySQLError{Number: 1062, Message: "Duplicate entry 'a@example.com' for key 'users.users_email_key'"}, emailKey},
		{&mysql.MySQLError{Number: 1062, Message: "Duplicate entry 'x' for key 'users_email_key'' for key 'PRIMARY'"}, idempotencyKeyKey},
		{fmt.Errorf("wrapped: %w", &mysql.MySQLError{Number: 1062, Message: "Duplicate entry 'k' for key 'PRIMARY'"}), idempotencyKeyKey},
		{&mysql.MySQLError{Number: 1213, Message: "Deadlock found when trying to get lock"}, ""},
		{errors.New("Duplicate entry 'a' for key 'users_email_key'"), ""},
		{nil, ""},
	}
	for _, tt := range tests {
		if got := violatedKey(tt.err); got != tt.want {
			t.Errorf("violatedKey(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

func TestTranslate(t *testing.T) {
	unavailable := []error{
		context.DeadlineExceeded,
		fmt.Errorf("begin: %w", driver.ErrBadConn),
		mysql.ErrInvalidConn,
		sql.ErrConnDone,
		&net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")},
		&mysql.MySQLError{Number: 1040, Message: "Too many connections"},
		&mysql.MySQLError{Number: 1053, Message: "Server shutdown in progress"},
		&mysql.MySQLError{Number: 1213, Message: "Deadlock found"},
		&mysql.MySQLError{Number: 1205, Message: "Lock wait timeout exceeded"},
	}
	for _, err := range unavailable {
		if got := translate(err); !errors.Is(got, userapi.ErrUnavailable) || !errors.Is(got, err) {
			t.Errorf("translate(%v) = %v, want ErrUnavailable wrapping the cause", err, got)
		}
	}
	for _, err := range []error{
		userapi.ErrNotFound,
		context.Canceled,
		&mysql.MySQLError{Number: 1062, Message: "Duplicate entry"},
		&mysql.MySQLError{Number: 1146, Message: "Table 'test.users' doesn't exist"},
	} {
		if got := translate(err); got != err {
			t.Errorf("translate(%v) = %v, want it unchanged", err, got)
		}
	}
}

// TestOpenClosedPort: nothing listens, so Open must fail fast with
// ErrUnavailable rather than wait out a timeout.
func TestOpenClosedPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	start := time.Now()
	_, err = Open(context.Background(), "mysql://root@"+addr+"/test", Options{})
	if !errors.Is(err, userapi.ErrUnavailable) {
		t.Errorf("Open(closed port) error = %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Open(closed port) took %v, want a prompt failure", d)
	}
}

// TestOpenSilentServer: a server that accepts but never answers must
// become ErrUnavailable once the query timeout passes.
func TestOpenSilentServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // hold it open, say nothing
		}
	}()

	start := time.Now()
	_, err = Open(context.Background(), "mysql://root@"+ln.Addr().String()+"/test", Options{QueryTimeout: 300 * time.Millisecond})
	if !errors.Is(err, userapi.ErrUnavailable) {
		t.Errorf("Open(silent server) error = %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Open(silent server) took %v, want about the 300ms query timeout", d)
	}
}

func TestStaleSchema(t *testing.T) {
	dbURL := newDatabase(t)
	ctx := testenv.Context(t)

	_, err := Open(ctx, dbURL, Options{})
	if !errors.Is(err, userapi.ErrStaleSchema) {
		t.Fatalf("Open(empty database) error = %v, want ErrStaleSchema", err)
	}
	if err := Migrate(ctx, dbURL); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	if err := Migrate(ctx, dbURL); err != nil {
		t.Fatalf("Migrate again (nothing pending): %v", err)
	}
	s, err := Open(ctx, dbURL, Options{})
	if err != nil {
		t.Fatalf("Open(migrated): %v", err)
	}
	defer s.Close()
	if err := s.Ping(ctx); err != nil {
		t.Fatalf("Ping(migrated): %v", err)
	}

	// Forget the newest migration, as a database restored from before it
	// would: the running store must report the schema stale.
	if _, err := s.db.ExecContext(ctx, `DELETE FROM goose_db_version ORDER BY version_id DESC LIMIT 1`); err != nil {
		t.Fatal(err)
	}
	if err := s.Ping(ctx); !errors.Is(err, userapi.ErrStaleSchema) {
		t.Errorf("Ping(version row deleted) error = %v, want ErrStaleSchema", err)
	}
}

// TestConcurrentMigrate: instances starting together take turns applying
// the schema; all succeed and the schema is applied once.
func TestConcurrentMigrate(t *testing.T) {
	dbURL := newDatabase(t)
	ctx := testenv.Context(t)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range errs {
		wg.Go(func() { errs[i] = Migrate(ctx, dbURL) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Migrate %d: %v", i, err)
		}
	}
	s, err := Open(ctx, dbURL, Options{})
	if err != nil {
		t.Fatalf("Open after concurrent migrations: %v", err)
	}
	defer s.Close()
	var applied int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM goose_db_version WHERE version_id > 0`).Scan(&applied); err != nil {
		t.Fatal(err)
	}
	if want := len(s.schema.ListSources()); applied != want {
		t.Errorf("%d migrations recorded, want %d", applied, want)
	}
}

// TestDatabaseGoesAway: once the server cannot be reached, every call
// fails promptly with ErrUnavailable.
func TestDatabaseGoesAway(t *testing.T) {
	dbURL := newDatabase(t)
	ctx := testenv.Context(t)
	if err := Migrate(ctx, dbURL); err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	p := startProxy(t, u.Host)
	u.Host = p.addr()
	s, err := Open(ctx, u.String(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	created, _, err := s.CreateUser(ctx, userapi.UserCreate{Email: "a@example.com", Name: "A"})
	if err != nil {
		t.Fatal(err)
	}

	p.close()
	name := "B"
	calls := map[string]func() error{
		"GetUser":   func() error { _, err := s.GetUser(ctx, created.ID); return err },
		"GetUsers":  func() error { _, err := s.GetUsers(ctx, []int64{created.ID}); return err },
		"ListUsers": func() error { _, err := s.ListUsers(ctx, userapi.UserFilter{Limit: 10}); return err },
		"CreateUser": func() error {
			_, _, err := s.CreateUser(ctx, userapi.UserCreate{Email: "b@example.com", Name: "B"})
			return err
		},
		"UpdateUser": func() error { _, err := s.UpdateUser(ctx, created.ID, userapi.UserUpdate{Name: &name}); return err },
		"DeleteUser": func() error { return s.DeleteUser(ctx, created.ID, 1) },
		"SeedUsers":  func() error { return s.SeedUsers(ctx, 1, 10, nil) },
		"Ping":       func() error { return s.Ping(ctx) },
	}
	for name, call := range calls {
		start := time.Now()
		err := call()
		t.Logf("%s: %v", name, err)
		if !errors.Is(err, userapi.ErrUnavailable) {
			t.Errorf("%s with the database gone: error = %v, want ErrUnavailable", name, err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("%s with the database gone took %v, want a prompt failure", name, d)
		}
	}
}

func TestSeed(t *testing.T) {
	s := newStore(t)
	ctx := testenv.Context(t)
	const n = 20_000
	var reports []int
	if err := s.SeedUsers(ctx, 1, n, func(done int) { reports = append(reports, done) }); err != nil {
		t.Fatalf("SeedUsers(%d): %v", n, err)
	}
	// A second, uneven range: several statements and a partial one.
	if err := s.SeedUsers(ctx, n+1, 4321, nil); err != nil {
		t.Fatalf("SeedUsers(4321 more): %v", err)
	}
	if len(reports) == 0 || reports[len(reports)-1] != n {
		t.Errorf("progress reports %v, want the last to be %d", reports, n)
	}

	var count, emails, minVersion, maxVersion int
	err := s.db.QueryRowContext(ctx, `
		SELECT
			COUNT(*),
			COUNT(DISTINCT email),
			MIN(version),
			MAX(version)
		FROM users`).Scan(&count, &emails, &minVersion, &maxVersion)
	if err != nil {
		t.Fatal(err)
	}
	if want := n + 4321; count != want || emails != want || minVersion != 1 || maxVersion != 1 {
		t.Errorf("seeded %d users, %d emails, versions %d..%d; want %d, %d, 1..1", count, emails, minVersion, maxVersion, want, want)
	}
	for _, i := range []int{1, 2000, 2001, 19_999, 20_000, 24_321} {
		email, name := userapi.SeedUser(i)
		page, err := s.ListUsers(ctx, userapi.UserFilter{Email: email, Limit: 2})
		if err != nil || len(page) != 1 || page[0].Name != name || !page[0].CreatedAt.Equal(page[0].UpdatedAt) {
			t.Errorf("seed user %d = %v, %v; want one named %q", i, page, err, name)
		}
	}

	if err := s.SeedUsers(ctx, 5, 10, nil); !errors.Is(err, userapi.ErrEmailTaken) {
		t.Errorf("SeedUsers(already seeded range) error = %v, want ErrEmailTaken", err)
	}
}

// TestConcurrentIfVersion: writers race to update from each version in
// turn; exactly one wins per version and the others are told it moved on.
func TestConcurrentIfVersion(t *testing.T) {
	s := newStore(t)
	ctx := testenv.Context(t)
	u, _, err := s.CreateUser(ctx, userapi.UserCreate{Email: "race@example.com", Name: "Race"})
	if err != nil {
		t.Fatal(err)
	}
	const writers = 6
	for version := int64(1); version <= 4; version++ {
		results := make([]*userapi.User, writers)
		errs := make([]error, writers)
		var wg sync.WaitGroup
		for w := range writers {
			wg.Go(func() {
				name := fmt.Sprintf("v%d-w%d", version, w)
				results[w], errs[w] = s.UpdateUser(ctx, u.ID, userapi.UserUpdate{Name: &name, IfVersion: version})
			})
		}
		wg.Wait()
		winners := 0
		for w := range writers {
			switch {
			case errs[w] == nil:
				winners++
				if results[w].Version != version+1 {
					t.Errorf("version %d: winner got version %d, want %d", version, results[w].Version, version+1)
				}
			case !errors.Is(errs[w], userapi.ErrVersionMismatch):
				t.Errorf("version %d: writer %d error = %v, want ErrVersionMismatch", version, w, errs[w])
			}
		}
		if winners != 1 {
			t.Fatalf("version %d: %d writers won, want exactly 1", version, winners)
		}
	}
	got, err := s.GetUser(ctx, u.ID)
	if err != nil || got.Version != 5 {
		t.Errorf("after 4 rounds: %+v, %v; want version 5", got, err)
	}
}

// TestTxRetry: a transaction InnoDB rolled back for a deadlock runs again,
// a bounded number of times, and then reports ErrUnavailable.
func TestTxRetry(t *testing.T) {
	s := newStore(t)
	ctx := testenv.Context(t)
	deadlock := &mysql.MySQLError{Number: 1213, Message: "Deadlock found when trying to get lock; try restarting transaction"}

	attempts := 0
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		attempts++
		if attempts < maxTxAttempts {
			return deadlock
		}
		_, err := tx.ExecContext(ctx, `
			INSERT INTO users (
				email,
				name,
				created_at,
				updated_at,
				version
			) VALUES ('t@example.com', 'T', NOW(6), NOW(6), 1)`)
		return err
	})
	if err != nil || attempts != maxTxAttempts {
		t.Errorf("inTx(deadlock, deadlock, ok) = %v after %d attempts, want success after %d", err, attempts, maxTxAttempts)
	}
	if page, err := s.ListUsers(ctx, userapi.UserFilter{Limit: 10}); err != nil || len(page) != 1 {
		t.Errorf("after the retried transaction: %d users, %v; want its one insert committed", len(page), err)
	}

	attempts = 0
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		attempts++
		return deadlock
	})
	if attempts != maxTxAttempts || !errors.Is(translate(err), userapi.ErrUnavailable) {
		t.Errorf("inTx(always deadlock) = %v after %d attempts, want ErrUnavailable after %d", err, attempts, maxTxAttempts)
	}

	attempts = 0
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		attempts++
		return userapi.ErrVersionMismatch
	})
	if attempts != 1 || !errors.Is(err, userapi.ErrVersionMismatch) {
		t.Errorf("inTx(version mismatch) = %v after %d attempts, want it returned after 1", err, attempts)
	}
}

func TestMetrics(t *testing.T) {
	s := newStore(t)
	if _, err := s.GetUser(testenv.Context(t), 1); !errors.Is(err, userapi.ErrNotFound) {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	s.RegisterMetrics(reg)
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			got[f.GetName()] += m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	for _, name := range []string{
		"userapi_db_pool_max_conns",
		"userapi_db_pool_total_conns",
		"userapi_db_pool_acquired_conns",
		"userapi_db_pool_idle_conns",
		"userapi_db_pool_waits_total",
		"userapi_db_pool_wait_seconds_total",
		"userapi_db_pool_closed_total",
	} {
		if _, ok := got[name]; !ok {
			t.Errorf("metric %s not exported", name)
		}
	}
	if got["userapi_db_pool_max_conns"] != DefaultMaxConns || got["userapi_db_pool_idle_conns"] < 1 {
		t.Errorf("max_conns %v idle_conns %v; want %d and at least 1 after a call",
			got["userapi_db_pool_max_conns"], got["userapi_db_pool_idle_conns"], DefaultMaxConns)
	}
}

// TestNoPool: no connection is kept between calls, so each call dials
// (the benchmark's connection-per-request step).
func TestNoPool(t *testing.T) {
	dbURL := newDatabase(t)
	ctx := testenv.Context(t)
	s, err := Open(ctx, dbURL, Options{Migrate: true, NoPool: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for range 3 {
		if _, err := s.GetUser(ctx, 1); !errors.Is(err, userapi.ErrNotFound) {
			t.Fatal(err)
		}
	}
	if st := s.db.Stats(); st.Idle != 0 || st.OpenConnections != 0 || st.MaxIdleClosed < 3 {
		t.Errorf("stats %+v; want no idle or open connections and every one closed after use", st)
	}
}

// TestKeptStatements: a statement is prepared the first time it runs on a
// connection and only executed after that, in transactions too, and
// GetUsers pads its ids to a power of two, so batches of 3 and 4 ids share
// one statement and the repeated ids add no rows. One connection: its
// session counters are ours, and a transaction that needed a second
// connection to prepare a statement would wait until its deadline.
func TestKeptStatements(t *testing.T) {
	dbURL := newDatabase(t)
	ctx := testenv.Context(t)
	s, err := Open(ctx, dbURL, Options{Migrate: true, MaxConns: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var ids []int64
	for i := range 5 {
		u, _, err := s.CreateUser(ctx, userapi.UserCreate{Email: fmt.Sprintf("kept%d@example.com", i), Name: "Kept"})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, u.ID)
	}
	prepares := func() int {
		t.Helper()
		var name string
		var n int
		if err := s.db.QueryRowContext(ctx, "SHOW SESSION STATUS LIKE 'Com_stmt_prepare'").Scan(&name, &n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	reads := func() {
		t.Helper()
		if u, err := s.GetUser(ctx, ids[0]); err != nil || u.ID != ids[0] {
			t.Fatalf("GetUser: %v, %v", u, err)
		}
		for _, n := range []int{3, 4, 5} {
			users, err := s.GetUsers(ctx, ids[:n])
			if err != nil {
				t.Fatal(err)
			}
			got := map[int64]bool{}
			for _, u := range users {
				got[u.ID] = true
			}
			if len(users) != n || len(got) != n {
				t.Fatalf("GetUsers(%d ids) = %d users (%d distinct), want %d", n, len(users), len(got), n)
			}
		}
	}
	round := 0
	writes := func() {
		t.Helper()
		round++
		u, _, err := s.CreateUser(ctx, userapi.UserCreate{
			Email:          fmt.Sprintf("round%d@example.com", round),
			Name:           "Round",
			IdempotencyKey: fmt.Sprintf("round-%d", round),
		})
		if err != nil {
			t.Fatal(err)
		}
		name := "Renamed"
		if u, err = s.UpdateUser(ctx, u.ID, userapi.UserUpdate{Name: &name, IfVersion: 1}); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteUser(ctx, u.ID, u.Version); err != nil {
			t.Fatal(err)
		}
	}

	before := prepares()
	reads() // GetUser, then GetUsers padded to 4, 4 and 8 ids
	if n := prepares() - before; n != 3 {
		t.Errorf("first reads prepared %d statements, want 3 (GetUser, 4 ids, 8 ids)", n)
	}
	writes() // keeps the replay lookup; the transactions' statements are kept since the first create
	before = prepares()
	for range 3 {
		reads()
		writes()
	}
	if n := prepares() - before; n != 0 {
		t.Errorf("repeated reads and writes prepared %d statements, want 0", n)
	}
}

// newStore returns a migrated store over a database of its own.
func newStore(t *testing.T) *Store {
	t.Helper()
	s, err := Open(testenv.Context(t), newDatabase(t), Options{Migrate: true})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// newDatabase creates an empty database on the server at
// USERAPI_TEST_MYSQL_URL, dropped when the test ends, and returns its URL.
func newDatabase(t *testing.T) string {
	t.Helper()
	u, _ := testenv.MySQLDatabase(t)
	return u
}

// serverURL returns USERAPI_TEST_MYSQL_URL, or skips the test when it is
// not set.
func serverURL(t *testing.T) string {
	t.Helper()
	u := os.Getenv(testenv.MySQLEnv)
	if u == "" {
		t.Skip(testenv.MySQLEnv + " is not set; set it (e.g. mysql://root@127.0.0.1:3306/test) to run the MySQL tests")
	}
	return u
}

// proxy forwards TCP connections to target until closed, standing in for a
// database server that goes away.
type proxy struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln}
	t.Cleanup(p.close)
	go func() {
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("tcp", target)
			if err != nil {
				client.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, client, server)
			p.mu.Unlock()
			go pipe(server, client)
			go pipe(client, server)
		}
	}()
	return p
}

func pipe(dst, src net.Conn) {
	io.Copy(dst, src)
	dst.Close()
	src.Close()
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

// close stops accepting and cuts every forwarded connection.
func (p *proxy) close() {
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// TestLongUnicodeName: the longest valid name, 200 characters of 4 bytes
// each, is stored and read back as given.
func TestLongUnicodeName(t *testing.T) {
	s := newStore(t)
	ctx := testenv.Context(t)
	in := userapi.UserCreate{Email: "Émoji@Example.com", Name: strings.Repeat("😀", userapi.MaxNameRunes)}
	if err := in.Validate(); err != nil {
		t.Fatal(err)
	}
	created, _, err := s.CreateUser(ctx, in)
	if err != nil {
		t.Fatalf("CreateUser(200 four-byte characters): %v", err)
	}
	got, err := s.GetUser(ctx, created.ID)
	if err != nil || got.Name != in.Name || got.Email != "émoji@example.com" {
		t.Errorf("GetUser = %+v, %v; want the name and lower-cased email as given", got, err)
	}
}
