package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"userapi/auth"
)

// keys runs `userapi keys args…` and returns its stdout and stderr.
func keys(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err := run(context.Background(), append([]string{"keys"}, args...), func(string) string { return "" }, &out, &errOut)
	return out.String(), errOut.String(), err
}

func TestKeysCommand(t *testing.T) {
	db := "sqlite:" + filepath.Join(t.TempDir(), "keys.db")
	out, _, err := keys(t, "create", "--db", db, "--name", "reader", "--scopes", "users:read", "--expires", "1h", "--rate-limit", "5", "--rate-burst", "10")
	if err != nil {
		t.Fatalf("keys create: %v", err)
	}
	reader := strings.TrimSpace(out)
	if !auth.LooksLikeKey(reader) {
		t.Fatalf("keys create printed %q, want only a key on stdout", out)
	}
	out, _, err = keys(t, "create", "--db", db, "--name", "writer", "--scopes", "users:read,users:write")
	if err != nil {
		t.Fatal(err)
	}
	writer := strings.TrimSpace(out)

	list, _, err := keys(t, "list", "--db", db)
	if err != nil {
		t.Fatalf("keys list: %v", err)
	}
	for _, want := range []string{`"reader"`, "users:read", `"writer"`, "users:read users:write", "5/s burst 10"} {
		if !strings.Contains(list, want) {
			t.Errorf("keys list lacks %q:\n%s", want, list)
		}
	}
	if strings.Contains(list, reader) || strings.Contains(list, writer) {
		t.Errorf("keys list shows a secret:\n%s", list)
	}

	// The service takes the keys, then refuses the revoked one.
	base, _, _ := startService(t, nil, "--db", db, "--key-check-interval", "50ms")
	for key, want := range map[string]int{reader: 200, writer: 200} {
		resp := do(t, "GET", base+"/users?limit=1", key, "")
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET /users with %s = %d, want %d", key[:6], resp.StatusCode, want)
		}
	}
	resp := do(t, "POST", base+"/users", reader, `{"email":"r@example.com","name":"R"}`)
	resp.Body.Close()
	if resp.StatusCode != 403 {
		t.Errorf("POST /users with a read key = %d, want 403", resp.StatusCode)
	}
	id := regexp.MustCompile(`^uak_([0-9]+)_`).FindStringSubmatch(writer)[1]
	if _, errOut, err := keys(t, "revoke", "--db", db, id); err != nil || !strings.Contains(errOut, "revoked api key "+id) {
		t.Fatalf("keys revoke %s = %v, %q", id, err, errOut)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp := do(t, "GET", base+"/users?limit=1", writer, "")
		resp.Body.Close()
		if resp.StatusCode == 401 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a key revoked by `userapi keys revoke` still works after 5s (status %d)", resp.StatusCode)
		}
		time.Sleep(20 * time.Millisecond)
	}
	list, _, _ = keys(t, "list", "--db", db)
	if !regexp.MustCompile(`(?m)^` + id + `\s.*"writer".*\d{4}-\d\d-\d\dT.*\d{4}-\d\d-\d\dT`).MatchString(list) {
		t.Errorf("keys list does not show key %s revoked:\n%s", id, list)
	}
}

func TestKeysCommandUsage(t *testing.T) {
	db := "sqlite:" + filepath.Join(t.TempDir(), "u.db")
	for _, args := range [][]string{
		{},
		{"rotate"},
		{"create", "--db", db, "--name", "x"}, // no scopes
		{"create", "--db", db, "--scopes", "users:read"},          // no name
		{"create", "--db", db, "--name", "x", "--scopes", "root"}, // unknown scope
		{"create", "--db", db, "--name", "x", "--scopes", "admin", "--rate-limit", "-1"},
		{"revoke", "--db", db},
		{"revoke", "--db", db, "abc"},
		{"list", "--db", db, "extra"},
	} {
		if _, _, err := keys(t, args...); !errors.Is(err, errUsage) {
			t.Errorf("keys %q = %v, want a usage error", args, err)
		}
	}
	if _, _, err := keys(t, "revoke", "--db", db, "999"); err == nil || errors.Is(err, errUsage) {
		t.Errorf("keys revoke of an unknown id = %v, want a not-found error", err)
	}
}

func TestAuthOffWarns(t *testing.T) {
	db := "sqlite:" + filepath.Join(t.TempDir(), "off.db")
	base, logs, _ := startService(t, nil, "--db", db, "--auth", "off")
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "authentication is off") {
		t.Errorf("--auth off logged no warning:\n%s", logs)
	}
	if strings.Contains(logs.String(), "uak_") {
		t.Errorf("--auth off created a key:\n%s", logs)
	}
	resp := do(t, "GET", base+"/users", "", "")
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("GET /users with --auth off = %d, want 200", resp.StatusCode)
	}
	resp = do(t, "GET", base+"/admin/keys", "", "")
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("GET /admin/keys with --auth off = %d, want 404 (no admin routes without authentication)", resp.StatusCode)
	}
}

func TestNoBootstrapKey(t *testing.T) {
	db := "sqlite:" + filepath.Join(t.TempDir(), "nb.db")
	_, logs, _ := startService(t, map[string]string{"USERAPI_BOOTSTRAP_KEY": "false"}, "--db", db)
	if strings.Contains(logs.String(), "uak_") {
		t.Errorf("--bootstrap-key=false created a key:\n%s", logs)
	}
}

// TestKeysCommandIgnoresServeEnvironment: `keys create` run in a serve's
// environment (kubectl exec into a pod) takes the database from it, but
// not the service's rate-limit settings as the new key's own.
func TestKeysCommandIgnoresServeEnvironment(t *testing.T) {
	db := "sqlite:" + filepath.Join(t.TempDir(), "keys.db")
	env := map[string]string{"USERAPI_DB": db, "USERAPI_RATE_LIMIT": "off", "USERAPI_RATE_BURST": "50", "USERAPI_NAME": "from-env"}
	getenv := func(k string) string { return env[k] }
	var out, errOut bytes.Buffer
	if err := run(context.Background(), []string{"keys", "create", "--name", "admin", "--scopes", "admin"}, getenv, &out, &errOut); err != nil {
		t.Fatalf("keys create in a serve's environment: %v\n%s", err, errOut.String())
	}
	out.Reset()
	if err := run(context.Background(), []string{"keys", "list"}, getenv, &out, &errOut); err != nil {
		t.Fatalf("keys list: %v", err)
	}
	if list := out.String(); !strings.Contains(list, `"admin"`) || strings.Contains(list, "burst") || strings.Contains(list, "from-env") {
		t.Errorf("keys list = %q, want the key named admin with no rate limit of its own", list)
	}
}
