package bench

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// SchemaVersion names the JSON layout of Result. Fields are only ever added
// under the same name; a change of meaning gets a new version.
const SchemaVersion = "userapi.bench/v2"

// Result is the outcome of one run. It is what --json prints.
type Result struct {
	Schema    string    `json:"schema"`
	Settings  Settings  `json:"settings"`
	Machine   Machine   `json:"machine"`
	StartedAt time.Time `json:"started_at"`
	// MeasuredSeconds is the measured window: from the first measured
	// request's start to the last one's completion.
	MeasuredSeconds float64 `json:"measured_seconds"`
	// Canceled is set when the run was interrupted before its bound.
	Canceled bool `json:"canceled"`
	// Total is every measured request; Operations splits it by operation
	// (only operations of the mix, in the order read, list, update, create).
	Total      Stats   `json:"total"`
	Operations []Stats `json:"operations"`
	// Unsent (open loop) counts scheduled measured requests that were never
	// sent because the senders were still behind a timeout after the end of
	// the schedule. They are also counted in Total.Errors as "unsent".
	Unsent int64 `json:"unsent"`
	// ScheduleLag (open loop) is how late the measured requests were sent
	// relative to their intended time: the wait for a free connection when
	// all were busy, plus the generator's own lateness. It is part of every
	// latency. A lag near zero means the requests left on schedule; a large
	// lag while the server is fast means the generator (or too few
	// connections), not the server, is the limit.
	ScheduleLag *Latency `json:"schedule_lag_ms,omitempty"`
	// Series has one entry per second of the run, warm-up included.
	Series []Second `json:"series"`
}

// Settings are the run's parameters.
type Settings struct {
	URL             string  `json:"url"`
	Mode            Mode    `json:"mode"`
	Connections     int     `json:"connections"`
	Rate            float64 `json:"rate"` // requests/s in the open loop, 0 in the closed loop
	DurationSeconds float64 `json:"duration_seconds"`
	Requests        int64   `json:"requests"`
	WarmupSeconds   float64 `json:"warmup_seconds"`
	TimeoutSeconds  float64 `json:"timeout_seconds"`
	Workload        string  `json:"workload"`
	KeyDist         string  `json:"key_dist"`
	ZipfS           float64 `json:"zipf_s"`
	IDs             int64   `json:"ids"`
	Mix             string  `json:"mix"`
	ListLimit       int     `json:"list_limit"`
	Seed            uint64  `json:"seed"`
}

// Machine describes where the load generator ran.
type Machine struct {
	GOOS      string `json:"goos"`
	GOARCH    string `json:"goarch"`
	CPUs      int    `json:"cpus"`
	CPUModel  string `json:"cpu_model"`
	GoVersion string `json:"go_version"`
	Hostname  string `json:"hostname"`
}

// Stats summarizes the measured requests of one operation (or "all").
type Stats struct {
	Op string `json:"op"`
	// Requests counts every measured request that completed or failed;
	// OK + Conflicts + Errors = Requests, except that the total's Errors
	// also counts the open loop's unsent requests, which were never sent.
	Requests  int64 `json:"requests"`
	OK        int64 `json:"ok"`
	Conflicts int64 `json:"conflicts"` // 412 on updates: lost a race, as expected under concurrency
	Errors    int64 `json:"errors"`
	// RequestsPerSec is Requests over the measured window.
	RequestsPerSec float64 `json:"requests_per_sec"`
	// Latency covers every answered request and every timeout.
	Latency Latency `json:"latency_ms"`
	// Statuses counts responses by HTTP status code.
	Statuses map[string]int64 `json:"statuses"`
	// LatencyByStatus is Latency for the responses of each status code
	// alone: under overload, the admitted requests' and the refused
	// ones' (429, 503) latencies are what matter, and they differ.
	LatencyByStatus map[string]Latency `json:"latency_by_status_ms"`
	// ErrorsByKind counts errors by status code ("404", "503") or by
	// transport failure ("timeout", "connection", "other", "unsent").
	ErrorsByKind map[string]int64 `json:"errors_by_kind"`
	// Spectrum is the latency at percentiles from 0 to 100, dense in the
	// tail: the percentile distribution plot of HdrHistogram.
	Spectrum []Point `json:"spectrum"`
}

// Latency is a latency summary in milliseconds.
type Latency struct {
	Mean float64 `json:"mean"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
}

// Point is one point of a percentile spectrum.
type Point struct {
	Percentile float64 `json:"percentile"`
	Ms         float64 `json:"ms"`
}

// Second is one second of the run.
type Second struct {
	T              float64 `json:"t"`      // end of the interval, seconds since the start
	Warmup         bool    `json:"warmup"` // the interval began in the warm-up
	Requests       int64   `json:"requests"`
	RequestsPerSec float64 `json:"requests_per_sec"`
	P50            float64 `json:"p50_ms"`
	P99            float64 `json:"p99_ms"`
	Max            float64 `json:"max_ms"`
	Errors         int64   `json:"errors"`
	// LagP99 is the 99th percentile of the schedule lag of the requests
	// completed in the interval (open loop; 0 in the closed loop).
	LagP99 float64 `json:"lag_p99_ms"`
}

// Histogram bounds, in microseconds: 1 µs resolution below 2 ms (three
// significant digits), and up to an hour, since open-loop latency includes
// queueing behind a stalled server and can far exceed the request timeout.
const (
	histMax    = int64(time.Hour / time.Microsecond)
	histDigits = 3
)

func newHist() *hdrhistogram.Histogram { return hdrhistogram.New(1, histMax, histDigits) }

func recordUS(h *hdrhistogram.Histogram, ns int64) {
	us := max(ns/int64(time.Microsecond), 0)
	_ = h.RecordValue(min(us, histMax)) // cannot fail inside the bounds
}

// opAgg accumulates one operation's measured samples.
type opAgg struct {
	hist                            *hdrhistogram.Histogram
	maxNS                           int64 // exact maximum, the histogram's is rounded
	requests, ok, conflicts, errors int64
	statuses                        map[int]int64
	byStatus                        map[int]*hdrhistogram.Histogram
	errKinds                        map[string]int64
}

func newOpAgg() *opAgg {
	return &opAgg{hist: newHist(), statuses: map[int]int64{}, byStatus: map[int]*hdrhistogram.Histogram{}, errKinds: map[string]int64{}}
}

// statusHist is the latency histogram of status code's responses.
func (a *opAgg) statusHist(code int) *hdrhistogram.Histogram {
	h := a.byStatus[code]
	if h == nil {
		h = newHist()
		a.byStatus[code] = h
	}
	return h
}

// collector turns samples into the results. Only the goroutine of Run uses
// it, so it needs no lock.
type collector struct {
	cfg       *Config
	startedAt time.Time
	warm      int64
	progress  io.Writer

	ops [numOps]*opAgg
	lag *hdrhistogram.Histogram

	// The current second, and the one before (see tick). secLag and
	// prevLag hold the schedule lag, in the open loop only.
	sec, secLag, prevLag             *hdrhistogram.Histogram
	secMaxNS, secCount, secErrors    int64
	lastTick                         int64
	prev                             *hdrhistogram.Histogram
	prevMaxNS, prevCount, prevErrors int64
	prevFrom                         int64

	first, last int64 // measured window, ns since the start
	series      []Second
}

func newCollector(cfg *Config, progress io.Writer) *collector {
	c := &collector{cfg: cfg, warm: int64(cfg.Warmup), progress: progress, sec: newHist(), prev: newHist(), first: math.MaxInt64}
	for op := range numOps {
		c.ops[op] = newOpAgg()
	}
	if cfg.Mode() == OpenLoop {
		c.lag, c.secLag, c.prevLag = newHist(), newHist(), newHist()
	}
	return c
}

func transportKind(o outcome) string {
	switch o {
	case outTimeout:
		return "timeout"
	case outConnError:
		return "connection"
	}
	return "other"
}

func (c *collector) add(s sample) {
	lat := s.done - s.start
	c.secCount++
	if s.out.isError() {
		c.secErrors++
	}
	if s.out.recordsLatency() {
		recordUS(c.sec, lat)
		c.secMaxNS = max(c.secMaxNS, lat)
	}
	if c.secLag != nil {
		recordUS(c.secLag, s.sent-s.start)
	}
	if s.start < c.warm {
		return
	}
	c.first = min(c.first, s.start)
	c.last = max(c.last, s.done)
	a := c.ops[s.op]
	a.requests++
	if s.status != 0 {
		a.statuses[int(s.status)]++
	}
	switch s.out {
	case outOK:
		a.ok++
	case outConflict:
		a.conflicts++
	case outHTTPError:
		a.errors++
		a.errKinds[strconv.Itoa(int(s.status))]++
	default:
		a.errors++
		a.errKinds[transportKind(s.out)]++
	}
	if s.out.recordsLatency() {
		recordUS(a.hist, lat)
		a.maxNS = max(a.maxNS, lat)
		if s.status != 0 {
			recordUS(a.statusHist(int(s.status)), lat)
		}
	}
	if c.lag != nil {
		recordUS(c.lag, s.sent-s.start)
	}
}

// tick closes the current second at now (ns since the start). The final
// tick, at the end of the run, closes a partial interval: when it is under
// half a second (the in-flight requests finishing), it is folded into the
// last second rather than drawn as a second of its own with a misleadingly
// low rate.
func (c *collector) tick(now int64, final bool) {
	span := now - c.lastTick
	if span <= 0 || (c.secCount == 0 && final) {
		return
	}
	from := c.lastTick
	merged := final && span < int64(time.Second/2) && len(c.series) > 0
	if merged {
		c.prev.Merge(c.sec)
		c.sec.Reset()
		if c.secLag != nil {
			c.prevLag.Merge(c.secLag)
			c.secLag.Reset()
			c.secLag, c.prevLag = c.prevLag, c.secLag
		}
		c.secCount += c.prevCount
		c.secErrors += c.prevErrors
		c.secMaxNS = max(c.secMaxNS, c.prevMaxNS)
		c.sec, c.prev = c.prev, c.sec
		c.series = c.series[:len(c.series)-1]
		from = c.prevFrom
	}
	s := Second{
		T:              float64(now) / float64(time.Second),
		Warmup:         from < c.warm,
		Requests:       c.secCount,
		RequestsPerSec: float64(c.secCount) / (float64(now-from) / float64(time.Second)),
		P50:            usToMs(c.sec.ValueAtPercentile(50)),
		P99:            usToMs(c.sec.ValueAtPercentile(99)),
		Max:            nsToMs(c.secMaxNS),
		Errors:         c.secErrors,
	}
	if c.secLag != nil {
		s.LagP99 = usToMs(c.secLag.ValueAtPercentile(99))
	}
	c.series = append(c.series, s)
	if c.progress != nil && !merged {
		phase := ""
		if s.Warmup {
			phase = "  (warm-up)"
		}
		lag := ""
		if c.secLag != nil {
			lag = "   send lag p99 " + fmtMs(s.LagP99)
		}
		fmt.Fprintf(c.progress, "%5.0fs %10.0f req/s   p50 %s   p99 %s%s   errors %d%s\n",
			s.T, s.RequestsPerSec, fmtMs(s.P50), fmtMs(s.P99), lag, s.Errors, phase)
	}
	// Keep this second's histogram as prev, in case the final tick folds
	// into it, and start the next one empty.
	c.sec, c.prev = c.prev, c.sec
	c.sec.Reset()
	if c.secLag != nil {
		c.secLag, c.prevLag = c.prevLag, c.secLag
		c.secLag.Reset()
	}
	c.prevCount, c.prevErrors, c.prevMaxNS, c.prevFrom = c.secCount, c.secErrors, c.secMaxNS, from
	c.secMaxNS, c.secCount, c.secErrors = 0, 0, 0
	c.lastTick = now
}

func usToMs(us int64) float64 { return float64(us) / 1000 }
func nsToMs(ns int64) float64 { return float64(ns) / float64(time.Millisecond) }

// spectrumPercentiles are the percentiles of the spectrum: five steps per
// halving of the remaining tail, from 0 to 99.9999, then 100.
func spectrumPercentiles() []float64 {
	var ps []float64
	for i := 0; ; i++ {
		p := 100 * (1 - math.Pow(0.5, float64(i)/5))
		if p > 99.9999 {
			break
		}
		ps = append(ps, p)
	}
	return append(ps, 100)
}

func (a *opAgg) stats(name string, seconds float64) Stats {
	st := Stats{
		Op: name, Requests: a.requests, OK: a.ok, Conflicts: a.conflicts, Errors: a.errors,
		Statuses: map[string]int64{}, ErrorsByKind: map[string]int64{}, Spectrum: []Point{},
		LatencyByStatus: map[string]Latency{},
	}
	for code, h := range a.byStatus {
		st.LatencyByStatus[strconv.Itoa(code)] = latencyOf(h)
	}
	if seconds > 0 {
		st.RequestsPerSec = float64(a.requests) / seconds
	}
	for code, n := range a.statuses {
		st.Statuses[strconv.Itoa(code)] = n
	}
	for k, n := range a.errKinds {
		st.ErrorsByKind[k] = n
	}
	h := a.hist
	st.Latency = latencyOf(h)
	st.Latency.Max = nsToMs(a.maxNS)
	if n := h.TotalCount(); n > 0 {
		for _, p := range spectrumPercentiles() {
			// Beyond 1/n of the tail the histogram has nothing new to say.
			if p < 100 && (100-p)/100 < 1/float64(n) {
				continue
			}
			ms := usToMs(h.ValueAtPercentile(p))
			if p == 100 {
				ms = st.Latency.Max
			}
			st.Spectrum = append(st.Spectrum, Point{Percentile: p, Ms: ms})
		}
	}
	return st
}

func latencyOf(h *hdrhistogram.Histogram) Latency {
	if h.TotalCount() == 0 {
		return Latency{}
	}
	return Latency{
		Mean: h.Mean() / 1000,
		P50:  usToMs(h.ValueAtPercentile(50)),
		P90:  usToMs(h.ValueAtPercentile(90)),
		P99:  usToMs(h.ValueAtPercentile(99)),
		P999: usToMs(h.ValueAtPercentile(99.9)),
		Max:  usToMs(h.Max()),
	}
}

func (c *collector) result() *Result {
	cfg := c.cfg
	res := &Result{
		Schema: SchemaVersion,
		Settings: Settings{
			URL: cfg.URL, Mode: cfg.Mode(), Connections: cfg.Connections, Rate: cfg.Rate,
			DurationSeconds: cfg.Duration.Seconds(), Requests: cfg.Requests,
			WarmupSeconds: cfg.Warmup.Seconds(), TimeoutSeconds: cfg.Timeout.Seconds(),
			Workload: cfg.Workload.Kind, KeyDist: cfg.Workload.KeyDist, ZipfS: cfg.Workload.ZipfS,
			IDs: cfg.Workload.IDs, Mix: cfg.Workload.Mix.String(), ListLimit: cfg.Workload.ListLimit,
			Seed: cfg.Seed,
		},
		Machine:    machineFacts(),
		StartedAt:  c.startedAt.UTC(),
		Series:     c.series,
		Operations: []Stats{},
	}
	if res.Series == nil {
		res.Series = []Second{}
	}
	if c.last > c.first {
		res.MeasuredSeconds = float64(c.last-c.first) / float64(time.Second)
	}
	all := newOpAgg()
	for op := range numOps {
		a := c.ops[op]
		if cfg.Workload.Mix[op] == 0 && a.requests == 0 {
			continue
		}
		res.Operations = append(res.Operations, a.stats(op.String(), res.MeasuredSeconds))
		all.hist.Merge(a.hist)
		all.maxNS = max(all.maxNS, a.maxNS)
		all.requests += a.requests
		all.ok += a.ok
		all.conflicts += a.conflicts
		all.errors += a.errors
		for k, n := range a.statuses {
			all.statuses[k] += n
		}
		for k, h := range a.byStatus {
			all.statusHist(k).Merge(h)
		}
		for k, n := range a.errKinds {
			all.errKinds[k] += n
		}
	}
	res.Total = all.stats("all", res.MeasuredSeconds)
	if c.lag != nil {
		l := latencyOf(c.lag)
		res.ScheduleLag = &l
	}
	return res
}

func machineFacts() Machine {
	host, _ := os.Hostname()
	return Machine{
		GOOS: runtime.GOOS, GOARCH: runtime.GOARCH, CPUs: runtime.NumCPU(),
		CPUModel: cpuModel(), GoVersion: runtime.Version(), Hostname: host,
	}
}

// cpuModel returns the first "model name" of /proc/cpuinfo, or "" where
// there is none.
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// WriteJSON writes res as indented JSON.
func WriteJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("write JSON: %w", err)
	}
	return nil
}

// fmtMs formats milliseconds with a precision that suits their size.
func fmtMs(ms float64) string {
	switch {
	case ms >= 1000:
		return strconv.FormatFloat(ms/1000, 'f', 2, 64) + "s"
	case ms >= 100:
		return strconv.FormatFloat(ms, 'f', 0, 64) + "ms"
	case ms >= 10:
		return strconv.FormatFloat(ms, 'f', 1, 64) + "ms"
	}
	return strconv.FormatFloat(ms, 'f', 2, 64) + "ms"
}

// describe is the one-line summary of the settings.
func (s *Settings) describe() string {
	var b strings.Builder
	if s.Mode == OpenLoop {
		fmt.Fprintf(&b, "open loop at %g req/s over %d connections", s.Rate, s.Connections)
	} else {
		fmt.Fprintf(&b, "closed loop, %d connections", s.Connections)
	}
	switch {
	case s.DurationSeconds > 0 && s.Requests > 0:
		fmt.Fprintf(&b, ", %gs or %d requests", s.DurationSeconds, s.Requests)
	case s.Requests > 0:
		fmt.Fprintf(&b, ", %d requests", s.Requests)
	default:
		fmt.Fprintf(&b, ", %gs", s.DurationSeconds)
	}
	fmt.Fprintf(&b, " after %gs warm-up; workload %s", s.WarmupSeconds, s.Workload)
	if s.Workload == "mixed" {
		fmt.Fprintf(&b, " (%s)", s.Mix)
	}
	fmt.Fprintf(&b, ", ids 1..%d %s", s.IDs, s.KeyDist)
	if s.KeyDist == "zipf" {
		fmt.Fprintf(&b, " s=%g", s.ZipfS)
	}
	return b.String()
}

// errorSummary formats errors by kind, most frequent first.
func errorSummary(m map[string]int64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int {
		if m[a] != m[b] {
			if m[a] > m[b] {
				return -1
			}
			return 1
		}
		return strings.Compare(a, b)
	})
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s ×%d", k, m[k])
	}
	return strings.Join(parts, ", ")
}

// WriteTable writes the human-readable summary of res.
func WriteTable(w io.Writer, res *Result) error {
	bw := bufio.NewWriter(w)
	fmt.Fprintf(bw, "userapi bench %s\n%s\n", res.Settings.URL, res.Settings.describe())
	if res.Canceled {
		fmt.Fprintln(bw, "interrupted: partial results")
	}
	fmt.Fprintf(bw, "measured %.2fs\n\n", res.MeasuredSeconds)
	tw := tabwriter.NewWriter(bw, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "op\trequests\treq/s\tp50\tp90\tp99\tp99.9\tmax\terrors\t412\t")
	// One operation is the total (apart from unsent requests, listed below).
	rows := slices.Clone(res.Operations)
	if len(rows) != 1 {
		rows = append(rows, res.Total)
	}
	for _, st := range rows {
		l := st.Latency
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t\n", st.Op, st.Requests, st.RequestsPerSec,
			fmtMs(l.P50), fmtMs(l.P90), fmtMs(l.P99), fmtMs(l.P999), fmtMs(l.Max), st.Errors, st.Conflicts)
	}
	if l := res.ScheduleLag; l != nil {
		fmt.Fprintf(tw, "send lag\t\t\t%s\t%s\t%s\t%s\t%s\t\t\t\n",
			fmtMs(l.P50), fmtMs(l.P90), fmtMs(l.P99), fmtMs(l.P999), fmtMs(l.Max))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write table: %w", err)
	}
	if len(res.Total.ErrorsByKind) > 0 {
		fmt.Fprintf(bw, "\nerrors: %s\n", errorSummary(res.Total.ErrorsByKind))
	}
	if res.ScheduleLag != nil {
		fmt.Fprintln(bw, "send lag: how late requests left after their intended send time (waiting for a free")
		fmt.Fprintln(bw, "connection, and the generator's own lateness); it is part of every latency above")
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write table: %w", err)
	}
	return nil
}
