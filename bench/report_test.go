package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// sampled caches the result of one short run for the tests that only read it.
var sampled struct {
	sync.Once
	res *Result
}

// sampleResult returns (a copy of) the result of a short open-loop mixed
// run against the fake service, so every part of a Result is filled from a
// real run.
func sampleResult(t *testing.T) *Result {
	t.Helper()
	sampled.Do(func() {
		api := newFakeAPI(40)
		cfg := quickConfig(api.serve(t))
		cfg.Rate, cfg.Requests, cfg.Warmup, cfg.Duration = 1000, 0, 400*time.Millisecond, 1600*time.Millisecond
		cfg.Workload = Workload{Kind: "mixed", IDs: 1000, KeyDist: "zipf", ZipfS: 1.1, Mix: Mix{70, 10, 10, 10}, ListLimit: 10}
		res, err := Run(context.Background(), cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		if res.Total.Errors == 0 {
			t.Fatal("want some 404s (most ids do not exist) to fill the error parts")
		}
		sampled.res = res
	})
	if sampled.res == nil {
		t.Fatal("the sample run failed in an earlier test")
	}
	c := *sampled.res
	return &c
}

// checkReport parses page as XML (the report is written to be well-formed)
// and checks that it is self-contained and that every chart has data drawn.
// It returns the number of charts.
func checkReport(t *testing.T, page []byte) int {
	t.Helper()
	if !bytes.HasPrefix(page, []byte("<!DOCTYPE html>")) {
		t.Error("report does not start with <!DOCTYPE html>")
	}
	dec := xml.NewDecoder(bytes.NewReader(page))
	dec.Strict = true
	var (
		stack       []string
		charts      int
		chartData   int // data elements in the current chart
		emptyCharts int
		csp         bool
		scripts     int
	)
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("report is not well-formed: %v", err)
		}
		switch el := tok.(type) {
		case xml.StartElement:
			name := el.Name.Local
			stack = append(stack, name)
			attr := map[string]string{}
			for _, a := range el.Attr {
				attr[a.Name.Local] = a.Value
				v := strings.TrimSpace(strings.ToLower(a.Value))
				if a.Name.Local == "xmlns" {
					continue
				}
				if strings.HasPrefix(v, "http:") || strings.HasPrefix(v, "https:") || strings.HasPrefix(v, "//") {
					t.Errorf("<%s %s=%q>: external URL", name, a.Name.Local, a.Value)
				}
			}
			switch name {
			case "link", "img", "iframe", "object", "embed":
				t.Errorf("<%s> in a self-contained report", name)
			case "script":
				scripts++
				if _, ok := attr["src"]; ok {
					t.Error("<script src> in a self-contained report")
				}
			case "meta":
				if attr["http-equiv"] == "Content-Security-Policy" && strings.Contains(attr["content"], "default-src 'none'") {
					csp = true
				}
			case "svg":
				if strings.Contains(attr["class"], "chart") {
					charts++
					chartData = 0
				}
			case "path":
				if strings.Contains(attr["class"], "data") {
					d := attr["d"]
					if !strings.HasPrefix(d, "M") || len(d) < 4 {
						t.Errorf("data path with empty d=%q", d)
					}
					chartData++
				}
			case "rect":
				if strings.Contains(attr["class"], "data") {
					chartData++
				}
			}
		case xml.EndElement:
			if el.Name.Local == "svg" && chartData == 0 {
				emptyCharts++
			}
			stack = stack[:len(stack)-1]
		case xml.CharData:
			if len(stack) > 0 && stack[len(stack)-1] == "style" {
				css := strings.ToLower(string(el))
				if strings.Contains(css, "url(") || strings.Contains(css, "@import") {
					t.Error("CSS loads an external resource")
				}
			}
		}
	}
	if !csp {
		t.Error("no Content-Security-Policy with default-src 'none'")
	}
	if emptyCharts > 0 {
		t.Errorf("%d of %d charts have no data path or bar", emptyCharts, charts)
	}
	if scripts != 1 {
		t.Errorf("%d scripts, want the one inline chart check", scripts)
	}
	return charts
}

func TestReport(t *testing.T) {
	res := sampleResult(t)
	var b bytes.Buffer
	if err := WriteReport(&b, res); err != nil {
		t.Fatal(err)
	}
	page := b.Bytes()
	if got, want := checkReport(t, page), 5; got != want {
		t.Errorf("%d charts, want %d", got, want)
	}
	for _, want := range []string{
		"Throughput over time", "Latency over time", "Latency distribution", "Errors",
		"99.9%", "warm-up", res.Machine.GoVersion, res.Machine.GOOS, "404",
		"<td>read</td>", "<td>list</td>", "<td>update</td>", "<td>create</td>",
		"send lag p99", "<td>send lag</td>", // open loop: the card, the chart's line, the table
	} {
		if !bytes.Contains(page, []byte(want)) {
			t.Errorf("report lacks %q", want)
		}
	}
}

// TestReportEscapes: text from the run (the URL) is escaped, not markup.
func TestReportEscapes(t *testing.T) {
	res := sampleResult(t)
	res.Settings.URL = `http://127.0.0.1:1/<script>alert("x")</script>&`
	res.Machine.Hostname = `host"><b>`
	var b bytes.Buffer
	if err := WriteReport(&b, res); err != nil {
		t.Fatal(err)
	}
	checkReport(t, b.Bytes())
	if bytes.Contains(b.Bytes(), []byte(`<script>alert`)) || bytes.Contains(b.Bytes(), []byte(`"><b>`)) {
		t.Error("report does not escape run text")
	}
}

// TestReportEmptyRun: a run with no measured requests (server down) still
// renders a valid page.
func TestReportEmptyRun(t *testing.T) {
	cfg := quickConfig("http://" + freeTCPAddr(t))
	cfg.Requests, cfg.Connections = 5, 1
	res, err := Run(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := WriteReport(&b, res); err != nil {
		t.Fatal(err)
	}
	checkReport(t, b.Bytes())
}

func TestLadderReport(t *testing.T) {
	res := sampleLadder(t)
	var b bytes.Buffer
	if err := WriteLadderReport(&b, res); err != nil {
		t.Fatal(err)
	}
	page := b.Bytes()
	if got, want := checkReport(t, page), 4; got != want {
		t.Errorf("%d charts, want %d", got, want)
	}
	for _, s := range res.Steps {
		if !bytes.Contains(page, []byte(s.Name)) {
			t.Errorf("report lacks step %q", s.Name)
		}
	}
	for _, want := range []string{"skipped: needs --redis", "×"} {
		if !bytes.Contains(page, []byte(want)) {
			t.Errorf("report lacks %q", want)
		}
	}
}

// sampleLadder is a ladder result whose steps 1, 2, 4 and 5 ran (the same
// run, scaled) and step 3 was skipped.
func sampleLadder(t *testing.T) *LadderResult {
	t.Helper()
	base := sampleResult(t)
	res := &LadderResult{Schema: LadderSchema, DB: "postgres://bench@127.0.0.1/db", Settings: base.Settings, Machine: base.Machine, StartedAt: base.StartedAt}
	res.Settings.URL = ""
	scale := []float64{0.02, 1, 0, 1.4, 1.7}
	first, prev := 0.0, 0.0
	for i, s := range LadderSteps() {
		sr := StepResult{Step: i + 1, Name: s.Name, Change: s.Change, Flags: s.Flags, Status: StepSkipped, Note: "needs --redis"}
		if scale[i] > 0 {
			r := *base
			r.Total.RequestsPerSec *= scale[i]
			rps := r.Total.RequestsPerSec
			if first == 0 {
				first = rps
			} else {
				sr.Gain = rps / prev
			}
			sr.Status, sr.Note, sr.Result, sr.GainOverFirst = StepRan, "", &r, rps/first
			prev = rps
		}
		res.Steps = append(res.Steps, sr)
	}
	return res
}

// jsonSchema lists the paths and JSON types of v ("total.latency_ms.p50
// number"); arrays contribute "[]" and maps keyed by data "{}".
func jsonSchema(t *testing.T, v any) string {
	t.Helper()
	raw, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var doc any
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	dataKeyed := map[string]bool{"statuses": true, "errors_by_kind": true}
	seen := map[string]bool{}
	var walk func(path, key string, v any)
	walk = func(path, key string, v any) {
		switch x := v.(type) {
		case map[string]any:
			if dataKeyed[key] {
				seen[path+" map of number"] = true
				return
			}
			seen[path+" object"] = true
			for k, vv := range x {
				walk(strings.TrimPrefix(path+"."+k, "."), k, vv)
			}
		case []any:
			seen[path+" array"] = true
			for _, vv := range x {
				walk(path+"[]", key, vv)
			}
		case string:
			seen[path+" string"] = true
		case float64:
			seen[path+" number"] = true
		case bool:
			seen[path+" bool"] = true
		case nil:
			seen[path+" null"] = true
		}
	}
	walk("", "", doc)
	lines := make([]string, 0, len(seen))
	for l := range seen {
		lines = append(lines, strings.TrimSpace(l))
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n") + "\n"
}

func checkGolden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("JSON schema changed; if on purpose, bump the schema version and run go test -update.\n%s", lineDiff(string(want), got))
	}
}

func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for _, l := range w {
		if !slices.Contains(g, l) {
			fmt.Fprintf(&b, "- %s\n", l)
		}
	}
	for _, l := range g {
		if !slices.Contains(w, l) {
			fmt.Fprintf(&b, "+ %s\n", l)
		}
	}
	return b.String()
}

// TestJSONSchema pins the --json layout: scripts parse it, so fields are
// only added, never renamed or retyped, without a new schema version.
func TestJSONSchema(t *testing.T) {
	res := sampleResult(t)
	if res.Schema != SchemaVersion {
		t.Errorf("schema = %q, want %q", res.Schema, SchemaVersion)
	}
	checkGolden(t, "result.schema", jsonSchema(t, res))
	lad := sampleLadder(t)
	checkGolden(t, "ladder.schema", jsonSchema(t, lad))

	// WriteJSON output decodes back to the same numbers.
	var b bytes.Buffer
	if err := WriteJSON(&b, res); err != nil {
		t.Fatal(err)
	}
	var back Result
	if err := json.Unmarshal(b.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if back.Total.Requests != res.Total.Requests || back.Total.Latency != res.Total.Latency {
		t.Errorf("JSON round trip changed the totals: %+v vs %+v", back.Total, res.Total)
	}
}

func TestTable(t *testing.T) {
	res := sampleResult(t)
	var b bytes.Buffer
	if err := WriteTable(&b, res); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"open loop at 1000 req/s", "read", "list", "update", "create", "all", "errors: 404 ×"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	// The open loop's send lag is a row beside the latencies: p50, p90,
	// p99, p99.9 and max.
	var lagRow []string
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) > 2 && f[0] == "send" && f[1] == "lag" {
			lagRow = f[2:]
		}
	}
	if len(lagRow) != 5 {
		t.Errorf("send lag row %q, want 5 durations:\n%s", lagRow, out)
	}
}
