// Package bench is the load generator behind `userapi bench`.
//
// It sends HTTP load to a userapi base URL in one of two modes:
//
//   - closed loop (the default): N connections, one goroutine each, every
//     goroutine sends its next request as soon as the previous one is
//     answered;
//   - open loop (--rate): requests follow a fixed schedule of intended send
//     times, and each latency is measured from the intended time, not from the
//     moment a free connection finally sent it. A stalled server therefore
//     shows its queueing delay in the percentiles instead of hiding it
//     (no coordinated omission).
//
// Latencies go into HDR histograms per operation. The results are printed as
// a table or as JSON (schema "userapi.bench/v2"), and optionally as one
// self-contained HTML report with inline SVG charts that opens offline.
//
// `userapi bench ladder` starts the service once per optimization step (no
// pool, pool, Redis cache-aside, local tier, coalescing), runs the same
// workload against each, and shows the steps side by side.
package bench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"
)

// ErrUsage is wrapped by the errors Main returns for bad command lines; the
// command exits with status 2 on it. The usage text has already been printed
// to stderr.
var ErrUsage = errors.New("usage error")

// Mode is how requests are paced.
type Mode string

// The pacing modes.
const (
	ClosedLoop Mode = "closed" // each connection sends as fast as answers come back
	OpenLoop   Mode = "open"   // a fixed schedule of intended send times
)

// Config is one benchmark run.
type Config struct {
	// URL is the service's base URL, such as http://127.0.0.1:8080. Requests
	// go only to its host; a path in it is a prefix of every route.
	URL string

	// Connections is the number of keep-alive connections, one goroutine
	// each. In the open loop they are the senders that work through the
	// schedule; when all are busy the schedule keeps running and the delay
	// counts as latency.
	Connections int

	// Rate, when > 0, selects the open loop with this many requests per
	// second in total. 0 is the closed loop.
	Rate float64

	// Duration bounds the measured part of the run (after Warmup).
	// Requests, when > 0, bounds the number of measured requests; with both
	// set the run ends at whichever comes first.
	Duration time.Duration
	Requests int64

	// Warmup is sent before the measured part and left out of the results
	// (it still appears, marked, in the per-second series).
	Warmup time.Duration

	// Timeout bounds every request (write and read). A timed-out request is
	// an error of kind "timeout" and its waiting time counts as latency.
	Timeout time.Duration

	Workload Workload

	// Seed makes the random choices of a run repeatable; 0 picks one.
	Seed uint64

	// Headers are sent with every request: the credential of a service
	// with authentication on (--api-key K is Authorization: Bearer K), or
	// anything else a test needs (--header).
	Headers []Header
}

// Header is one request header of Config.Headers.
type Header struct{ Name, Value string }

// parseHeader parses "Name: value".
func parseHeader(s string) (Header, error) {
	name, value, ok := strings.Cut(s, ":")
	name, value = strings.TrimSpace(name), strings.TrimSpace(value)
	if !ok || name == "" || strings.ContainsAny(name, " \t\r\n") || strings.ContainsAny(value, "\r\n") {
		return Header{}, fmt.Errorf("--header %q: want 'Name: value'", s)
	}
	return Header{name, value}, nil
}

// Defaults of the command line, chosen for a quick but meaningful run on a
// small machine: 64 connections saturate a 2-core server without drowning
// it, 10 s gives thousands of samples per second for stable tail
// percentiles, and 2 s of warm-up covers connection set-up and the first
// cache fills.
const (
	DefaultConnections = 64
	DefaultDuration    = 10 * time.Second
	DefaultWarmup      = 2 * time.Second
	// DefaultTimeout is far above any healthy latency, so it only fires on a
	// stalled server, and short enough that a run always ends.
	DefaultTimeout = 10 * time.Second
	DefaultIDs     = 100_000
	DefaultZipfS   = 1.1
	DefaultMix     = "read=80,list=5,update=10,create=5"
)

// Validate checks c and fills in derived defaults.
func (c *Config) Validate() error {
	u, err := url.Parse(c.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("URL %q: want http://host:port", c.URL)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return fmt.Errorf("URL %q: must not have a query or fragment", c.URL)
	}
	switch {
	case c.Connections < 1:
		return fmt.Errorf("--connections must be at least 1")
	case c.Rate < 0:
		return fmt.Errorf("--rate must not be negative")
	case c.Duration < 0 || c.Warmup < 0 || c.Requests < 0:
		return fmt.Errorf("--duration, --warmup and --requests must not be negative")
	case c.Duration == 0 && c.Requests == 0:
		return fmt.Errorf("one of --duration and --requests must be set")
	case c.Timeout <= 0:
		return fmt.Errorf("--timeout must be positive")
	}
	return c.Workload.validate()
}

// Mode reports the pacing mode of c.
func (c *Config) Mode() Mode {
	if c.Rate > 0 {
		return OpenLoop
	}
	return ClosedLoop
}

// Main runs `userapi bench ARGS…` (args are what follows "bench"):
// `ladder …` runs the ladder, anything else one benchmark. The table (or the
// JSON with --json) goes to stdout, progress and notes to stderr.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "ladder" {
		return ladderMain(ctx, args[1:], stdout, stderr)
	}
	var (
		cfg     Config
		opts    outputFlags
		mix     string
		keyDist string
	)
	fs := flag.NewFlagSet("userapi bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, "usage: userapi bench URL [flags]\n       userapi bench ladder --db URL [--redis URL] [flags]\n\nflags:\n")
		fs.PrintDefaults()
	}
	addRunFlags(fs, &cfg, &mix, &keyDist)
	addOutputFlags(fs, &opts)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return usageErr(err)
	}
	if len(pos) != 1 {
		fs.Usage()
		return usageErr(fmt.Errorf("want exactly one URL, got %d arguments", len(pos)))
	}
	cfg.URL = pos[0]
	if err := finishRunFlags(fs, &cfg, mix, keyDist); err != nil {
		fmt.Fprintln(stderr, "userapi bench:", err)
		return usageErr(err)
	}
	if err := cfg.Validate(); err != nil {
		fmt.Fprintln(stderr, "userapi bench:", err)
		return usageErr(err)
	}
	var progress io.Writer = stderr
	if opts.quiet {
		progress = nil
	}
	res, err := Run(ctx, cfg, progress)
	if err != nil {
		return err
	}
	if opts.report != "" {
		if err := writeFile(opts.report, func(w io.Writer) error { return WriteReport(w, res) }); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "report written to %s\n", opts.report)
	}
	if opts.json {
		return WriteJSON(stdout, res)
	}
	return WriteTable(stdout, res)
}

// outputFlags are the flags about what is written, shared by bench and ladder.
type outputFlags struct {
	json   bool
	report string
	quiet  bool
}

func addOutputFlags(fs *flag.FlagSet, o *outputFlags) {
	fs.BoolVar(&o.json, "json", false, "print the results as JSON on stdout instead of a table")
	fs.StringVar(&o.report, "report", "", "write a self-contained HTML report to this `file`")
	fs.BoolVar(&o.quiet, "quiet", false, "no progress lines on stderr")
}

func addRunFlags(fs *flag.FlagSet, c *Config, mix, keyDist *string) {
	fs.IntVar(&c.Connections, "connections", DefaultConnections, "keep-alive connections, one sender each")
	fs.Float64Var(&c.Rate, "rate", 0, "open loop at this many requests/s in total (0 = closed loop)")
	fs.DurationVar(&c.Duration, "duration", DefaultDuration, "measured duration after the warm-up (0 = bounded by --requests only)")
	fs.Int64Var(&c.Requests, "requests", 0, "stop after this many measured requests (0 = bounded by --duration only)")
	fs.DurationVar(&c.Warmup, "warmup", DefaultWarmup, "load sent first and left out of the results")
	fs.DurationVar(&c.Timeout, "timeout", DefaultTimeout, "per-request timeout")
	fs.StringVar(&c.Workload.Kind, "workload", "uniform", "uniform | zipf | mixed")
	fs.Float64Var(&c.Workload.ZipfS, "zipf-s", DefaultZipfS, "Zipf exponent s (> 1; larger is more skewed)")
	fs.Int64Var(&c.Workload.IDs, "ids", DefaultIDs, "user ids 1..N are expected to exist (the seeded range)")
	fs.StringVar(mix, "mix", DefaultMix, "operation weights of the mixed workload")
	fs.StringVar(keyDist, "key-dist", "", "how ids are drawn: uniform | zipf (default: zipf for --workload zipf, else uniform)")
	fs.IntVar(&c.Workload.ListLimit, "list-limit", 50, "page size of list requests in the mixed workload")
	fs.Uint64Var(&c.Seed, "seed", 0, "random seed for repeatable runs (0 = random)")
	fs.Func("api-key", "send this API key (or bearer token) as Authorization: Bearer …", func(key string) error {
		if key == "" || strings.ContainsAny(key, " \r\n") {
			return fmt.Errorf("not a credential")
		}
		c.Headers = append(c.Headers, Header{"Authorization", "Bearer " + key})
		return nil
	})
	fs.Func("header", "send this header with every request, as 'Name: value' (repeatable)", func(s string) error {
		h, err := parseHeader(s)
		if err == nil {
			c.Headers = append(c.Headers, h)
		}
		return err
	})
}

// finishRunFlags turns the raw flag values into the workload: the mix and the
// key distribution depend on the workload kind.
func finishRunFlags(fs *flag.FlagSet, c *Config, mix, keyDist string) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["requests"] && !set["duration"] {
		c.Duration = 0 // --requests alone bounds the run by count
	}
	w := &c.Workload
	switch w.Kind {
	case "uniform", "zipf":
		if set["mix"] {
			return fmt.Errorf("--mix applies to --workload mixed only")
		}
		w.Mix = Mix{OpRead: 1}
	case "mixed":
		m, err := ParseMix(mix)
		if err != nil {
			return err
		}
		w.Mix = m
	}
	w.KeyDist = keyDist
	if w.KeyDist == "" {
		w.KeyDist = "uniform"
		if w.Kind == "zipf" {
			w.KeyDist = "zipf"
		}
	}
	return nil
}

// parseInterleaved parses flags that may come before and after positional
// arguments (`bench URL --connections 8` and `bench --connections 8 URL`).
func parseInterleaved(fs *flag.FlagSet, args []string) (positional []string, err error) {
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, nil
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

func usageErr(err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	return fmt.Errorf("bench: %w: %w", ErrUsage, err)
}

// writeFile writes a file through write, reporting the first error of
// writing or closing.
func writeFile(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	if err := write(f); err != nil {
		f.Close()
		return fmt.Errorf("write report %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write report %s: %w", path, err)
	}
	return nil
}
