package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"userapi/internal/pace"

	"github.com/valyala/fasthttp"
)

// TestMainMixedEndToEnd runs `bench URL … --workload mixed --json --report`
// against the fake service and checks what was sent and what was reported.
func TestMainMixedEndToEnd(t *testing.T) {
	api := newFakeAPI(50)
	url := api.serve(t)
	report := filepath.Join(t.TempDir(), "report.html")
	var stdout, stderr bytes.Buffer
	args := []string{url, "--connections", "4", "--requests", "3000", "--warmup", "0s",
		"--workload", "mixed", "--ids", "50", "--mix", "read=60,list=10,update=20,create=10",
		"--list-limit", "7", "--json", "--report", report}
	if err := Main(context.Background(), args, &stdout, &stderr); err != nil {
		t.Fatalf("Main: %v\nstderr:\n%s", err, stderr.String())
	}
	var res Result
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("stdout is not the JSON result: %v\n%s", err, stdout.String())
	}
	if got, want := res.Total.Requests, int64(3000); got != want {
		t.Errorf("total requests = %d, want exactly %d (the --requests bound)", got, want)
	}
	if res.Total.Errors != 0 {
		t.Errorf("errors = %d (%v), want 0", res.Total.Errors, res.Total.ErrorsByKind)
	}
	if got := res.Total.OK + res.Total.Conflicts + res.Total.Errors; got != res.Total.Requests {
		t.Errorf("ok+conflicts+errors = %d, want requests %d", got, res.Total.Requests)
	}
	byOp := map[string]Stats{}
	for _, st := range res.Operations {
		byOp[st.Op] = st
	}
	for _, op := range []string{"read", "list", "update", "create"} {
		st, ok := byOp[op]
		if !ok || st.Requests == 0 {
			t.Errorf("operation %s missing from the results: %+v", op, res.Operations)
			continue
		}
		if st.Latency.P50 <= 0 || st.Latency.P50 > st.Latency.P99 || st.Latency.P99 > st.Latency.Max {
			t.Errorf("%s latency not ordered: %+v", op, st.Latency)
		}
	}
	// What the server saw agrees with what was reported, and every PATCH
	// carried If-Match and the merge-patch type.
	if got, want := api.count("PATCH /users/{id}"), int(byOp["update"].Requests); got != want {
		t.Errorf("server saw %d PATCH, report says %d updates", got, want)
	}
	if got, want := api.count("POST /users"), int(byOp["create"].Requests); got != want {
		t.Errorf("server saw %d POST, report says %d creates", got, want)
	}
	if got, want := api.count("GET /users"), int(byOp["list"].Requests); got != want {
		t.Errorf("server saw %d list requests, report says %d", got, want)
	}
	if api.badPatch != 0 {
		t.Errorf("%d PATCH requests lacked If-Match or the merge-patch content type", api.badPatch)
	}
	if n := len(api.emails); n != int(byOp["create"].OK) {
		t.Errorf("%d distinct emails created, want one per successful create (%d)", n, byOp["create"].OK)
	}
	// Pages were followed: with 7 per page over 50+ users, later pages
	// were asked for with the cursor the server handed out (a bad cursor
	// would be a 400, an error above).
	if st := byOp["list"]; st.OK != st.Requests {
		t.Errorf("list: %d of %d ok", st.OK, st.Requests)
	}
	if ua := api.hosts; len(ua) != 1 {
		t.Errorf("requests used Host headers %v, want the one of the URL", ua)
	}
	if _, err := os.Stat(report); err != nil {
		t.Errorf("report not written: %v", err)
	}
	if !strings.Contains(stderr.String(), "report written to") {
		t.Errorf("stderr does not mention the report:\n%s", stderr.String())
	}
}

// TestUpdatesRaceFor412 checks that 412 is counted as a conflict, not an
// error: many senders updating few ids must lose races.
func TestUpdatesRaceFor412(t *testing.T) {
	api := newFakeAPI(2)
	cfg := quickConfig(api.serve(t))
	cfg.Connections, cfg.Requests = 8, 2000
	cfg.Workload = Workload{Kind: "mixed", IDs: 2, KeyDist: "uniform", Mix: Mix{OpRead: 1, OpUpdate: 1}, ListLimit: 50}
	res, err := Run(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	var upd Stats
	for _, st := range res.Operations {
		if st.Op == "update" {
			upd = st
		}
	}
	if upd.Conflicts == 0 || upd.OK == 0 {
		t.Errorf("updates: %d ok, %d conflicts; want both > 0 with 8 senders on 2 ids", upd.OK, upd.Conflicts)
	}
	if res.Total.Errors != 0 {
		t.Errorf("errors = %v, want none (412 is a conflict)", res.Total.ErrorsByKind)
	}
	if got := res.Total.Statuses["412"]; got != upd.Conflicts {
		t.Errorf("statuses[412] = %d, want %d", got, upd.Conflicts)
	}
}

func TestErrorsByStatusAndKind(t *testing.T) {
	api := newFakeAPI(10)
	cfg := quickConfig(api.serve(t))
	cfg.Workload.IDs = 20 // half the ids do not exist: 404
	res, err := Run(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	n404 := res.Total.ErrorsByKind["404"]
	if n404 == 0 || n404 != res.Total.Errors || n404 != res.Total.Statuses["404"] {
		t.Errorf("errors %d, by kind %v, statuses %v: want all errors to be 404s", res.Total.Errors, res.Total.ErrorsByKind, res.Total.Statuses)
	}

	// Nothing listens: every request is a connection error, and the run
	// still ends by its bound.
	dead := quickConfig("http://" + freeTCPAddr(t))
	dead.Requests, dead.Connections = 20, 2
	res, err = Run(context.Background(), dead, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := res.Total.ErrorsByKind["connection"]; got != 20 {
		t.Errorf("connection errors = %d (%v), want 20", got, res.Total.ErrorsByKind)
	}
}

func freeTCPAddr(t *testing.T) string {
	t.Helper()
	addr, err := freeAddr()
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// TestTimeoutWatchdog: a server that never answers yields timeouts after
// about --timeout, and the run ends by itself.
func TestTimeoutWatchdog(t *testing.T) {
	release := make(chan struct{})
	url := serveHandler(t, func(c *fasthttp.RequestCtx) { <-release })
	defer close(release)
	cfg := quickConfig(url)
	cfg.Connections, cfg.Requests, cfg.Timeout = 2, 4, 300*time.Millisecond
	start := time.Now()
	res, err := Run(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("run took %v, want about 2 × 300ms", el)
	}
	if got := res.Total.ErrorsByKind["timeout"]; got != 4 {
		t.Errorf("timeouts = %d (%v), want 4", got, res.Total.ErrorsByKind)
	}
	// A timeout's waiting time is latency: at least the timeout.
	if res.Total.Latency.P50 < 300 {
		t.Errorf("p50 = %vms, want ≥ the 300ms timeout", res.Total.Latency.P50)
	}
}

// stallServer answers at once except for a pause of length stall, which
// begins with the first request that arrives from after the server's first
// request: that request and every one arriving in the pause wait until its
// end, so the first waits the whole pause.
func stallServer(t *testing.T, from, stall time.Duration) string {
	var (
		mu         sync.Mutex
		first, end time.Time
	)
	return serveHandler(t, func(c *fasthttp.RequestCtx) {
		now := time.Now()
		mu.Lock()
		if first.IsZero() {
			first = now
		}
		if end.IsZero() && now.Sub(first) >= from {
			end = now.Add(stall)
		}
		wait := end.Sub(now)
		mu.Unlock()
		if wait > 0 {
			time.Sleep(wait)
		}
		c.Response.Header.Set("ETag", `"1"`)
		c.SetBodyString(`{"id":1}`)
	})
}

// TestOpenLoopShowsStall is the coordinated-omission test: the server
// pauses every answer for 500 ms in the middle of the run. In the open loop
// latency counts from each request's intended send time, so every request
// intended during the pause waits for its end: the maximum is the pause, and
// the tail holds the pause's share of the schedule. The closed loop, whose
// few connections simply wait, records only a handful of slow samples.
func TestOpenLoopShowsStall(t *testing.T) {
	const (
		run   = 2500 * time.Millisecond
		from  = 1000 * time.Millisecond
		stall = 500 * time.Millisecond
		rate  = 400
	)
	open := quickConfig(stallServer(t, from, stall))
	open.Rate, open.Requests, open.Duration = rate, 0, run
	res, err := Run(context.Background(), open, nil)
	if err != nil {
		t.Fatal(err)
	}
	l := res.Total.Latency
	t.Logf("open loop: p50 %.1fms p90 %.1fms p99 %.1fms max %.1fms; lag %+v", l.P50, l.P90, l.P99, l.Max, res.ScheduleLag)
	// A request intended s before the end of the pause waits s, so the
	// slowest fraction f of the schedule waits at least stall - f×run:
	// p99 ≈ 500 - 0.01×2500 = 475 ms, p90 ≈ 500 - 250 = 250 ms.
	want := func(q float64) float64 { return msOf(stall) - (1-q)*msOf(run) }
	if l.Max < msOf(stall) {
		t.Errorf("open loop max = %.1fms, want ≥ the %v pause", l.Max, stall)
	}
	if lo, hi := 0.9*want(0.99), msOf(stall)+50; l.P99 < lo || l.P99 > hi {
		t.Errorf("open loop p99 = %.1fms, want %.0fms (%.0f..%.0f): the requests intended during the pause", l.P99, want(0.99), lo, hi)
	}
	if lo, hi := 0.8*want(0.90), 1.2*want(0.90); l.P90 < lo || l.P90 > hi {
		t.Errorf("open loop p90 = %.1fms, want %.0fms (%.0f..%.0f)", l.P90, want(0.90), lo, hi)
	}
	if res.ScheduleLag == nil || res.ScheduleLag.Max < 0.9*msOf(stall) {
		t.Errorf("schedule lag = %+v, want the pause to show as lag", res.ScheduleLag)
	}
	if want := int64(rate * run / time.Second); res.Total.Requests+res.Unsent != want {
		t.Errorf("requests %d + unsent %d, want the %d scheduled", res.Total.Requests, res.Unsent, want)
	}

	closed := quickConfig(stallServer(t, from, stall))
	closed.Requests, closed.Duration = 0, run
	cres, err := Run(context.Background(), closed, nil)
	if err != nil {
		t.Fatal(err)
	}
	cl := cres.Total.Latency
	t.Logf("closed loop: p50 %.1fms p90 %.1fms p99 %.1fms max %.1fms", cl.P50, cl.P90, cl.P99, cl.Max)
	if cl.Max < 0.9*msOf(stall) {
		t.Errorf("closed loop max = %.1fms, want the pause", cl.Max)
	}
	if cl.P99 > l.P99/10 {
		t.Errorf("closed loop p99 = %.1fms is not far below the open loop's %.1fms; want coordinated omission visible", cl.P99, l.P99)
	}
}

func TestOpenLoopRate(t *testing.T) {
	api := newFakeAPI(100)
	cfg := quickConfig(api.serve(t))
	cfg.Rate, cfg.Requests, cfg.Warmup = 400, 200, 250*time.Millisecond
	start := time.Now()
	res, err := Run(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	el := time.Since(start)
	// 100 warm-up + 200 measured at 400/s: 0.75s of schedule.
	if el < 700*time.Millisecond || el > 3*time.Second {
		t.Errorf("run took %v, want about 0.75s at 400 req/s", el)
	}
	if res.Total.Requests != 200 || res.Unsent != 0 {
		t.Errorf("measured %d requests, %d unsent; want 200, 0", res.Total.Requests, res.Unsent)
	}
	if got := api.count("GET /users/{id}"); got != 300 {
		t.Errorf("server saw %d requests, want 300 (100 warm-up + 200)", got)
	}
	if r := res.Total.RequestsPerSec; r < 300 || r > 500 {
		t.Errorf("measured %.0f req/s, want about 400", r)
	}
}

func TestWarmupExcluded(t *testing.T) {
	api := newFakeAPI(100)
	cfg := quickConfig(api.serve(t))
	cfg.Requests, cfg.Warmup = 300, 300*time.Millisecond
	res, err := Run(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	sent := api.count("GET /users/{id}")
	if res.Total.Requests != 300 || sent <= 300 {
		t.Errorf("measured %d of %d sent; want 300 measured after a warm-up", res.Total.Requests, sent)
	}
}

// TestCancelStopsPromptly: a canceled run returns at once, with requests in
// flight to a server that never answers, and with open-loop senders waiting
// seconds for their intended send times.
func TestCancelStopsPromptly(t *testing.T) {
	release := make(chan struct{})
	url := serveHandler(t, func(c *fasthttp.RequestCtx) { <-release })
	defer close(release)
	for _, tc := range []struct {
		name string
		rate float64
	}{
		{"closed loop", 0},
		{"open loop", 1}, // 4 senders: the last waits 3 s for its first request
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := quickConfig(url)
			cfg.Requests, cfg.Duration, cfg.Rate = 0, time.Minute, tc.rate
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			start := time.Now()
			res, err := Run(ctx, cfg, nil)
			if err != nil {
				t.Fatal(err)
			}
			if el := time.Since(start); el > time.Second {
				t.Errorf("canceled run took %v to return", el)
			}
			if !res.Canceled {
				t.Error("Canceled not set")
			}
		})
	}
}

func TestMainUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"http://127.0.0.1:1", "http://127.0.0.1:2"},
		{"ftp://127.0.0.1:1"},
		{"http://127.0.0.1:1", "--workload", "gauss"},
		{"http://127.0.0.1:1", "--mix", "read=1"},
		{"http://127.0.0.1:1", "--workload", "zipf", "--zipf-s", "1"},
		{"http://127.0.0.1:1", "--connections", "0"},
		{"http://127.0.0.1:1", "--bogus"},
		{"ladder"},
	} {
		var out, errb bytes.Buffer
		err := Main(context.Background(), args, &out, &errb)
		if !errors.Is(err, ErrUsage) {
			t.Errorf("Main(%q) = %v, want ErrUsage", args, err)
		}
	}
}

func TestParseFlagsAnyOrder(t *testing.T) {
	api := newFakeAPI(10)
	url := api.serve(t)
	var out, errb bytes.Buffer
	args := []string{"--requests", "50", url, "--connections", "2", "--ids", "10", "--warmup", "0s", "--quiet"}
	if err := Main(context.Background(), args, &out, &errb); err != nil {
		t.Fatalf("Main: %v\n%s", err, errb.String())
	}
	if got := api.count("GET /users/{id}"); got != 50 {
		t.Errorf("server saw %d requests, want 50", got)
	}
	if errb.Len() != 0 {
		t.Errorf("--quiet still wrote to stderr: %q", errb.String())
	}
	for _, want := range []string{"read", "p99.9", "req/s"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

func TestProgressLines(t *testing.T) {
	api := newFakeAPI(10)
	cfg := quickConfig(api.serve(t))
	cfg.Requests, cfg.Duration, cfg.Warmup, cfg.Rate = 0, 1500*time.Millisecond, 500*time.Millisecond, 200
	var progress bytes.Buffer
	res, err := Run(context.Background(), cfg, &progress)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(progress.String()), "\n")
	if len(lines) < 2 || !strings.Contains(lines[0], "req/s") || !strings.Contains(lines[0], "(warm-up)") {
		t.Errorf("progress lines:\n%s\nwant one a second, the first marked warm-up", progress.String())
	}
	if len(res.Series) != len(lines) {
		t.Errorf("%d series entries, %d progress lines", len(res.Series), len(lines))
	}
}

// fixedLatencyServer answers every request exactly d after its handler
// starts (pace.Hold: a sleep on a pacer, the last 50 µs spun; a Go sleep
// would end up to a millisecond late). It does not spin the whole d: on a
// loaded machine a thread that burns its time slice waits behind the other
// processes, while one that mostly sleeps runs as soon as it wakes, and the
// server must keep its latency. A pacer that woke late would make the
// server late, which the test would see.
func fixedLatencyServer(t *testing.T, d time.Duration) string {
	t.Helper()
	hold := pace.NewHold(d, 16) // more than the test's connections
	t.Cleanup(hold.Close)
	return serveHandler(t, func(c *fasthttp.RequestCtx) {
		hold.Wait(time.Now())
		c.SetBodyString(`{"id":1}`)
	})
}

// TestKnownLatency: against a server that answers in exactly 1 ms, at a
// light load, both loops report what the server does: p50 within 0.1 ms of
// it and p99 within 0.5 ms. The open loop used to report about 0.5 ms more,
// the lateness of the Go timers its senders slept on.
//
// The bounds hold whenever the machine has a core for the generator. On a
// shared machine another process can hold both cores for milliseconds, so a
// run whose figures miss is repeated, up to a few times; an error in the
// generator is systematic and misses in every run.
//
// Short attempts, many of them: a burst of other work spoils the one it
// falls in, and the next may be clear of it.
//
// Under the race detector every read and write of the client and the server
// is instrumented, which adds 0.08 to 0.15 ms to the open loop's p50 on a
// quiet 2-core machine (1.17–1.22 ms, against 1.04–1.07 ms without it); the
// bounds then allow 0.2 ms more. Timer lateness, the error this test exists
// for, is 0.4 to 0.5 ms and still fails them.
func TestKnownLatency(t *testing.T) {
	const (
		d        = time.Millisecond
		attempts = 12
	)
	var slack time.Duration
	if raceEnabled {
		slack = 200 * time.Microsecond
	}
	p50, p99 := d+100*time.Microsecond+slack, d+500*time.Microsecond+slack
	url := fixedLatencyServer(t, d)
	for _, tc := range []struct {
		name  string
		rate  float64
		conns int
	}{
		// 8 senders at 400 req/s: each waits about 20 ms for its next
		// intended time, so every request is paced.
		{"open loop", 400, 8},
		// One connection: the server is busy 1 ms per request and the
		// generator in between.
		{"closed loop", 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := quickConfig(url)
			cfg.Rate, cfg.Connections = tc.rate, tc.conns
			// 800 samples (2 s of the open loop): the p99 is the 8th
			// slowest.
			cfg.Requests, cfg.Duration, cfg.Warmup = 800, 0, 300*time.Millisecond
			var misses []string
			for range attempts {
				res, err := Run(context.Background(), cfg, nil)
				if err != nil {
					t.Fatal(err)
				}
				if res.Total.Errors != 0 {
					t.Fatalf("errors %v, want none", res.Total.ErrorsByKind)
				}
				l := res.Total.Latency
				got := fmt.Sprintf("%d requests: p50 %.3fms p90 %.3fms p99 %.3fms max %.3fms", res.Total.Requests, l.P50, l.P90, l.P99, l.Max)
				if lag := res.ScheduleLag; lag != nil {
					got += fmt.Sprintf("; schedule lag p50 %.3fms p99 %.3fms", lag.P50, lag.P99)
				}
				t.Log(got)
				if l.P50 < msOf(d) {
					t.Fatalf("p50 = %.3fms, below the server's %v", l.P50, d)
				}
				if l.P50 <= msOf(p50) && l.P99 <= msOf(p99) {
					return
				}
				misses = append(misses, got)
			}
			t.Errorf("want p50 ≤ %v and p99 ≤ %v in one of %d runs, got:\n%s",
				p50, p99, attempts, strings.Join(misses, "\n"))
		})
	}
}

func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
