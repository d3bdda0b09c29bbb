package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// The ladder tests start this test binary as the "userapi" binary: with
// USERAPI_BENCH_FAKE_USERAPI=1, TestMain runs fakeUserapi instead of the
// tests. It accepts `migrate` and `serve` like the real command, with knobs
// (environment variables) to reject a flag, crash or never become ready.
func TestMain(m *testing.M) {
	if os.Getenv("USERAPI_BENCH_FAKE_USERAPI") == "1" {
		os.Exit(fakeUserapi(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// fakeKey is the API key the fake `keys create` prints and its serve
// requires on /users.
const fakeKey = "uak_7_fakefakefakefakefakefakefakefakefake00"

// fakeUserapi is a stand-in for `userapi migrate|seed|serve`. Every
// invocation appends "pid env=$USERAPI_REDIS args…" to
// $USERAPI_BENCH_FAKE_LOG/calls.
func fakeUserapi(args []string) int {
	if dir := os.Getenv("USERAPI_BENCH_FAKE_LOG"); dir != "" {
		f, err := os.OpenFile(filepath.Join(dir, "calls"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err == nil {
			fmt.Fprintln(f, os.Getpid(), "env="+os.Getenv("USERAPI_REDIS"), strings.Join(args, " "))
			f.Close()
		}
	}
	if len(args) == 0 {
		return 2
	}
	switch args[0] {
	case "migrate", "seed":
		return 0
	case "keys":
		if len(args) > 1 && args[1] == "create" {
			fmt.Println(fakeKey)
		}
		return 0
	case "serve":
	default:
		return 2
	}
	fs := flag.NewFlagSet("userapi serve", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:8080", "")
	fs.String("db", "", "")
	redis := fs.String("redis", "", "")
	fs.String("redis-prefix", "userapi:", "")
	cache := fs.String("cache", "local", "")
	fs.Bool("coalesce", true, "")
	if os.Getenv("USERAPI_BENCH_FAKE_NO_DB_POOL") != "1" {
		fs.Bool("db-pool", true, "")
	}
	fs.String("log-level", "info", "")
	fs.String("rate-limit", "", "")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	if (*cache == "redis" || *cache == "tiered") && *redis == "" {
		fmt.Fprintln(os.Stderr, "--cache", *cache, "needs --redis")
		return 2
	}
	if os.Getenv("USERAPI_BENCH_FAKE_CRASH") == "1" {
		fmt.Fprintln(os.Stderr, "cannot reach the database")
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	start := time.Now()
	neverReady := os.Getenv("USERAPI_BENCH_FAKE_NEVER_READY") == "1"
	srv := &fasthttp.Server{Handler: func(c *fasthttp.RequestCtx) {
		path := string(c.Path())
		switch {
		case path == "/readyz":
			// Not ready at first, so the ladder has to wait.
			if neverReady || time.Since(start) < 200*time.Millisecond {
				c.SetStatusCode(503)
			}
		case string(c.Request.Header.Peek("Authorization")) != "Bearer "+fakeKey:
			c.SetStatusCode(401)
		case strings.HasPrefix(path, "/users/"):
			id, err := strconv.ParseInt(strings.TrimPrefix(path, "/users/"), 10, 64)
			if err != nil {
				c.SetStatusCode(400)
				return
			}
			writeUser(c, id, 1)
		default:
			c.SetStatusCode(404)
		}
	}}
	go srv.Serve(ln) //nolint:errcheck // ends with Shutdown
	<-ctx.Done()
	_ = srv.Shutdown()
	return 0
}

type call struct {
	pid   int
	redis string // USERAPI_REDIS in its environment
	args  []string
}

// fakeEnv makes this test binary the fake userapi and returns the log dir.
func fakeEnv(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("USERAPI_BENCH_FAKE_USERAPI", "1")
	t.Setenv("USERAPI_BENCH_FAKE_LOG", dir)
	return dir
}

func readCalls(t *testing.T, dir string) []call {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "calls"))
	if err != nil {
		t.Fatal(err)
	}
	var calls []call
	for l := range strings.SplitSeq(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(l)
		pid, err := strconv.Atoi(f[0])
		if err != nil {
			t.Fatalf("bad call line %q", l)
		}
		calls = append(calls, call{pid: pid, redis: strings.TrimPrefix(f[1], "env="), args: f[2:]})
	}
	return calls
}

// checkGone fails if a server the ladder started is still running.
func checkGone(t *testing.T, calls []call) {
	t.Helper()
	for _, c := range calls {
		if err := syscall.Kill(c.pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("process %d (%v) still exists after the ladder: %v", c.pid, c.args, err)
		}
	}
}

func ladderBench() Config {
	return Config{
		Connections: 2, Requests: 200, Timeout: 5 * time.Second,
		Workload: Workload{Kind: "zipf", IDs: 100, ZipfS: 1.1, KeyDist: "zipf", Mix: Mix{OpRead: 1}, ListLimit: 50},
	}
}

func TestLadderStepsAndSkips(t *testing.T) {
	dir := fakeEnv(t)
	t.Setenv("USERAPI_BENCH_FAKE_NO_DB_POOL", "1") // this serve has no --db-pool: step 1 is skipped
	t.Setenv("USERAPI_REDIS", "redis://leaked-from-env:6379/0")
	var log bytes.Buffer
	res, err := Ladder(context.Background(), LadderConfig{
		DB: "postgres://bench:secret@127.0.0.1:5432/db", Redis: "redis://127.0.0.1:6379/0",
		Binary: os.Args[0], Bench: ladderBench(), ReadyTimeout: 10 * time.Second, StopTimeout: 5 * time.Second,
		Log: &log,
	})
	if err != nil {
		t.Fatalf("Ladder: %v\n%s", err, log.String())
	}
	steps := LadderSteps()
	if len(res.Steps) != len(steps) {
		t.Fatalf("%d steps, want %d", len(res.Steps), len(steps))
	}
	if s := res.Steps[0]; s.Status != StepSkipped || !strings.Contains(s.Note, "db-pool") {
		t.Errorf("step 1 = %s %q, want skipped for the unknown --db-pool flag", s.Status, s.Note)
	}
	for _, s := range res.Steps[1:] {
		if s.Status != StepRan || s.Result == nil {
			t.Errorf("step %d %q = %s %q, want ran", s.Step, s.Name, s.Status, s.Note)
			continue
		}
		if s.Result.Total.Requests != 200 || s.Result.Total.Errors != 0 {
			t.Errorf("step %d: %d requests, %d errors; want 200, 0", s.Step, s.Result.Total.Requests, s.Result.Total.Errors)
		}
		if s.GainOverFirst <= 0 {
			t.Errorf("step %d: gain over first = %v", s.Step, s.GainOverFirst)
		}
	}
	seed := res.Steps[1].Result.Settings.Seed
	for _, s := range res.Steps[2:] {
		if s.Result != nil && s.Result.Settings.Seed != seed {
			t.Errorf("step %d seed %d, step 2 seed %d: want one seed for the ladder", s.Step, s.Result.Settings.Seed, seed)
		}
	}
	if g := res.Steps[1]; g.Gain != 0 || g.GainOverFirst != 1 {
		t.Errorf("first step that ran: gain %v, over first %v; want 0 (none before), 1", g.Gain, g.GainOverFirst)
	}
	if strings.Contains(res.DB, "secret") {
		t.Errorf("DB URL not redacted: %s", res.DB)
	}

	calls := readCalls(t, dir)
	if calls[0].args[0] != "migrate" {
		t.Errorf("first call %v, want migrate", calls[0].args)
	}
	if a := calls[1].args; len(a) < 2 || a[0] != "keys" || a[1] != "create" {
		t.Errorf("second call %v, want keys create", a)
	}
	if a := calls[len(calls)-1].args; len(a) < 4 || a[0] != "keys" || a[1] != "revoke" || a[len(a)-1] != "7" {
		t.Errorf("last call %v, want keys revoke 7", a)
	}
	serves := calls[2 : len(calls)-1]
	if len(serves) != len(steps) {
		t.Fatalf("%d serve calls, want %d: %v", len(serves), len(steps), serves)
	}
	prefixes := map[string]bool{}
	for i, c := range serves {
		for _, f := range steps[i].Flags {
			if !slices.Contains(c.args, f) {
				t.Errorf("step %d serve %v lacks %s", i+1, c.args, f)
			}
		}
		if j := slices.Index(c.args, "--rate-limit"); j < 0 || c.args[j+1] != "off" {
			t.Errorf("step %d serve %v: want --rate-limit off (one client's budget would cap the step)", i+1, c.args)
		}
		hasRedis := slices.Contains(c.args, "--redis")
		if hasRedis != steps[i].NeedsRedis {
			t.Errorf("step %d: --redis passed = %v, want %v", i+1, hasRedis, steps[i].NeedsRedis)
		}
		if j := slices.Index(c.args, "--redis-prefix"); hasRedis {
			if j < 0 {
				t.Errorf("step %d has no Redis key prefix of its own", i+1)
			} else if p := c.args[j+1]; prefixes[p] {
				t.Errorf("step %d reuses Redis key prefix %q", i+1, p)
			} else {
				prefixes[p] = true
			}
		}
		addr := c.args[slices.Index(c.args, "--addr")+1]
		if !strings.HasPrefix(addr, "127.0.0.1:") || strings.HasSuffix(addr, ":0") {
			t.Errorf("step %d listens on %q, want a free 127.0.0.1 port", i+1, addr)
		}
	}
	for _, c := range calls {
		if c.redis != "" {
			t.Errorf("%v ran with USERAPI_REDIS=%s from the environment", c.args, c.redis)
		}
	}
	checkGone(t, calls)

	var table bytes.Buffer
	if err := WriteLadderTable(&table, res); err != nil {
		t.Fatal(err)
	}
	t.Logf("ladder table:\n%s", table.String())
	for _, want := range []string{"connection per request", "step 1 skipped: serve rejected", "×1.00", "pool + Redis cache-aside"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("ladder table lacks %q:\n%s", want, table.String())
		}
	}
}

// TestLadderMain runs `bench ladder` without --redis: the cache steps are
// skipped, the rest run, and --json and --report are written.
func TestLadderMain(t *testing.T) {
	dir := fakeEnv(t)
	report := filepath.Join(t.TempDir(), "ladder.html")
	var stdout, stderr bytes.Buffer
	args := []string{"ladder", "--db", "sqlite:" + filepath.Join(t.TempDir(), "x.db"), "--binary", os.Args[0],
		"--requests", "150", "--connections", "2", "--warmup", "0s", "--seed-users", "100", "--json", "--report", report}
	if err := Main(context.Background(), args, &stdout, &stderr); err != nil {
		t.Fatalf("Main: %v\n%s", err, stderr.String())
	}
	var res LadderResult
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("stdout is not JSON: %v\n%s", err, stdout.String())
	}
	if res.Schema != LadderSchema || len(res.Steps) != 5 {
		t.Fatalf("schema %q with %d steps", res.Schema, len(res.Steps))
	}
	for i, s := range res.Steps {
		want := StepRan
		if i >= 2 {
			want = StepSkipped
		}
		if s.Status != want {
			t.Errorf("step %d: %s %q, want %s", i+1, s.Status, s.Note, want)
		}
	}
	if s := res.Steps[2]; s.Note != "needs --redis" {
		t.Errorf("step 3 note %q", s.Note)
	}
	if res.Settings.Workload != "zipf" || res.Settings.IDs != 100 {
		t.Errorf("settings %+v: want the zipf default and --ids from --seed-users", res.Settings)
	}
	calls := readCalls(t, dir)
	if len(calls) < 2 || calls[0].args[0] != "migrate" || calls[1].args[0] != "seed" || !slices.Contains(calls[1].args, "100") {
		t.Errorf("calls %v, want migrate then seed --users 100", calls)
	}
	checkGone(t, calls)
	if _, err := os.Stat(report); err != nil {
		t.Errorf("no report: %v", err)
	}
}

func TestLadderFailedSteps(t *testing.T) {
	for _, tc := range []struct {
		name, env, note string
	}{
		{"crash", "USERAPI_BENCH_FAKE_CRASH", "exited before it was ready"},
		{"never ready", "USERAPI_BENCH_FAKE_NEVER_READY", "not ready after"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := fakeEnv(t)
			t.Setenv(tc.env, "1")
			start := time.Now()
			res, err := Ladder(context.Background(), LadderConfig{
				DB: "postgres://127.0.0.1/db", Binary: os.Args[0], Bench: ladderBench(),
				// A stop timeout far above the bound below: the failed step
				// must not wait for it (the bound leaves room for the
				// migrate and keys calls around the step).
				ReadyTimeout: 700 * time.Millisecond, StopTimeout: 30 * time.Second,
				Steps: []Step{{Name: "pool", Flags: []string{"--cache=off"}}},
			})
			if err != nil {
				t.Fatal(err)
			}
			if s := res.Steps[0]; s.Status != StepFailed || !strings.Contains(s.Note, tc.note) {
				t.Errorf("step = %s %q, want failed with %q", s.Status, s.Note, tc.note)
			}
			if el := time.Since(start); el > 15*time.Second {
				t.Errorf("took %v", el)
			}
			checkGone(t, readCalls(t, dir))
		})
	}
}
