package cache

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/rueidis"

	"userapi"
	"userapi/internal/pgtest"
	"userapi/internal/sqlitetest"
	"userapi/internal/testenv"
	"userapi/postgres"
)

// newSQLite opens a fresh, migrated SQLite store in a temporary directory.
func newSQLite(tb testing.TB) userapi.Store {
	tb.Helper()
	s, _ := sqlitetest.Open(tb)
	return s
}

// postgresURL returns $USERAPI_TEST_POSTGRES_URL, or "" when unset.
func postgresURL() string { return os.Getenv(pgtest.Env) }

// newPostgres opens a store on a schema of its own (dropped at cleanup) on
// the server at $USERAPI_TEST_POSTGRES_URL. A schema is much cheaper to
// create than a database, and as private.
func newPostgres(tb testing.TB) userapi.Store {
	tb.Helper()
	return newPostgresVia(tb, "", postgres.Options{MaxConns: 8})
}

// newPostgresVia is newPostgres connecting through hostport (a fault
// proxy) when it is not empty.
func newPostgresVia(tb testing.TB, hostport string, opts postgres.Options) userapi.Store {
	tb.Helper()
	u, err := url.Parse(pgtest.Schema(tb))
	if err != nil {
		tb.Fatal(err)
	}
	if hostport != "" {
		u.Host = hostport
	}
	opts.Migrate = true
	s, err := postgres.Open(testenv.Context(tb), u.String(), opts)
	if err != nil {
		tb.Fatalf("postgres.Open: %v", err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

// redisURL returns $USERAPI_TEST_REDIS_URL, or "" when unset.
func redisURL() string { return os.Getenv(testenv.RedisEnv) }

// needRedis skips when no Redis is configured and fails when one is
// configured but unreachable.
func needRedis(tb testing.TB) string {
	tb.Helper()
	u := redisURL()
	if u == "" {
		tb.Skipf("%s is not set; set it (e.g. redis://127.0.0.1:6379/0) to run the Redis tests", testenv.RedisEnv)
	}
	opt, err := rueidis.ParseURL(u)
	if err != nil {
		tb.Fatalf("%s: %v", testenv.RedisEnv, err)
	}
	c, err := rueidis.NewClient(opt)
	if err != nil {
		tb.Fatalf("%s=%s is set but unreachable: %v", testenv.RedisEnv, u, err)
	}
	c.Close()
	return u
}

// testPrefix is a Redis key prefix no other test run uses.
func testPrefix() string { return fmt.Sprintf("userapi-test:%016x:", rand.Uint64()) }

// newCache makes a cache over store, closed at cleanup. The config's key
// prefix and Redis URL are filled in when empty.
func newCache(tb testing.TB, store userapi.Store, cfg Config) *Store {
	tb.Helper()
	if cfg.KeyPrefix == "" {
		cfg.KeyPrefix = testPrefix()
	}
	if cfg.Mode.hasRedis() && cfg.RedisURL == "" && cfg.Redis == nil {
		cfg.RedisURL = needRedis(tb)
	}
	c, err := New(testenv.Context(tb), store, cfg)
	if err != nil {
		tb.Fatalf("cache.New: %v", err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// hookStore wraps a store, counts its reads, and lets a test intercept
// them.
type hookStore struct {
	userapi.Store
	getUser, getUsers atomic.Int64
	mu                sync.Mutex
	batches           []int // sizes of GetUsers calls
	// afterRead, when set, runs after the underlying read returned and
	// before the result goes back to the cache; it may block or change the
	// result.
	afterRead func(ids []int64, users []*userapi.User, err error) ([]*userapi.User, error)
	down      atomic.Bool // every call fails with ErrUnavailable
}

func (h *hookStore) reads() int64 { return h.getUser.Load() + h.getUsers.Load() }

func (h *hookStore) hook() func([]int64, []*userapi.User, error) ([]*userapi.User, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.afterRead
}

func (h *hookStore) setHook(f func([]int64, []*userapi.User, error) ([]*userapi.User, error)) {
	h.mu.Lock()
	h.afterRead = f
	h.mu.Unlock()
}

var errDown = fmt.Errorf("%w: database down (test)", userapi.ErrUnavailable)

func (h *hookStore) GetUser(ctx context.Context, id int64) (*userapi.User, error) {
	h.getUser.Add(1)
	if h.down.Load() {
		return nil, errDown
	}
	u, err := h.Store.GetUser(ctx, id)
	if f := h.hook(); f != nil {
		var us []*userapi.User
		if u != nil {
			us = []*userapi.User{u}
		}
		if errors.Is(err, userapi.ErrNotFound) {
			err = nil
		}
		us, err = f([]int64{id}, us, err)
		if err == nil && len(us) == 0 {
			return nil, userapi.ErrNotFound
		}
		if err != nil {
			return nil, err
		}
		return us[0], nil
	}
	return u, err
}

func (h *hookStore) GetUsers(ctx context.Context, ids []int64) ([]*userapi.User, error) {
	h.getUsers.Add(1)
	h.mu.Lock()
	h.batches = append(h.batches, len(ids))
	h.mu.Unlock()
	if h.down.Load() {
		return nil, errDown
	}
	us, err := h.Store.GetUsers(ctx, ids)
	if f := h.hook(); f != nil {
		return f(ids, us, err)
	}
	return us, err
}

func (h *hookStore) batchSizes() []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]int(nil), h.batches...)
}

func (h *hookStore) CreateUser(ctx context.Context, in userapi.UserCreate) (*userapi.User, bool, error) {
	if h.down.Load() {
		return nil, false, errDown
	}
	return h.Store.CreateUser(ctx, in)
}

func (h *hookStore) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	if h.down.Load() {
		return nil, errDown
	}
	return h.Store.UpdateUser(ctx, id, upd)
}

func (h *hookStore) DeleteUser(ctx context.Context, id int64, ifVersion int64) error {
	if h.down.Load() {
		return errDown
	}
	return h.Store.DeleteUser(ctx, id, ifVersion)
}

// createUsers creates n users with emails PREFIX0@example.com, … and returns
// their ids.
func createUsers(tb testing.TB, s userapi.Store, prefix string, n int) []int64 {
	ids := make([]int64, 0, n)
	for i := range n {
		ids = append(ids, mustCreate(tb, s, fmt.Sprintf("%s%d@example.com", prefix, i)).ID)
	}
	return ids
}

func mustCreate(tb testing.TB, s userapi.Store, email string) *userapi.User {
	tb.Helper()
	in := userapi.UserCreate{Email: email, Name: "Test " + email}
	if err := in.Validate(); err != nil {
		tb.Fatal(err)
	}
	u, _, err := s.CreateUser(testenv.Context(tb), in)
	if err != nil {
		tb.Fatalf("CreateUser(%q): %v", email, err)
	}
	return u
}

func rename(tb testing.TB, s userapi.Store, id int64, name string) *userapi.User {
	tb.Helper()
	u, err := s.UpdateUser(testenv.Context(tb), id, userapi.UserUpdate{Name: &name})
	if err != nil {
		tb.Fatalf("UpdateUser(%d): %v", id, err)
	}
	return u
}

// version reads id through the cache: its version, or 0 when absent.
// gateFirstLoad makes h's first read hang until the returned release is
// called (also at cleanup, before the cache's Close waits for the load).
func gateFirstLoad(t *testing.T, h *hookStore) (release func()) {
	gate := make(chan struct{})
	release = sync.OnceFunc(func() { close(gate) })
	t.Cleanup(release)
	var loads atomic.Int32
	h.setHook(func(_ []int64, us []*userapi.User, err error) ([]*userapi.User, error) {
		if loads.Add(1) == 1 {
			<-gate
		}
		return us, err
	})
	return release
}

// inflightCalls is the number of ids being loaded or waiting for a load.
func inflightCalls(c *Store) int {
	c.loader.mu.Lock()
	defer c.loader.mu.Unlock()
	return len(c.loader.inflight)
}

// readConcurrently starts a read of each id on wg; each must find version 1.
func readConcurrently(t *testing.T, wg *sync.WaitGroup, c *Store, ids []int64) {
	for _, id := range ids {
		wg.Go(func() {
			if v := version(t, c, id); v != 1 {
				t.Errorf("user %d: version %d, want 1", id, v)
			}
		})
	}
}

func version(tb testing.TB, c *Store, id int64) int64 {
	tb.Helper()
	e, err := c.GetUserEncoded(testenv.Context(tb), id)
	if errors.Is(err, userapi.ErrNotFound) {
		return 0
	}
	if err != nil {
		tb.Fatalf("GetUserEncoded(%d): %v", id, err)
	}
	return e.Version
}

// value reads a counter or gauge.
func value(c prometheus.Collector) float64 { return testutil.ToFloat64(c) }

// startRedis starts a redis-server of the test's own (testenv.RedisServer)
// when the Redis tests are enabled.
func startRedis(tb testing.TB) *testenv.RedisServer {
	tb.Helper()
	needRedis(tb)
	return testenv.StartRedis(tb)
}

// startRedisSaving is startRedis with a data directory that survives
// restarts, so a test can SAVE a snapshot and restart Redis from it.
func startRedisSaving(tb testing.TB) *testenv.RedisServer {
	tb.Helper()
	r := startRedis(tb)
	r.Stop()
	r.Dir = tb.TempDir()
	r.Start()
	return r
}

// warmPair starts two instances with cfg over db, waits until both are
// healthy and has each read every id once (Redis and both local tiers
// then hold them).
func warmPair(t *testing.T, db userapi.Store, cfg Config, ids []int64) (a, b *Store) {
	t.Helper()
	a, b = newCache(t, db, cfg), newCache(t, db, cfg)
	testenv.WaitFor(t, 10*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	for _, id := range ids {
		version(t, a, id)
		version(t, b, id)
	}
	return a, b
}
