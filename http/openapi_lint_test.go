package http

import (
	"encoding/json"
	"os"
	"os/exec"
	"testing"
)

// OpenAPILintEnv names the Redocly CLI binary (npm @redocly/cli) that
// TestOpenAPILint runs; .ci/run installs it.
const OpenAPILintEnv = "USERAPI_TEST_OPENAPI_LINT"

// TestOpenAPILint runs `redocly lint` with its recommended rules over
// openapi.json and fails on any error or warning. The few problems kept on
// purpose are listed, with their reasons, in .redocly.lint-ignore.yaml.
func TestOpenAPILint(t *testing.T) {
	bin := os.Getenv(OpenAPILintEnv)
	if bin == "" {
		t.Skip(OpenAPILintEnv + " is not set (path of the redocly binary from npm @redocly/cli)")
	}
	cmd := exec.Command(bin, "lint", "--extends=recommended", "--format=json", "openapi.json")
	cmd.Env = append(os.Environ(), "REDOCLY_TELEMETRY=off", "REDOCLY_SUPPRESS_UPDATE_NOTICE=true")
	out, err := cmd.Output()
	var report struct {
		Totals struct {
			Errors, Warnings, Ignored int
		}
		Problems []struct {
			RuleID   string `json:"ruleId"`
			Severity string
			Message  string
			Location []struct {
				Pointer string
			}
		}
	}
	if jerr := json.Unmarshal(out, &report); jerr != nil {
		t.Fatalf("%s lint: %v, output not JSON (%v):\n%s", bin, err, jerr, out)
	}
	for _, p := range report.Problems {
		where := ""
		if len(p.Location) > 0 {
			where = p.Location[0].Pointer
		}
		t.Errorf("%s %s at %s: %s", p.Severity, p.RuleID, where, p.Message)
	}
	if report.Totals.Errors+report.Totals.Warnings > 0 || err != nil {
		t.Errorf("redocly lint: %d errors, %d warnings (exit %v)", report.Totals.Errors, report.Totals.Warnings, err)
	}
	t.Logf("redocly lint: %d errors, %d warnings, %d ignored on purpose", report.Totals.Errors, report.Totals.Warnings, report.Totals.Ignored)
}
