package main

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"userapi/internal/pgtest"
	"userapi/internal/testenv"
)

// TestChangeStreamNeedsLogicalWAL: on a PostgreSQL whose wal_level is not
// logical, `serve --change-stream on` refuses to start (exit status 1, not
// a usage error) with the fix in its message, and `--change-stream auto`
// (the default) logs the same fix and serves without the stream.
func TestChangeStreamNeedsLogicalWAL(t *testing.T) {
	server := pgtest.StartPrimary(t).URL("postgres") // wal_level = replica
	const fix = "set wal_level = logical in postgresql.conf and restart PostgreSQL"

	t.Run("on", func(t *testing.T) {
		db := pgtest.DatabaseOn(t, server)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		logs := &testenv.Buffer{}
		err := run(ctx, []string{"serve", "--addr", testenv.FreeAddr(t), "--db", db, "--migrate", "--change-stream", "on"},
			func(string) string { return "" }, logs, logs)
		if err == nil || ctx.Err() != nil {
			t.Fatalf("run = %v (context: %v), want a refusal to start\n%s", err, ctx.Err(), logs)
		}
		if errors.Is(err, errUsage) {
			t.Errorf("run = %v: a usage error (exit status 2), want exit status 1", err)
		}
		for _, want := range []string{"--change-stream on", `wal_level is "replica"`, fix} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("run = %v, does not say %q", err, want)
			}
		}
	})

	t.Run("auto", func(t *testing.T) {
		db := pgtest.DatabaseOn(t, server)
		base, logs, _ := startService(t, nil, "--db", db, "--migrate")
		log := logs.String()
		for _, want := range []string{"change stream off", fix} {
			if !strings.Contains(log, want) {
				t.Errorf("the start-up log does not say %q:\n%s", want, log)
			}
		}
		if strings.Contains(log, "change stream on") {
			t.Errorf("the start-up log says the stream is on:\n%s", log)
		}
		resp := do(t, "POST", base+"/users", firstKey(t, logs), `{"email":"w@example.com","name":"W"}`)
		resp.Body.Close()
		if resp.StatusCode != 201 {
			t.Errorf("POST /users = %d without the stream, want 201", resp.StatusCode)
		}
	})
}
