package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/valyala/fasthttp"

	"userapi/internal/redact"
)

// Step is one rung of the optimization ladder: a configuration of
// `userapi serve`, run with the same workload as every other step.
type Step struct {
	Name   string   // short name for tables and charts
	Change string   // what this step changes, for people reading the report
	Flags  []string // serve flags that select the configuration
	// NeedsRedis marks steps that cannot run without --redis; they get the
	// ladder's --redis URL and are skipped with a note when there is none.
	NeedsRedis bool
}

// LadderSteps returns the ladder, slowest configuration first. It is the one
// place to change the steps: a step whose flags `userapi serve` does not
// accept (yet) is skipped with a note and runs as soon as serve knows them.
func LadderSteps() []Step {
	return []Step{
		{
			Name:   "connection per request",
			Change: "no pool: every query opens (and closes) its own database connection; no cache",
			Flags:  []string{"--db-pool=false", "--cache=off", "--coalesce=false"},
		},
		{
			Name:   "pool",
			Change: "a database connection pool; still no cache, every read is a query",
			Flags:  []string{"--cache=off", "--coalesce=false"},
		},
		{
			Name:       "pool + Redis cache-aside",
			Change:     "reads look in Redis first and fill it on a miss; writes invalidate",
			Flags:      []string{"--cache=redis", "--coalesce=false"},
			NeedsRedis: true,
		},
		{
			Name:       "+ local tier",
			Change:     "an in-process cache in front of Redis: hot reads cost no network round trip",
			Flags:      []string{"--cache=tiered", "--coalesce=false"},
			NeedsRedis: true,
		},
		{
			Name:       "+ coalescing/batching",
			Change:     "concurrent misses for one id share one load; misses for different ids are batched into one query",
			Flags:      []string{"--cache=tiered", "--coalesce=true"},
			NeedsRedis: true,
		},
	}
}

// LadderConfig is one ladder run.
type LadderConfig struct {
	DB     string // --db of every serve
	Redis  string // --redis of the steps that need it; "" skips them
	Binary string // the userapi binary; default os.Executable()
	// ServeArgs are extra flags for every serve (--log-level=warn, …).
	ServeArgs []string
	// SeedUsers, when > 0, runs `userapi seed --users N` once before the
	// steps (after migrate), for an empty database.
	SeedUsers int
	// ReadyTimeout bounds the wait for /readyz after a start: long enough
	// for a cold start against a remote database, short enough that a
	// hung server does not stall the ladder.
	ReadyTimeout time.Duration
	// StopTimeout bounds the graceful shutdown after SIGTERM, after which
	// the server is killed.
	StopTimeout time.Duration
	// Bench is the workload of every step; its URL is set per step.
	Bench Config
	Steps []Step
	// Log receives progress and notes; nil discards them.
	Log io.Writer
}

// LadderSchema names the JSON layout of LadderResult.
const LadderSchema = "userapi.bench.ladder/v2"

// LadderResult is the outcome of a ladder run; --json prints it.
type LadderResult struct {
	Schema    string       `json:"schema"`
	DB        string       `json:"db"`    // password redacted
	Redis     string       `json:"redis"` // password redacted
	Settings  Settings     `json:"settings"`
	Machine   Machine      `json:"machine"`
	StartedAt time.Time    `json:"started_at"`
	Steps     []StepResult `json:"steps"`
}

// Step statuses.
const (
	StepRan     = "ran"
	StepSkipped = "skipped" // not configurable here (yet): flag rejected, or no Redis
	StepFailed  = "failed"  // the server did not start or become ready
)

// StepResult is one step of the ladder.
type StepResult struct {
	Step   int      `json:"step"` // 1-based
	Name   string   `json:"name"`
	Change string   `json:"change"`
	Flags  []string `json:"flags"`
	Status string   `json:"status"`
	Note   string   `json:"note"`
	// Gain is this step's requests/s over the previous step that ran, and
	// GainOverFirst over the first step that ran; 0 when there is none.
	Gain          float64 `json:"gain"`
	GainOverFirst float64 `json:"gain_over_first"`
	Result        *Result `json:"result,omitempty"`
}

// Ladder runs cfg.Bench against the service started in each step and returns
// the steps side by side. It fails only when the ladder as a whole cannot run
// (no binary, migration failed, ctx done); a step that cannot run is recorded
// as skipped or failed with a note.
func Ladder(ctx context.Context, cfg LadderConfig) (*LadderResult, error) {
	logw := cfg.Log
	if logw == nil {
		logw = io.Discard
	}
	if cfg.DB == "" {
		return nil, fmt.Errorf("ladder: --db is required")
	}
	if cfg.Binary == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("ladder: find the userapi binary: %w", err)
		}
		cfg.Binary = exe
	}
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = 60 * time.Second
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = 30 * time.Second
	}
	if cfg.Steps == nil {
		cfg.Steps = LadderSteps()
	}
	if cfg.Bench.Seed == 0 {
		// One seed for every step: each step then gets the same sequence
		// of operations and ids, a like-for-like comparison.
		cfg.Bench.Seed = rand.Uint64()>>11 | 1
	}
	probe := cfg.Bench
	probe.URL = "http://127.0.0.1:1"
	if err := probe.Validate(); err != nil {
		return nil, fmt.Errorf("ladder: %w", err)
	}

	res := &LadderResult{
		Schema: LadderSchema, DB: redact.URL(cfg.DB), Redis: redact.URL(cfg.Redis),
		Machine: machineFacts(), StartedAt: time.Now().UTC(),
	}
	fmt.Fprintf(logw, "ladder: migrating %s\n", res.DB)
	if err := runTool(ctx, cfg.Binary, logw, "migrate", "--db", cfg.DB); err != nil {
		return nil, fmt.Errorf("ladder: migrate: %w", err)
	}
	if cfg.SeedUsers > 0 {
		fmt.Fprintf(logw, "ladder: seeding %d users\n", cfg.SeedUsers)
		if err := runTool(ctx, cfg.Binary, logw, "seed", "--db", cfg.DB, "--users", strconv.Itoa(cfg.SeedUsers)); err != nil {
			return nil, fmt.Errorf("ladder: seed: %w", err)
		}
	}

	// Every step runs with authentication on, as the service is deployed:
	// one key for the whole ladder, revoked at the end.
	revoke, err := ladderKey(ctx, &cfg, logw)
	if err != nil {
		return nil, fmt.Errorf("ladder: %w", err)
	}
	defer revoke()

	var first, prev float64
	for i, step := range cfg.Steps {
		if err := ctx.Err(); err != nil {
			return res, fmt.Errorf("ladder: %w", err)
		}
		sr := StepResult{Step: i + 1, Name: step.Name, Change: step.Change, Flags: step.Flags}
		fmt.Fprintf(logw, "\n== step %d/%d: %s (%s)\n", i+1, len(cfg.Steps), step.Name, strings.Join(step.Flags, " "))
		runStep(ctx, &cfg, step, &sr, logw)
		if sr.Status == StepRan && sr.Result != nil {
			rps := sr.Result.Total.RequestsPerSec
			if prev > 0 {
				sr.Gain = rps / prev
			}
			if first > 0 {
				sr.GainOverFirst = rps / first
			} else {
				first = rps
				sr.GainOverFirst = 1
			}
			prev = rps
			res.Settings = sr.Result.Settings
			res.Settings.URL = ""
		} else {
			fmt.Fprintf(logw, "step %d %s: %s\n", i+1, sr.Status, sr.Note)
		}
		res.Steps = append(res.Steps, sr)
	}
	if res.Settings.Mode == "" { // no step ran: still describe the workload
		r := newCollector(&probe, nil).result()
		res.Settings = r.Settings
		res.Settings.URL = ""
	}
	return res, nil
}

// runStep starts the server for one step, runs the workload and stops it,
// filling sr.
func runStep(ctx context.Context, cfg *LadderConfig, step Step, sr *StepResult, logw io.Writer) {
	if step.NeedsRedis && cfg.Redis == "" {
		sr.Status, sr.Note = StepSkipped, "needs --redis"
		return
	}
	addr, err := freeAddr()
	if err != nil {
		sr.Status, sr.Note = StepFailed, err.Error()
		return
	}
	// The ladder's load is one client; its rate limit would cap every
	// step at the client's budget. --serve-arg can set one again.
	args := []string{"serve", "--addr", addr, "--db", cfg.DB, "--rate-limit", "off"}
	if step.NeedsRedis {
		// A key prefix of its own per step and run: every step starts
		// with a cold Redis, and no step reads entries that an earlier
		// step's writes (or an earlier run's) left behind.
		args = append(args, "--redis", cfg.Redis,
			"--redis-prefix", fmt.Sprintf("userapi-ladder:%016x:", rand.Uint64()))
	}
	args = append(args, step.Flags...)
	args = append(args, cfg.ServeArgs...)
	srv, err := startServer(cfg.Binary, args)
	if err != nil {
		sr.Status, sr.Note = StepFailed, err.Error()
		return
	}
	defer func() {
		if err := srv.stop(cfg.StopTimeout); err != nil {
			fmt.Fprintf(logw, "step %d: %v\n", sr.Step, err)
		}
	}()
	base := "http://" + addr
	switch err := srv.waitReady(ctx, base, cfg.ReadyTimeout); {
	case err == nil:
	case errors.Is(err, errUsage):
		sr.Status = StepSkipped
		sr.Note = "serve rejected the step's flags: " + srv.out.firstLine()
		return
	default:
		sr.Status, sr.Note = StepFailed, err.Error()
		if l := srv.out.lastLine(); l != "" {
			sr.Note += ": " + l
		}
		return
	}
	bc := cfg.Bench
	bc.URL = base
	r, err := Run(ctx, bc, logw)
	if err != nil {
		sr.Status, sr.Note = StepFailed, err.Error()
		return
	}
	sr.Status, sr.Result = StepRan, r
	if r.Canceled {
		sr.Note = "interrupted"
	}
}

// ladderEnv returns this process's environment without the USERAPI_*
// variables the ladder sets by flag, so a value exported in the shell cannot
// leak into a step that leaves it unset (USERAPI_REDIS into the steps
// without Redis, say).
func ladderEnv() []string {
	drop := map[string]bool{
		"USERAPI_ADDR": true, "USERAPI_DB": true, "USERAPI_REDIS": true, "USERAPI_CACHE": true,
		"USERAPI_COALESCE": true, "USERAPI_DB_POOL": true,
	}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !drop[k] {
			env = append(env, kv)
		}
	}
	return env
}

// runTool runs a one-shot userapi subcommand (migrate, seed), passing its
// output through to logw.
func runTool(ctx context.Context, binary string, logw io.Writer, args ...string) error {
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = ladderEnv()
	cmd.Stdout, cmd.Stderr = logw, logw
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w", binary, args[0], err)
	}
	return nil
}

// ladderKey creates an API key for the ladder's requests with `userapi keys
// create`, adds it to cfg.Bench.Headers, and returns the function that
// revokes it.
func ladderKey(ctx context.Context, cfg *LadderConfig, logw io.Writer) (func(), error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, cfg.Binary, "keys", "create", "--db", cfg.DB,
		"--name", "userapi bench ladder", "--scopes", "users:read,users:write")
	cmd.Env = ladderEnv()
	cmd.Stdout, cmd.Stderr = &out, logw
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s keys create: %w", cfg.Binary, err)
	}
	key := strings.TrimSpace(out.String())
	id, _, ok := strings.Cut(strings.TrimPrefix(key, "uak_"), "_")
	if !strings.HasPrefix(key, "uak_") || !ok {
		return nil, fmt.Errorf("%s keys create printed no key", cfg.Binary)
	}
	cfg.Bench.Headers = append(slices.Clip(cfg.Bench.Headers), Header{"Authorization", "Bearer " + key})
	return func() {
		// A fresh context: the ladder's may have ended (interrupt).
		rctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := runTool(rctx, cfg.Binary, logw, "keys", "revoke", "--db", cfg.DB, id); err != nil {
			fmt.Fprintf(logw, "ladder: could not revoke its api key %s: %v\n", id, err)
		}
	}, nil
}

// freeAddr returns a 127.0.0.1 address with a port that was free a moment
// ago. Another process could take it before the server binds it; the step
// then fails with the server's message, which is rare enough not to retry.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	return addr, nil
}

// errUsage is returned by waitReady when serve exited with status 2, the
// command line convention for a usage error (an unknown flag or value).
var errUsage = errors.New("serve exited with a usage error")

// server is a running `userapi serve` child process.
type server struct {
	cmd    *exec.Cmd
	out    *tailBuffer
	exited chan struct{} // closed when the process has exited
	err    error         // Wait's result, set before exited is closed
}

func startServer(binary string, args []string) (*server, error) {
	s := &server{out: &tailBuffer{max: 64 << 10}, exited: make(chan struct{})}
	s.cmd = exec.Command(binary, args...)
	s.cmd.Env = ladderEnv()
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	setDeathSignal(s.cmd)
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", binary, err)
	}
	go func() {
		s.err = s.cmd.Wait()
		close(s.exited)
	}()
	return s, nil
}

// readyPoll is how often /readyz is asked while a server starts: often
// enough to add little to a step, rarely enough to be no load.
const readyPoll = 100 * time.Millisecond

// waitReady polls base/readyz until it answers 200, the process exits, the
// timeout passes or ctx is done.
func (s *server) waitReady(ctx context.Context, base string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
	defer fasthttp.ReleaseRequest(req)
	defer fasthttp.ReleaseResponse(resp)
	req.SetRequestURI(base + "/readyz")
	client := &fasthttp.Client{}
	tick := time.NewTicker(readyPoll)
	defer tick.Stop()
	for {
		if err := client.DoTimeout(req, resp, time.Second); err == nil && resp.StatusCode() == fasthttp.StatusOK {
			return nil
		}
		select {
		case <-s.exited:
			var ee *exec.ExitError
			if errors.As(s.err, &ee) && ee.ExitCode() == 2 {
				return errUsage
			}
			return fmt.Errorf("serve exited before it was ready: %v", s.err)
		case <-ctx.Done():
			return fmt.Errorf("wait for %s/readyz: %w", base, ctx.Err())
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s/readyz not ready after %v", base, timeout)
		}
	}
}

// stop sends SIGTERM to the server's pid and waits for a graceful exit; after
// timeout it kills it.
func (s *server) stop(timeout time.Duration) error {
	select {
	case <-s.exited:
		return nil
	default:
	}
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("stop server pid %d: %w", s.cmd.Process.Pid, err)
	}
	select {
	case <-s.exited:
		return nil
	case <-time.After(timeout):
	}
	if err := s.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill server pid %d: %w", s.cmd.Process.Pid, err)
	}
	<-s.exited
	return fmt.Errorf("server pid %d did not stop within %v of SIGTERM and was killed", s.cmd.Process.Pid, timeout)
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

// firstLine returns the first non-empty line still held: for a command
// that failed on its flags, the flag package's message.
func (t *tailBuffer) firstLine() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	for l := range bytes.SplitSeq(t.buf, []byte("\n")) {
		if l = bytes.TrimSpace(l); len(l) > 0 {
			return string(l)
		}
	}
	return ""
}

// lastLine returns the last non-empty line written.
func (t *tailBuffer) lastLine() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	lines := bytes.Split(bytes.TrimSpace(t.buf), []byte("\n"))
	return strings.TrimSpace(string(lines[len(lines)-1]))
}

// ladderMain is `userapi bench ladder …`.
func ladderMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var (
		lc      LadderConfig
		opts    outputFlags
		mix     string
		keyDist string
	)
	fs := flag.NewFlagSet("userapi bench ladder", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, "usage: userapi bench ladder --db URL [--redis URL] [flags]\n\n"+
			"Starts `userapi serve` once per optimization step on a free 127.0.0.1 port,\n"+
			"runs the same workload against each and shows the steps side by side.\n\nflags:\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&lc.DB, "db", "", "database URL of every step (required)")
	fs.StringVar(&lc.Redis, "redis", "", "Redis URL of the cache steps (without it they are skipped)")
	fs.StringVar(&lc.Binary, "binary", "", "userapi binary to start (default: this one)")
	fs.IntVar(&lc.SeedUsers, "seed-users", 0, "seed this many users before the steps (for an empty database)")
	fs.DurationVar(&lc.ReadyTimeout, "ready-timeout", 60*time.Second, "wait this long for /readyz after each start")
	fs.DurationVar(&lc.StopTimeout, "stop-timeout", 30*time.Second, "wait this long for a graceful stop before killing")
	fs.Func("serve-arg", "extra flag for every serve, such as --serve-arg=--log-level=warn (repeatable)", func(s string) error {
		lc.ServeArgs = append(lc.ServeArgs, s)
		return nil
	})
	addRunFlags(fs, &lc.Bench, &mix, &keyDist)
	lc.Bench.Workload.Kind = "zipf" // the ladder is about caching: skewed reads by default
	fs.Lookup("workload").DefValue = "zipf"
	addOutputFlags(fs, &opts)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return usageErr(err)
	}
	if len(pos) != 0 {
		fs.Usage()
		return usageErr(fmt.Errorf("unexpected arguments %q", pos))
	}
	if err := finishRunFlags(fs, &lc.Bench, mix, keyDist); err != nil {
		fmt.Fprintln(stderr, "userapi bench ladder:", err)
		return usageErr(err)
	}
	if lc.DB == "" {
		fs.Usage()
		return usageErr(errors.New("--db is required"))
	}
	if lc.SeedUsers > 0 && !flagSet(fs, "ids") {
		lc.Bench.Workload.IDs = int64(lc.SeedUsers)
	}
	lc.Log = stderr
	if opts.quiet {
		lc.Log = nil
	}
	res, err := Ladder(ctx, lc)
	if err != nil {
		if res == nil || len(res.Steps) == 0 {
			return err
		}
		fmt.Fprintln(stderr, "userapi bench ladder:", err) // report what ran
	}
	if opts.report != "" {
		if err := writeFile(opts.report, func(w io.Writer) error { return WriteLadderReport(w, res) }); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "report written to %s\n", opts.report)
	}
	if opts.json {
		if jerr := WriteJSON(stdout, res); jerr != nil {
			return jerr
		}
		return err
	}
	if terr := WriteLadderTable(stdout, res); terr != nil {
		return terr
	}
	return err
}

func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func fmtGain(g float64) string {
	if g == 0 {
		return "—"
	}
	return "×" + strconv.FormatFloat(g, 'f', 2, 64)
}

// WriteLadderTable writes the steps side by side.
func WriteLadderTable(w io.Writer, res *LadderResult) error {
	bw := bufio.NewWriter(w)
	fmt.Fprintf(bw, "userapi bench ladder  db %s", res.DB)
	if res.Redis != "" {
		fmt.Fprintf(bw, "  redis %s", res.Redis)
	}
	fmt.Fprintf(bw, "\n%s\n\n", res.Settings.describe())
	tw := tabwriter.NewWriter(bw, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "step\tconfiguration\treq/s\tgain\tvs step 1\tp50\tp99\tp99.9\terrors\t")
	var notes []string
	for _, s := range res.Steps {
		if s.Note != "" {
			notes = append(notes, fmt.Sprintf("step %d %s: %s", s.Step, s.Status, s.Note))
		}
		if s.Status != StepRan || s.Result == nil {
			fmt.Fprintf(tw, "%d\t%s\t%s\t\t\t\t\t\t\t\n", s.Step, s.Name, s.Status)
			continue
		}
		t := s.Result.Total
		fmt.Fprintf(tw, "%d\t%s\t%.0f\t%s\t%s\t%s\t%s\t%s\t%d\t\n", s.Step, s.Name, t.RequestsPerSec,
			fmtGain(s.Gain), fmtGain(s.GainOverFirst), fmtMs(t.Latency.P50), fmtMs(t.Latency.P99),
			fmtMs(t.Latency.P999), t.Errors)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write ladder table: %w", err)
	}
	if len(notes) > 0 {
		fmt.Fprintf(bw, "\n%s\n", strings.Join(notes, "\n"))
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write ladder table: %w", err)
	}
	return nil
}
