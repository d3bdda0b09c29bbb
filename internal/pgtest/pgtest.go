// Package pgtest gives tests a PostgreSQL database or schema of their own on
// the server at $USERAPI_TEST_POSTGRES_URL, dropped when the test ends, so
// runs never see each other's rows. Only tests import it.
package pgtest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"userapi/internal/testenv"
)

// Env names the variable with the server's URL.
const Env = "USERAPI_TEST_POSTGRES_URL"

// URL returns $USERAPI_TEST_POSTGRES_URL, skipping the test when it is unset.
func URL(tb testing.TB) string {
	tb.Helper()
	base := os.Getenv(Env)
	if base == "" {
		tb.Skipf("%s is not set; set it (e.g. postgres://postgres@127.0.0.1:5432/test?sslmode=disable) to run the PostgreSQL tests", Env)
	}
	return base
}

// LogicalEnv names the variable with the URL of a server whose wal_level is
// logical, for the change-stream tests (the machine's main server may run
// with replica).
const LogicalEnv = "USERAPI_TEST_POSTGRES_LOGICAL_URL"

// LogicalURL returns $USERAPI_TEST_POSTGRES_LOGICAL_URL, skipping the test
// when it is unset.
func LogicalURL(tb testing.TB) string {
	tb.Helper()
	base := os.Getenv(LogicalEnv)
	if base == "" {
		tb.Skipf("%s is not set; set it to a server with wal_level=logical (e.g. postgres://postgres@127.0.0.1:5433/postgres?sslmode=disable) to run the change-stream tests", LogicalEnv)
	}
	return base
}

// Database creates an empty database, dropped at cleanup, and returns its
// URL. It skips the test when the variable is unset and fails it when the
// server is unreachable.
func Database(tb testing.TB) string {
	tb.Helper()
	return DatabaseOn(tb, URL(tb))
}

// DatabaseOn is Database on the server at base. Replication slots of the
// database are dropped with it.
func DatabaseOn(tb testing.TB, base string) string {
	tb.Helper()
	name := fmt.Sprintf("userapi_test_%016x", rand.Uint64())
	admin(tb, base, "CREATE DATABASE "+name)
	tb.Cleanup(func() {
		admin(tb, base, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '"+name+"' AND active_pid IS NOT NULL")
		admin(tb, base, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '"+name+"'")
		admin(tb, base, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
	})
	u := parse(tb, base)
	u.Path = "/" + name
	return u.String()
}

// Exec runs one statement on a connection of its own to url: a writer
// outside the service, as psql would be.
func Exec(tb testing.TB, url, stmt string, args ...any) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		tb.Fatalf("connect %s: %v", url, err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, stmt, args...); err != nil {
		tb.Fatalf("%s: %v", stmt, err)
	}
}

// Schema creates an empty schema in the variable's database, dropped at
// cleanup, and returns a URL whose search_path is that schema: cheaper to
// make than a database, and as private.
func Schema(tb testing.TB) string {
	tb.Helper()
	base := URL(tb)
	name := fmt.Sprintf("userapi_test_%016x", rand.Uint64())
	admin(tb, base, "CREATE SCHEMA "+name)
	tb.Cleanup(func() { admin(tb, base, "DROP SCHEMA IF EXISTS "+name+" CASCADE") })
	u := parse(tb, base)
	q := u.Query()
	q.Set("search_path", name)
	u.RawQuery = q.Encode()
	return u.String()
}

// admin runs one statement on its own connection to base.
func admin(tb testing.TB, base, stmt string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, base)
	if err != nil {
		tb.Fatalf("%s=%s is set but unreachable: %v", Env, base, err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, stmt); err != nil {
		tb.Fatalf("%s: %v", stmt, err)
	}
}

func parse(tb testing.TB, base string) *url.URL {
	tb.Helper()
	u, err := url.Parse(base)
	if err != nil {
		tb.Fatalf("%s: %v", Env, err)
	}
	return u
}

// BouncerEnv names the variable with the path of the pgbouncer binary, for
// the tests that run the stores through PgBouncer in transaction mode.
const BouncerEnv = "USERAPI_TEST_PGBOUNCER"

// Bouncer starts a pgbouncer of the test's own, in transaction pooling mode,
// in front of the server of dbURL, and returns dbURL rewritten to go through
// it. (A store opened on it needs postgres.Options.DirectURL, or a query mode
// without named prepared statements in the URL.) The process is stopped at
// cleanup. It skips the
// test when the variable is unset and fails it when pgbouncer cannot start.
func Bouncer(tb testing.TB, dbURL string) string {
	tb.Helper()
	bin := os.Getenv(BouncerEnv)
	if bin == "" {
		tb.Skipf("%s is not set; set it to the pgbouncer binary (e.g. /usr/sbin/pgbouncer) to run the tests through PgBouncer", BouncerEnv)
	}
	if _, err := exec.LookPath(bin); err != nil {
		tb.Fatalf("%s=%s: %v", BouncerEnv, bin, err)
	}
	up := parse(tb, dbURL)
	// pgbouncer refuses to run as root; as another user it needs a
	// directory it can write its log to, outside the test's private
	// temporary directory.
	dir, err := os.MkdirTemp("", "pgbouncer")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o777); err != nil {
		tb.Fatal(err)
	}
	port := testenv.FreePorts(tb, 1)[0]
	ini := fmt.Sprintf(`[databases]
* = host=%s port=%s
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s/users.txt
pool_mode = transaction
default_pool_size = 8
max_client_conn = 500
logfile = %s/pgbouncer.log
`, up.Hostname(), up.Port(), port, dir, dir)
	write := func(name, text string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	write("pgbouncer.ini", ini)
	write("users.txt", fmt.Sprintf("%q \"\"\n", up.User.Username()))
	args := []string{filepath.Join(dir, "pgbouncer.ini")}
	if os.Geteuid() == 0 {
		args = append([]string{"-u", unprivileged()}, args...)
	}
	cmd := exec.Command(bin, args...)
	out, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start pgbouncer: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	tb.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "pgbouncer.log"))
			msg, _ := os.ReadFile(filepath.Join(dir, "stderr"))
			tb.Fatalf("pgbouncer exited: %s%s", msg, log)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("pgbouncer is not listening on %s after 10s", addr)
		}
	}
	u := *up
	u.Host = addr
	return u.String()
}

// unprivileged names a user pgbouncer may run as when started by root.
func unprivileged() string {
	if _, err := user.Lookup("postgres"); err == nil {
		return "postgres"
	}
	return "nobody"
}
