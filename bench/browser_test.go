package bench

import (
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestReportInBrowser opens the reports in a real headless browser (Debian's
// chromium) with the network cut off, and checks that they render with no
// console message at all (no script error, no blocked resource) and that
// the browser laid out data in every chart: the report's inline script
// measures each chart's data paths and bars with getBBox and records the
// count on <html>, which --dump-dom returns.
//
// It runs when USERAPI_TEST_BROWSER=1 and then fails if chromium is
// missing. With USERAPI_TEST_SCREENSHOT_DIR set, screenshots are kept
// there for a person to look at.
func TestReportInBrowser(t *testing.T) {
	if os.Getenv("USERAPI_TEST_BROWSER") != "1" {
		t.Skip("set USERAPI_TEST_BROWSER=1 to render the reports in headless chromium")
	}
	bin := ""
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			bin = p
			break
		}
	}
	if bin == "" {
		t.Fatal("USERAPI_TEST_BROWSER=1 but no chromium on PATH (apt-get install -y chromium)")
	}
	for _, tc := range []struct {
		name   string
		charts int
		write  func(io.Writer) error
	}{
		{"run", 5, func(w io.Writer) error { return WriteReport(w, sampleResult(t)) }},
		{"ladder", 4, func(w io.Writer) error { return WriteLadderReport(w, sampleLadder(t)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			page := filepath.Join(dir, tc.name+".html")
			if err := writeFile(page, tc.write); err != nil {
				t.Fatal(err)
			}
			dom, logs := chromium(t, bin, "--dump-dom", "file://"+page)
			checkConsole(t, logs)
			charts := attrInt(t, dom, "data-charts")
			drawn := attrInt(t, dom, "data-charts-drawn")
			if charts != tc.charts || drawn != charts {
				t.Errorf("browser saw %d charts with data drawn in %d; want %d and %d", charts, drawn, tc.charts, tc.charts)
			}

			shot := filepath.Join(dir, tc.name+".png")
			_, logs = chromium(t, bin, "--screenshot="+shot, "--window-size=1280,3400", "--hide-scrollbars", "file://"+page)
			checkConsole(t, logs)
			png, err := os.ReadFile(shot)
			if err != nil {
				t.Fatalf("no screenshot: %v", err)
			}
			if !bytes.HasPrefix(png, []byte("\x89PNG")) || len(png) < 20_000 {
				t.Errorf("screenshot is %d bytes, want a PNG of a drawn page", len(png))
			}
			if keep := os.Getenv("USERAPI_TEST_SCREENSHOT_DIR"); keep != "" {
				if err := os.WriteFile(filepath.Join(keep, tc.name+".png"), png, 0o644); err != nil {
					t.Error(err)
				}
			}
		})
	}
}

// chromium runs one headless chromium command with a fresh profile and no
// network (every host name fails to resolve), returning stdout and the log.
func chromium(t *testing.T, bin string, args ...string) (stdout, logs string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	base := []string{
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--host-resolver-rules=MAP * ~NOTFOUND",
		"--user-data-dir=" + t.TempDir(),
		"--enable-logging=stderr", "--v=0",
	}
	cmd := exec.CommandContext(ctx, bin, append(base, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %v: %v\n%s", args, err, errb.String())
	}
	return out.String(), errb.String()
}

// checkConsole fails on any console message: the report logs nothing, so a
// message is a script error or a resource the page tried to load.
func checkConsole(t *testing.T, logs string) {
	t.Helper()
	for line := range strings.SplitSeq(logs, "\n") {
		if strings.Contains(line, ":CONSOLE") || strings.Contains(line, "Uncaught") {
			t.Errorf("browser console: %s", line)
		}
	}
}

func attrInt(t *testing.T, dom, name string) int {
	t.Helper()
	m := regexp.MustCompile(` ` + name + `="(\d+)"`).FindStringSubmatch(dom)
	if m == nil {
		t.Fatalf("rendered DOM has no %s attribute: the report's script did not run", name)
	}
	n := 0
	for _, c := range m[1] {
		n = n*10 + int(c-'0')
	}
	return n
}
