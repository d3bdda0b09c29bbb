package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"userapi"
	"userapi/internal/testenv"
	"userapi/sqlite"
)

// startService runs `userapi serve` in-process with args and waits for
// /readyz. It returns the base URL, the log, and a stop function that
// cancels the service and returns run's error.
func startService(t *testing.T, env map[string]string, args ...string) (string, *testenv.Buffer, func() error) {
	t.Helper()
	addr := testenv.FreeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	logs := &testenv.Buffer{}
	done := make(chan error, 1)
	getenv := func(k string) string { return env[k] }
	go func() {
		done <- run(ctx, append([]string{"serve", "--addr", addr}, args...), getenv, logs, logs)
	}()
	base := "http://" + addr
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(base + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		select {
		case err := <-done:
			cancel()
			t.Fatalf("service exited before ready: %v\n%s", err, logs)
		default:
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("service not ready after 30s\n%s", logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(20 * time.Second):
				runErr = errors.New("service did not stop within 20s")
			}
		})
		return runErr
	}
	t.Cleanup(func() { stop() })
	return base, logs, stop
}

// firstKey returns the admin key the first start printed on stderr.
func firstKey(t *testing.T, logs *testenv.Buffer) string {
	t.Helper()
	key := regexp.MustCompile(`uak_[0-9]+_[0-9A-Za-z]{38}`).FindString(logs.String())
	if key == "" {
		t.Fatalf("no first api key printed:\n%s", logs)
	}
	return key
}

// do sends a request with key as its bearer credential.
func do(t *testing.T, method, url, key, body string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func TestServeSQLiteEndToEnd(t *testing.T) {
	db := "sqlite:" + filepath.Join(t.TempDir(), "e2e.db")
	base, logs, stop := startService(t, nil, "--db", db)
	key := firstKey(t, logs)
	if n := strings.Count(logs.String(), key); n != 2 {
		t.Errorf("the first key appears %d times in the output, want twice (the key and the curl line)", n)
	}

	resp := do(t, "POST", base+"/users", "", `{"email":"Ada@Example.com","name":"Ada"}`)
	resp.Body.Close()
	if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
		t.Fatalf("POST /users without a key = %d, WWW-Authenticate %q; want 401 with the header", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	resp = do(t, "POST", base+"/users", key, `{"email":"Ada@Example.com","name":"Ada"}`)
	var created struct {
		ID    int64  `json:"id"`
		Email string `json:"email"`
	}
	json.NewDecoder(resp.Body).Decode(&created)
	resp.Body.Close()
	if resp.StatusCode != 201 || created.Email != "ada@example.com" {
		t.Fatalf("POST /users = %d %+v", resp.StatusCode, created)
	}
	resp = do(t, "GET", fmt.Sprintf("%s/users/%d", base, created.ID), key, "")
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("ETag") != `"1"` || !strings.Contains(string(body), `"email":"ada@example.com"`) {
		t.Fatalf("GET = %d %s %s", resp.StatusCode, resp.Header.Get("ETag"), body)
	}
	if err := stop(); err != nil {
		t.Fatalf("serve returned %v after cancel", err)
	}
	if !strings.Contains(logs.String(), "stopped") {
		t.Errorf("no clean shutdown in the log:\n%s", logs)
	}

	// The write is durable: a new process on the same file sees it, and
	// the key still works there; no second first key is made.
	base, logs, _ = startService(t, nil, "--db", db)
	if strings.Contains(logs.String(), "uak_") {
		t.Errorf("a restart on a database with keys printed a new one:\n%s", logs)
	}
	resp = do(t, "GET", fmt.Sprintf("%s/users/%d", base, created.ID), key, "")
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("GET after restart = %d, want 200", resp.StatusCode)
	}
}

func TestServeDebugListener(t *testing.T) {
	debug := testenv.FreeAddr(t)
	db := "sqlite:" + filepath.Join(t.TempDir(), "d.db")
	base, _, _ := startService(t, nil, "--db", db, "--debug-addr", debug)
	for _, path := range []string{"/metrics", "/debug/pprof/"} {
		resp, err := http.Get("http://" + debug + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("debug %s = %d", path, resp.StatusCode)
		}
		if path == "/metrics" && !strings.Contains(string(body), "userapi_") {
			t.Errorf("debug /metrics has no userapi_ metrics")
		}
	}
	// Not public by default.
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("public /metrics = %d, want 404 unless --public-metrics", resp.StatusCode)
	}
}

// TestDebugListenerHidesSecrets checks every text the debug listener (and
// the public /metrics) serves for the passwords of URLs given as flags:
// /debug/pprof/cmdline shows the command line with them redacted, as the
// config dump does, and nothing else carries them.
func TestDebugListenerHidesSecrets(t *testing.T) {
	debug := testenv.FreeAddr(t)
	db := "sqlite:" + filepath.Join(t.TempDir(), "s.db")
	redis := "redis://:hunter2@127.0.0.1:1/0"
	args := []string{"--db", db, "--debug-addr", debug, "--public-metrics", "--redis", redis, "--redis-prefix=x", "--log-level=debug"}
	// The handler shows this process's command line: make it the one a
	// real `userapi serve` would have.
	saved := os.Args
	os.Args = append([]string{"userapi", "serve", "--redis=" + redis, "--addr", "127.0.0.1:0"}, args...)
	t.Cleanup(func() { os.Args = saved })
	base, _, _ := startService(t, map[string]string{"USERAPI_DB": "postgres://u:hunter3@127.0.0.1:1/x"}, args...)

	get := func(url string) (int, string) {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	status, cmdline := get("http://" + debug + "/debug/pprof/cmdline")
	want := "userapi\x00serve\x00--redis=redis://:xxxxx@127.0.0.1:1/0\x00--addr\x00127.0.0.1:0\x00--db\x00" + db
	if status != 200 || !strings.HasPrefix(cmdline, want) || !strings.Contains(cmdline, "\x00--redis\x00redis://:xxxxx@127.0.0.1:1/0\x00") {
		t.Errorf("cmdline = %d %q, want the command line with the password redacted, starting %q", status, cmdline, want)
	}
	for _, url := range []string{
		"http://" + debug + "/debug/pprof/",
		"http://" + debug + "/debug/pprof/goroutine?debug=2",
		"http://" + debug + "/debug/vars",
		"http://" + debug + "/metrics",
		base + "/metrics",
	} {
		if _, body := get(url); strings.Contains(body, "hunter") {
			i := strings.Index(body, "hunter")
			t.Errorf("%s shows a password: …%s…", url, body[max(0, i-100):min(len(body), i+20)])
		}
	}
}

func TestEnvAndFlags(t *testing.T) {
	env := map[string]string{"USERAPI_POOL_SIZE": "7", "USERAPI_CACHE": "off", "USERAPI_DB": "sqlite:env.db"}
	var c config
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	c.serveFlags(fs)
	if err := parse(fs, []string{"--cache", "tiered"}, func(k string) string { return env[k] }); err != nil {
		t.Fatal(err)
	}
	if c.PoolSize != 7 || c.Cache != "tiered" || c.DB != "sqlite:env.db" {
		t.Errorf("got pool=%d cache=%q db=%q; want env for unset flags, flag over env", c.PoolSize, c.Cache, c.DB)
	}
	fs = flag.NewFlagSet("serve", flag.ContinueOnError)
	c.serveFlags(fs)
	err := parse(fs, nil, func(k string) string {
		if k == "USERAPI_POOL_SIZE" {
			return "lots"
		}
		return ""
	})
	if err == nil || !strings.Contains(err.Error(), "USERAPI_POOL_SIZE") {
		t.Errorf("bad env value error = %v, want one naming the variable", err)
	}
}

func TestConfigDumpRedactsSecrets(t *testing.T) {
	db := "sqlite:" + filepath.Join(t.TempDir(), "r.db")
	_, logs, _ := startService(t, map[string]string{"USERAPI_REDIS": "redis://:hunter2@127.0.0.1:1/0"}, "--db", db)
	if strings.Contains(logs.String(), "hunter2") {
		t.Errorf("config dump shows the Redis password:\n%s", logs)
	}
	if !strings.Contains(logs.String(), "config") {
		t.Errorf("no config dump in the log:\n%s", logs)
	}
}

func TestUsageErrors(t *testing.T) {
	tests := [][]string{
		{},
		{"nope"},
		{"serve", "--cache", "sometimes"},
		{"serve", "--cache", "tiered"},
		{"serve", "--db", "oracle://x"},
		{"serve", "--trusted-proxies", "not-an-ip"},
		{"serve", "--rate-limit", "fast"},
		{"serve", "--rate-limit", "-1"},
		{"serve", "--rate-limit-store", "disk"},
		{"serve", "--rate-limit-store", "redis"}, // without --redis
		{"serve", "--cache", "tiered", "--redis", "127.0.0.1:6379"},
		{"serve", "--cache", "tiered", "--redis", "redis-sentinel://127.0.0.1:26379"}, // no master set
		{"serve", "--rate-limit-store", "redis", "--redis", "http://127.0.0.1:6379"},
		{"seed", "--users", "0"},
		{"bench", "--connections", "x", "http://127.0.0.1:1"},
	}
	for _, args := range tests {
		err := run(context.Background(), args, func(string) string { return "" }, io.Discard, io.Discard)
		if !errors.Is(err, errUsage) {
			t.Errorf("run(%q) = %v, want a usage error", args, err)
		}
	}
}

// TestReadyzBeforeDatabase checks that the service listens while it waits
// for an unreachable database: /readyz and the API answer 503 with
// Retry-After, /livez 200, and a cancel during the wait stops it cleanly.
func TestReadyzBeforeDatabase(t *testing.T) {
	addr := testenv.FreeAddr(t)
	dead := testenv.FreeAddr(t) // nothing listens there
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	logs := &testenv.Buffer{}
	go func() {
		done <- run(ctx, []string{"serve", "--addr", addr, "--db", "postgres://postgres@" + dead + "/x?sslmode=disable",
			"--db-wait", "30s", "--db-timeout", "200ms"}, func(string) string { return "" }, logs, logs)
	}()
	var resp *http.Response
	var err error
	for range 200 {
		if resp, err = http.Get("http://" + addr + "/readyz"); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("/readyz while waiting for the database: %v\n%s", err, logs)
	}
	resp.Body.Close()
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
		t.Errorf("/readyz = %d Retry-After=%q, want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	// A credential cannot be checked before the database is open: 503, as
	// for the request itself.
	for path, want := range map[string]int{"/livez": 200, "/users/1": 503} {
		resp := do(t, "GET", "http://"+addr+path, "uak_1_"+strings.Repeat("a", 38), "")
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("%s while starting = %d, want %d", path, resp.StatusCode, want)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run = %v after a stop while starting, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("service did not stop while waiting for the database")
	}
}

// TestServeSQLiteOutsideWrite: with the default flags, a write made by
// another process on the SQLite file reaches the instance's cache through
// the change stream, well before the cache's TTL.
func TestServeSQLiteOutsideWrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "outside.db")
	base, logs, _ := startService(t, nil, "--db", "sqlite:"+path)
	key := firstKey(t, logs)
	resp := do(t, "POST", base+"/users", key, `{"email":"out@example.com","name":"Before"}`)
	var created struct{ ID int64 }
	json.NewDecoder(resp.Body).Decode(&created)
	resp.Body.Close()
	if created.ID == 0 {
		t.Fatalf("create answered %s", resp.Status)
	}
	get := func() string {
		resp := do(t, "GET", fmt.Sprintf("%s/users/%d", base, created.ID), key, "")
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	get()
	get() // cached now

	other, err := sqlite.Open(context.Background(), "sqlite:"+path, sqlite.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	name := "After"
	if _, err := other.UpdateUser(context.Background(), created.ID, userapi.UserUpdate{Name: &name}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(get(), `"name":"After"`) {
		if time.Now().After(deadline) {
			t.Fatalf("still served %s 5 s after another process's write\n%s", get(), logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "change stream on") {
		t.Errorf("no start-up message for the change stream:\n%s", logs)
	}
}
