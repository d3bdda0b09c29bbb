package sqlite

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"userapi"
	"userapi/internal/testenv"
	"userapi/storetest"
)

// newStore opens a migrated store on a new file in a temporary directory.
func newStore(tb testing.TB, opts Options) (*Store, string) {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "users.db")
	opts.Migrate = true
	s, err := Open(testenv.Context(tb), "sqlite:"+path, opts)
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	tb.Cleanup(func() { s.Close() })
	return s, path
}

func mustCreate(tb testing.TB, s userapi.Store, email, name string) *userapi.User {
	tb.Helper()
	u, _, err := s.CreateUser(testenv.Context(tb), userapi.UserCreate{Email: email, Name: name})
	if err != nil {
		tb.Fatalf("CreateUser(%q): %v", email, err)
	}
	return u
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) userapi.Store {
		s, _ := newStore(t, Options{})
		return s
	})
}

func TestKeyConformance(t *testing.T) {
	storetest.RunKeys(t, func(t *testing.T) userapi.KeyStore {
		s, _ := newStore(t, Options{})
		return s
	})
}

func TestParseURL(t *testing.T) {
	tests := []struct {
		url, want string
		ok        bool
	}{
		{"sqlite:userapi.db", "userapi.db", true},
		{"sqlite:/var/lib/userapi/users.db", "/var/lib/userapi/users.db", true},
		{"sqlite://data/users.db", "data/users.db", true},
		{"sqlite:///abs/users.db", "/abs/users.db", true},
		{"sqlite3:users.db", "users.db", true},
		{"file:users.db", "users.db", true},
		{"file:///abs/users.db", "/abs/users.db", true},
		{"sqlite:", "", false},
		{"sqlite::memory:", "", false},
		{"sqlite:users.db?mode=ro", "", false},
		{"postgres://localhost/db", "", false},
		{"users.db", "", false},
	}
	for _, tt := range tests {
		got, err := parseURL(tt.url)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseURL(%q) = %q, %v; want %q, ok=%v", tt.url, got, err, tt.want, tt.ok)
		}
	}
}

func TestOpenCreatesFileAndMigrates(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a", "b", "users 100%.db")
	s, err := Open(testenv.Context(t), "sqlite:"+path, Options{Migrate: true})
	if err != nil {
		t.Fatalf("Open(Migrate) on a new directory: %v", err)
	}
	defer s.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("database file not created at its path: %v", err)
	}
	if err := s.Ping(testenv.Context(t)); err != nil {
		t.Errorf("Ping after migrate: %v", err)
	}
	mustCreate(t, s, "a@example.com", "A")

	// Open again with Migrate: nothing pending, no error.
	s2, err := Open(testenv.Context(t), "sqlite:"+path, Options{Migrate: true})
	if err != nil {
		t.Fatalf("second Open(Migrate): %v", err)
	}
	s2.Close()
}

// Instances started together on a new file all migrate it at once; every
// one must succeed (goose has no lock for SQLite; up retries).
func TestConcurrentMigrate(t *testing.T) {
	const files, migrators = 6, 6
	var wg sync.WaitGroup
	errs := make(chan error, files*migrators)
	for i := range files {
		url := "sqlite:" + filepath.Join(t.TempDir(), fmt.Sprint(i, ".db"))
		for range migrators {
			wg.Go(func() {
				if err := Migrate(testenv.Context(t), url); err != nil {
					errs <- err
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent Migrate: %v", err)
	}
}

func TestPragmas(t *testing.T) {
	s, _ := newStore(t, Options{})
	tests := []struct {
		pragma string
		want   string
	}{
		{"journal_mode", "wal"},
		{"synchronous", "2"}, // FULL
		{"foreign_keys", "1"},
		{"busy_timeout", "5000"},
	}
	for _, tt := range tests {
		var got string
		if err := s.writer.QueryRowContext(testenv.Context(t), "PRAGMA "+tt.pragma).Scan(&got); err != nil {
			t.Fatalf("PRAGMA %s: %v", tt.pragma, err)
		}
		if got != tt.want {
			t.Errorf("writer PRAGMA %s = %s, want %s", tt.pragma, got, tt.want)
		}
	}
	var qo string
	if err := s.reader.QueryRowContext(testenv.Context(t), "PRAGMA query_only").Scan(&qo); err != nil || qo != "1" {
		t.Errorf("reader PRAGMA query_only = %q, %v; want 1", qo, err)
	}
	if _, err := s.reader.ExecContext(testenv.Context(t), "DELETE FROM users"); err == nil {
		t.Error("a reader connection accepted a write")
	}
}

func TestStaleSchemaRefused(t *testing.T) {
	url := "sqlite:" + filepath.Join(t.TempDir(), "users.db")
	_, err := Open(testenv.Context(t), url, Options{})
	if !errors.Is(err, userapi.ErrStaleSchema) {
		t.Fatalf("Open(fresh file, no Migrate) error = %v, want ErrStaleSchema", err)
	}

	if err := Migrate(testenv.Context(t), url); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	s, err := Open(testenv.Context(t), url, Options{})
	if err != nil {
		t.Fatalf("Open after Migrate: %v", err)
	}
	defer s.Close()

	// Roll the recorded version back, as an older schema would have it:
	// Ping must report the schema stale (and so /readyz fail).
	if _, err := s.writer.ExecContext(testenv.Context(t), `DELETE FROM goose_db_version WHERE version_id = ?`, s.schemaVersion); err != nil {
		t.Fatal(err)
	}
	if err := s.Ping(testenv.Context(t)); !errors.Is(err, userapi.ErrStaleSchema) {
		t.Errorf("Ping with a pending migration = %v, want ErrStaleSchema", err)
	}
	if _, err := Open(testenv.Context(t), url, Options{}); !errors.Is(err, userapi.ErrStaleSchema) {
		t.Errorf("Open with a pending migration = %v, want ErrStaleSchema", err)
	}
}

func TestDurableAcrossReopen(t *testing.T) {
	s, path := newStore(t, Options{})
	u := mustCreate(t, s, "d@example.com", "Durable")
	u, err := s.UpdateUser(testenv.Context(t), u.ID, userapi.UserUpdate{Name: ptr("Durable 2")})
	if err != nil {
		t.Fatal(err)
	}
	replayed, _, err := s.CreateUser(testenv.Context(t), userapi.UserCreate{Email: "k@example.com", Name: "K", IdempotencyKey: "key-1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	s2, err := Open(testenv.Context(t), "sqlite:"+path, Options{})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s2.Close()
	got, err := s2.GetUser(testenv.Context(t), u.ID)
	if err != nil {
		t.Fatalf("GetUser after reopen: %v", err)
	}
	if diff := cmp.Diff(u, got); diff != "" {
		t.Errorf("user after reopen (-before +after):\n%s", diff)
	}
	again, wasReplayed, err := s2.CreateUser(testenv.Context(t), userapi.UserCreate{Email: "k@example.com", Name: "K", IdempotencyKey: "key-1"})
	if err != nil || !wasReplayed {
		t.Fatalf("idempotent retry after reopen = %v, replayed=%v, %v", again, wasReplayed, err)
	}
	if diff := cmp.Diff(replayed, again); diff != "" {
		t.Errorf("replay after reopen (-first +replay):\n%s", diff)
	}
}

// Many goroutines write through two stores on one file, as two instances
// would: in-process writers queue for the single write connection, and the
// two processes' writers meet SQLite's lock, which the busy timeout absorbs.
// No SQLITE_BUSY may reach a caller.
func TestConcurrentWritersNoBusy(t *testing.T) {
	// A generous deadline: this test checks lock handling, not latency on a
	// shared machine.
	opts := Options{QueryTimeout: 20 * time.Second}
	a, path := newStore(t, opts)
	b, err := Open(testenv.Context(t), "sqlite:"+path, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	const goroutines, perGoroutine = 8, 20
	var wg sync.WaitGroup
	errs := make(chan error, 2*goroutines*perGoroutine)
	for i, s := range []*Store{a, b, a, b, a, b, a, b}[:goroutines] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range perGoroutine {
				ctx := testenv.Context(t)
				u, _, err := s.CreateUser(ctx, userapi.UserCreate{Email: fmt.Sprintf("w%d-%d@example.com", i, j), Name: "W"})
				if err != nil {
					errs <- err
					continue
				}
				if _, err := s.UpdateUser(ctx, u.ID, userapi.UserUpdate{Name: ptr("W2"), IfVersion: 1}); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent write: %v", err)
	}
	users, err := a.ListUsers(testenv.Context(t), userapi.UserFilter{Limit: userapi.MaxLimit})
	if err != nil {
		t.Fatal(err)
	}
	if len(users) != goroutines*perGoroutine {
		t.Errorf("%d users, want %d", len(users), goroutines*perGoroutine)
	}
	for _, u := range users {
		if u.Version != 2 || u.Name != "W2" {
			t.Errorf("user %d = version %d, name %q; want 2, W2", u.ID, u.Version, u.Name)
		}
	}
}

// A write blocked past the deadline by another holder of the write lock is
// ErrUnavailable, not a driver error.
func TestBusyIsUnavailable(t *testing.T) {
	a, path := newStore(t, Options{})
	b, err := Open(testenv.Context(t), "sqlite:"+path, Options{QueryTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	tx, err := a.writer.BeginTx(testenv.Context(t), nil) // BEGIN IMMEDIATE: holds the write lock
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	_, _, err = b.CreateUser(testenv.Context(t), userapi.UserCreate{Email: "busy@example.com", Name: "B"})
	if !errors.Is(err, userapi.ErrUnavailable) {
		t.Errorf("CreateUser while another process writes = %v, want ErrUnavailable", err)
	}
	// Reads go on while the other process holds the write lock (WAL).
	if _, err := b.ListUsers(testenv.Context(t), userapi.UserFilter{Limit: 1}); err != nil {
		t.Errorf("ListUsers while another process writes: %v", err)
	}
}

func TestGetUsersChunks(t *testing.T) {
	s, _ := newStore(t, Options{})
	if err := s.SeedUsers(testenv.Context(t), 1, 30, nil); err != nil {
		t.Fatal(err)
	}
	s.maxVars = 7 // force several IN queries
	ids := make([]int64, 0, 40)
	for id := int64(1); id <= 40; id++ { // 10 of them absent
		ids = append(ids, id)
	}
	users, err := s.GetUsers(testenv.Context(t), ids)
	if err != nil {
		t.Fatal(err)
	}
	if len(users) != 30 {
		t.Fatalf("GetUsers(1..40) = %d users, want 30", len(users))
	}
	for i, u := range users {
		if u.ID != int64(i+1) {
			t.Errorf("users[%d].ID = %d, want %d", i, u.ID, i+1)
		}
	}
	if users, err := s.GetUsers(testenv.Context(t), nil); err != nil || len(users) != 0 {
		t.Errorf("GetUsers(nil) = %v, %v; want none", users, err)
	}
}

func TestIDsNotReused(t *testing.T) {
	s, _ := newStore(t, Options{})
	u := mustCreate(t, s, "first@example.com", "First")
	if err := s.DeleteUser(testenv.Context(t), u.ID, 0); err != nil {
		t.Fatal(err)
	}
	u2 := mustCreate(t, s, "second@example.com", "Second")
	if u2.ID <= u.ID {
		t.Errorf("id after deleting the newest = %d, want > %d", u2.ID, u.ID)
	}
}

func TestRegisterMetrics(t *testing.T) {
	s, _ := newStore(t, Options{MaxConns: 3})
	reg := prometheus.NewPedanticRegistry()
	s.RegisterMetrics(reg)
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{} // "name pool" → value
	backlog := false
	for _, f := range families {
		if f.GetName() == "userapi_change_stream_backlog_rows" {
			backlog = true
			continue
		}
		for _, m := range f.GetMetric() {
			if len(m.GetLabel()) == 0 || m.GetLabel()[0].GetName() != "pool" {
				t.Fatalf("%s labels = %v, want pool first", f.GetName(), m.GetLabel())
			}
			got[f.GetName()+" "+m.GetLabel()[0].GetValue()] += m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	if !backlog {
		t.Error("no userapi_change_stream_backlog_rows")
	}
	if len(got) != 14 {
		t.Errorf("gathered %d metric × pool pairs, want 7 metrics × 2 pools: %v", len(got), got)
	}
	for key, want := range map[string]float64{
		"userapi_db_pool_max_conns writer":   1,
		"userapi_db_pool_max_conns reader":   3,
		"userapi_db_pool_total_conns writer": 1,
	} {
		if got[key] != want {
			t.Errorf("%s = %v, want %v", key, got[key], want)
		}
	}
}

func BenchmarkGetUser(b *testing.B) {
	s, _ := newStore(b, Options{})
	const users = 1000
	if err := s.SeedUsers(testenv.Context(b), 1, users, nil); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		id := int64(0)
		for pb.Next() {
			id = id%users + 1
			if _, err := s.GetUser(ctx, id); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func ptr(s string) *string { return &s }
