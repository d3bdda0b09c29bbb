package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"userapi/internal/pgtest"
	"userapi/internal/testenv"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"
)

// repoRoot is the module root: tests run in the package directory.
const repoRoot = ".."

// The userapi binary is built once per test binary run and shared by the
// tests (scripts/cluster --bin); TestMain removes it.
var (
	buildOnce sync.Once
	buildDir  string
	buildBin  string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// userapiBinary builds ./cmd/userapi once.
func userapiBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "userapi-cluster-bin-")
		if buildErr != nil {
			return
		}
		buildBin = filepath.Join(buildDir, "userapi")
		cmd := exec.Command(goTool(), "build", "-o", buildBin, "./cmd/userapi")
		cmd.Dir = repoRoot
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/userapi: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildBin
}

// serverURLs returns the test servers' URLs, skipping the test when they
// are not configured.
func serverURLs(t *testing.T) (pgURL, redisURL string) {
	t.Helper()
	pgURL = os.Getenv("USERAPI_TEST_POSTGRES_URL")
	redisURL = os.Getenv("USERAPI_TEST_REDIS_URL")
	if pgURL == "" || redisURL == "" {
		t.Skip("set USERAPI_TEST_POSTGRES_URL and USERAPI_TEST_REDIS_URL to run the cluster tests")
	}
	return pgURL, redisURL
}

// freshDatabase creates a PostgreSQL database of the test's own next to
// the one pgURL names, drops it when the test ends, and returns its URL and
// a pool on it for checking the rows.
func freshDatabase(t *testing.T, pgURL string) (string, *pgxpool.Pool) {
	t.Helper()
	dbURL := pgtest.Database(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		t.Fatalf("open %s: %v", dbURL, err)
	}
	t.Cleanup(pool.Close)
	return dbURL, pool
}

// startRedis checks that the configured Redis answers, then starts a
// redis-server of the test's own on a free loopback port and returns its
// URL. The service has no key prefix option, and its cache invalidation
// messages and client-side-caching invalidations are per server, not per
// database number, so only a server of its own isolates a test run.
func startRedis(t *testing.T, configured string) string {
	t.Helper()
	if err := pingRedis(configured, 5*time.Second); err != nil {
		t.Fatalf("USERAPI_TEST_REDIS_URL is set but Redis is unreachable: %v", err)
	}
	return testenv.StartRedis(t).URL()
}

// pingRedis retries PING until it succeeds or timeout passes.
func pingRedis(redisURL string, timeout time.Duration) error {
	opt, err := rueidis.ParseURL(redisURL)
	if err != nil {
		return err
	}
	opt.DisableCache = true
	deadline := time.Now().Add(timeout)
	for {
		c, err := rueidis.NewClient(opt)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			err = c.Do(ctx, c.B().Ping().Build()).Error()
			cancel()
			c.Close()
			if err == nil {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// freePorts returns n loopback ports that were free a moment ago.
func freePorts(t *testing.T, n int) []int { return testenv.FreePorts(t, n) }

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// cluster is one scripts/cluster run: N instances behind nginx.
type cluster struct {
	t          *testing.T
	dir        string
	url        string   // nginx
	addrs      []string // instance i+1 listens on addrs[i]
	debugAddrs []string
	db         *pgxpool.Pool
	key        string // the API key scripts/cluster up made
}

// startCluster brings up n instances with the tiered cache over a fresh
// database and Redis, behind nginx, and stops them when the test ends.
// serveFlags are passed to every `userapi serve`.
func startCluster(t *testing.T, n int, serveFlags ...string) *cluster {
	t.Helper()
	return startClusterWith(t, n, nil, serveFlags...)
}

// startClusterWith is startCluster with scriptFlags added to `scripts/cluster
// up`. Rate limits are on, with a budget (100,000 requests a second from
// one address) above what the load tests send through nginx from 127.0.0.1,
// unless serveFlags set their own.
func startClusterWith(t *testing.T, n int, scriptFlags []string, serveFlags ...string) *cluster {
	t.Helper()
	return startClusterOn(t, n, "", scriptFlags, serveFlags...)
}

// startClusterOn is startClusterWith over the Redis at redis (a cluster or
// a Sentinel set of the test's own), or over a redis-server of its own
// when redis is empty.
func startClusterOn(t *testing.T, n int, redis string, scriptFlags []string, serveFlags ...string) *cluster {
	t.Helper()
	pgURL, redisURL := serverURLs(t)
	dbURL, pool := freshDatabase(t, pgURL)
	if redis == "" {
		redis = startRedis(t, redisURL)
	}
	bin := userapiBinary(t)
	ports := freePorts(t, 1+2*n)
	c := &cluster{
		t:   t,
		dir: t.TempDir(),
		url: fmt.Sprintf("http://127.0.0.1:%d", ports[0]),
		db:  pool,
	}
	// Each instance on a loopback address of its own (127.0.0.2, .3, …),
	// standing in for a host of its own: nginx reaches them over addresses
	// other than its own, as it would across a network.
	for i := range n {
		host := fmt.Sprintf("127.0.0.%d", 2+i)
		c.addrs = append(c.addrs, fmt.Sprintf("%s:%d", host, ports[1+i]))
		c.debugAddrs = append(c.debugAddrs, fmt.Sprintf("%s:%d", host, ports[1+n+i]))
	}
	args := []string{"up", strconv.Itoa(n),
		"--bin", bin,
		"--db", dbURL,
		"--redis", redis,
		"--cache", "tiered",
		"--port", strconv.Itoa(ports[0]),
		"--ports", strings.Join(c.addrs, ","),
		"--debug-ports", strings.Join(c.debugAddrs, ","),
	}
	if nginx := os.Getenv("USERAPI_TEST_NGINX"); nginx != "" {
		args = append(args, "--nginx", nginx)
	}
	args = append(args, scriptFlags...)
	// Debug-level request logs name each request's client address, which
	// the forwarded-header test reads; the load tests write a few thousand
	// lines, which costs little.
	args = append(args, "--", "--log-level", "debug", "--log-format", "json",
		"--rate-limit", "100000", "--rate-burst", "100000")
	args = append(args, serveFlags...)
	t.Cleanup(func() {
		if t.Failed() {
			c.dumpLogs()
		}
		if err := c.script("down"); err != nil {
			t.Errorf("scripts/cluster down: %v", err)
		}
		// down stops everything up started: nothing listens any more.
		for _, a := range append([]string{strings.TrimPrefix(c.url, "http://")}, append(c.addrs, c.debugAddrs...)...) {
			if conn, err := net.DialTimeout("tcp", a, time.Second); err == nil {
				conn.Close()
				t.Errorf("%s still accepts connections after scripts/cluster down", a)
			}
		}
	})
	if err := c.script(args...); err != nil {
		t.Fatalf("scripts/cluster up: %v", err)
	}
	key, err := os.ReadFile(filepath.Join(c.dir, "api-key"))
	if err != nil {
		t.Fatalf("scripts/cluster up wrote no api key: %v", err)
	}
	c.key = strings.TrimSpace(string(key))
	return c
}

// script runs scripts/cluster with the cluster's run directory, bounded so
// that a hung start fails the test instead of the whole run.
func (c *cluster) script(args ...string) error {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	args = append([]string{args[0], "--dir", c.dir}, args[1:]...)
	cmd := exec.CommandContext(ctx, filepath.Join(repoRoot, "scripts", "cluster"), args...)
	// The script's children get their own log files and sessions; without
	// WaitDelay an inherited pipe could keep Wait from returning.
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	out, err := cmd.CombinedOutput()
	c.t.Logf("scripts/cluster %s (%v):\n%s", strings.Join(args, " "), time.Since(start).Round(time.Millisecond), out)
	if err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

// dumpLogs logs the tail of every instance log and nginx's error log.
func (c *cluster) dumpLogs() {
	files, _ := filepath.Glob(filepath.Join(c.dir, "instance-*.log"))
	files = append(files, filepath.Join(c.dir, "nginx", "error.log"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		var keep []string
		for _, l := range lines {
			// The per-request debug lines would bury the interesting ones.
			if !strings.Contains(l, `"msg":"request"`) {
				keep = append(keep, l)
			}
		}
		if len(keep) > 40 {
			keep = keep[len(keep)-40:]
		}
		c.t.Logf("--- %s (last %d lines without request lines)\n%s", f, len(keep), strings.Join(keep, "\n"))
	}
}

// instanceURL is the base URL of instance i (from 1), bypassing nginx.
func (c *cluster) instanceURL(i int) string {
	return "http://" + c.addrs[i-1]
}

// newClient returns a keep-alive HTTP client that sends the cluster's API
// key. Its timeout is above nginx's bound on one request with its retries
// (proxy_next_upstream_timeout 10s plus one read timeout).
func (c *cluster) newClient(conns int) *http.Client {
	return &http.Client{
		Transport: bearer{c.key, &http.Transport{
			MaxIdleConnsPerHost: conns,
			IdleConnTimeout:     30 * time.Second,
			DisableCompression:  true,
		}},
		Timeout: 20 * time.Second,
	}
}

// bearer sends key as every request's credential.
type bearer struct {
	key  string
	next http.RoundTripper
}

func (b bearer) RoundTrip(req *http.Request) (*http.Response, error) {
	req = req.Clone(req.Context())
	req.Header.Set("Authorization", "Bearer "+b.key)
	return b.next.RoundTrip(req)
}

// dbUser is a users row as the checks compare it.
type dbUser struct {
	ID      int64
	Email   string
	Name    string
	Version int64
}

// dbUsers reads every row of the test's database.
func (c *cluster) dbUsers(ctx context.Context) (map[int64]dbUser, error) {
	rows, err := c.db.Query(ctx, `
		SELECT id,
		       email,
		       name,
		       version
		FROM users`)
	if err != nil {
		return nil, fmt.Errorf("select users: %w", err)
	}
	users, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (dbUser, error) {
		var u dbUser
		err := r.Scan(&u.ID, &u.Email, &u.Name, &u.Version)
		return u, err
	})
	if err != nil {
		return nil, fmt.Errorf("select users: %w", err)
	}
	m := make(map[int64]dbUser, len(users))
	for _, u := range users {
		m[u.ID] = u
	}
	return m, nil
}

// idempotencyKeys maps every stored Idempotency-Key to its user id.
func (c *cluster) idempotencyKeys(ctx context.Context) (map[string]int64, error) {
	rows, err := c.db.Query(ctx, `
		SELECT key,
		       user_id
		FROM idempotency_keys`)
	if err != nil {
		return nil, fmt.Errorf("select idempotency keys: %w", err)
	}
	m := map[string]int64{}
	var key string
	var id int64
	_, err = pgx.ForEachRow(rows, []any{&key, &id}, func() error {
		m[key] = id
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("select idempotency keys: %w", err)
	}
	return m, nil
}
