// Package testenv holds the helpers every package's tests share: contexts
// with a deadline, free loopback ports, and redis-server processes of a
// test's own. Only tests import it.
package testenv

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"
)

// RedisEnv names the variable that enables the Redis tests.
const RedisEnv = "USERAPI_TEST_REDIS_URL"

// Context returns a context that ends with the test, or after 30 s: long
// enough for any single step of a test on a loaded machine, short enough
// that a hung call fails the test instead of the whole run's timeout.
func Context(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

// FreePorts returns n loopback ports that were free a moment ago.
func FreePorts(tb testing.TB, n int) []int {
	tb.Helper()
	ports := make([]int, n)
	for i := range ports {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		defer ln.Close()
		ports[i] = ln.Addr().(*net.TCPAddr).Port
	}
	return ports
}

// FreeAddr returns a loopback host:port that was free a moment ago.
func FreeAddr(tb testing.TB) string {
	tb.Helper()
	return "127.0.0.1:" + strconv.Itoa(FreePorts(tb, 1)[0])
}

// RedisServer is a redis-server of the test's own on a free loopback port,
// without persistence unless Dir is set, so a test can kill, pause and
// restart it without touching the shared one.
type RedisServer struct {
	tb   testing.TB
	Port int
	// Dir, when set before Start, is the data directory kept across
	// restarts (so a SAVEd snapshot is loaded again); otherwise each start
	// gets a fresh one.
	Dir string
	cmd *exec.Cmd
}

// StartRedis starts a RedisServer, stopped at cleanup.
func StartRedis(tb testing.TB) *RedisServer {
	tb.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		tb.Fatalf("redis-server not found: %v", err)
	}
	r := &RedisServer{tb: tb, Port: FreePorts(tb, 1)[0]}
	r.Start()
	tb.Cleanup(r.Stop)
	return r
}

// URL is the server's redis:// URL.
func (r *RedisServer) URL() string { return "redis://127.0.0.1:" + strconv.Itoa(r.Port) + "/0" }

// Start starts the server (again) and waits until it accepts connections.
func (r *RedisServer) Start() {
	r.tb.Helper()
	dir := r.Dir
	if dir == "" {
		dir = r.tb.TempDir()
	}
	r.cmd = exec.Command("redis-server", "--port", strconv.Itoa(r.Port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", dir, "--daemonize", "no",
		"--loglevel", "warning", "--logfile", filepath.Join(dir, "redis.log"))
	// Killed with the test binary even if it dies before its cleanups run.
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		r.tb.Fatalf("start redis-server: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(r.Port))
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(filepath.Join(dir, "redis.log"))
			r.tb.Fatalf("redis-server on %d did not start: %v\n%s", r.Port, err, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Stop kills the server (as a crash would) and waits for it to exit.
func (r *RedisServer) Stop() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	r.cmd.Process.Signal(syscall.SIGCONT) // in case it is paused
	r.cmd.Process.Kill()
	r.cmd.Wait()
	r.cmd = nil
}

// Pause stops the server's process without closing its connections: Redis
// is there but does not answer, as in a stall or a network partition.
func (r *RedisServer) Pause() { r.cmd.Process.Signal(syscall.SIGSTOP) }

// Resume ends a Pause.
func (r *RedisServer) Resume() { r.cmd.Process.Signal(syscall.SIGCONT) }

// Do runs one command on a client of its own (the test's, not the
// service's).
func (r *RedisServer) Do(args ...string) error {
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{"127.0.0.1:" + strconv.Itoa(r.Port)}, DisableCache: true})
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.Do(ctx, c.B().Arbitrary(args...).Build()).Error()
}
