package pgtest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// BinDirEnv names the variable with the directory of the PostgreSQL server
// binaries (initdb, pg_ctl, pg_basebackup, postgres), for the tests that
// start clusters of their own: a primary and a streaming replica.
const BinDirEnv = "USERAPI_TEST_PG_BINDIR"

// ClusterPortLow and ClusterPortHigh bound the range of loopback ports the clusters tests start
// listen on (the first free ones are taken).
const (
	ClusterPortLow  = 5440
	ClusterPortHigh = 5449
)

// Cluster is a PostgreSQL cluster of the test's own, stopped and removed at
// cleanup. When the test runs as root the server runs as the postgres user
// (PostgreSQL refuses root).
type Cluster struct {
	tb   testing.TB
	bin  string
	Dir  string
	Port int
}

// BinDir returns $USERAPI_TEST_PG_BINDIR, skipping the test when it is
// unset and failing it when the directory lacks the binaries.
func BinDir(tb testing.TB) string {
	tb.Helper()
	dir := os.Getenv(BinDirEnv)
	if dir == "" {
		tb.Skipf("%s is not set; set it to the PostgreSQL server binaries (e.g. /usr/lib/postgresql/15/bin) to run the tests that start their own clusters", BinDirEnv)
	}
	for _, b := range []string{"initdb", "pg_ctl", "pg_basebackup", "postgres"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			tb.Fatalf("%s=%s: %v", BinDirEnv, dir, err)
		}
	}
	return dir
}

// StartPrimary initdbs and starts a cluster that streaming replicas can
// follow (wal_level=replica, WAL senders, replication connections trusted
// on loopback), on a free port of the range.
func StartPrimary(tb testing.TB) *Cluster {
	tb.Helper()
	return startPrimary(tb, "replica")
}

// StartLogical is StartPrimary with wal_level=logical: a server the change
// stream can follow, for the tests that restart it or change its settings.
func StartLogical(tb testing.TB) *Cluster {
	tb.Helper()
	return startPrimary(tb, "logical")
}

func startPrimary(tb testing.TB, walLevel string) *Cluster {
	tb.Helper()
	c := &Cluster{tb: tb, bin: BinDir(tb), Dir: clusterDir(tb), Port: freeClusterPort(tb)}
	c.run("initdb", "-D", c.Dir, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
	c.appendConf(fmt.Sprintf(`
listen_addresses = '127.0.0.1'
port = %d
unix_socket_directories = ''
wal_level = %s
max_wal_senders = 5
max_connections = 60
shared_buffers = 32MB
fsync = off
full_page_writes = off
log_min_messages = warning
`, c.Port, walLevel))
	c.start()
	return c
}

// StartReplica makes a streaming replica of primary from a base backup
// (pg_basebackup -R) and starts it on a free port of the range; with a
// delay, it applies each commit that long after the primary made it
// (recovery_min_apply_delay), a replica lagging on purpose.
func StartReplica(tb testing.TB, primary *Cluster, delay time.Duration) *Cluster {
	tb.Helper()
	c := &Cluster{tb: tb, bin: primary.bin, Dir: clusterDir(tb), Port: freeClusterPort(tb)}
	c.run("pg_basebackup", "-h", "127.0.0.1", "-p", strconv.Itoa(primary.Port), "-U", "postgres",
		"-D", c.Dir, "-R", "-X", "stream", "-c", "fast", "--no-sync")
	c.appendConf(fmt.Sprintf(`
port = %d
hot_standby = on
recovery_min_apply_delay = '%dms'
`, c.Port, delay.Milliseconds()))
	c.start()
	return c
}

// URL is the cluster's URL for database db.
func (c *Cluster) URL(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", c.Port, db)
}

func (c *Cluster) start() {
	c.tb.Helper()
	c.run("pg_ctl", "-D", c.Dir, "-l", c.log(), "-w", "-t", "60", "start")
	c.tb.Cleanup(func() {
		c.run("pg_ctl", "-D", c.Dir, "-m", "immediate", "-w", "stop")
	})
}

// Restart stops the server as an operator's fast shutdown does (every
// session ended, a checkpoint written) and starts it again.
func (c *Cluster) Restart() {
	c.tb.Helper()
	c.run("pg_ctl", "-D", c.Dir, "-l", c.log(), "-m", "fast", "-w", "-t", "60", "restart")
}

func (c *Cluster) log() string { return filepath.Join(c.Dir, "server.log") }

func (c *Cluster) appendConf(text string) {
	c.tb.Helper()
	f, err := os.OpenFile(filepath.Join(c.Dir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		c.tb.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(text); err != nil {
		c.tb.Fatal(err)
	}
}

// run runs one of the binaries, as the postgres user when root.
func (c *Cluster) run(name string, args ...string) {
	c.tb.Helper()
	cmd := exec.Command(filepath.Join(c.bin, name), args...)
	cmd.Dir = os.TempDir()
	if uid, gid, ok := serverUser(); ok {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		log, _ := os.ReadFile(c.log())
		c.tb.Fatalf("%s %s: %v\n%s\n%s", name, strings.Join(args, " "), err, out, log)
	}
}

// serverUser is the postgres account's ids when the test runs as root.
func serverUser() (uid, gid uint32, ok bool) {
	if os.Geteuid() != 0 {
		return 0, 0, false
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return 0, 0, false
	}
	uid64, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid64, _ := strconv.ParseUint(u.Gid, 10, 32)
	return uint32(uid64), uint32(gid64), true
}

// clusterDir is an empty directory for a data directory, owned by the
// server's user, removed at cleanup. It is outside the test's TempDir,
// which the postgres user could not enter.
func clusterDir(tb testing.TB) string {
	tb.Helper()
	base, err := os.MkdirTemp("", "userapi-pg")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(base) })
	dir := filepath.Join(base, "data")
	if err := os.Mkdir(dir, 0o700); err != nil {
		tb.Fatal(err)
	}
	if uid, gid, ok := serverUser(); ok {
		for _, d := range []string{base, dir} {
			if err := os.Chown(d, int(uid), int(gid)); err != nil {
				tb.Fatal(err)
			}
		}
	}
	return dir
}

// freeClusterPort returns a port of the range nothing listens on, looking
// from a random one: a cluster listens once started, so the next one gets
// another port, and test binaries run side by side (go test without -p 1)
// seldom pick the same one between the check and the start.
func freeClusterPort(tb testing.TB) int {
	tb.Helper()
	n := ClusterPortHigh - ClusterPortLow + 1
	first := rand.IntN(n)
	for i := range n {
		p := ClusterPortLow + (first+i)%n
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		ln.Close()
		return p
	}
	tb.Fatalf("no free port in %d-%d", ClusterPortLow, ClusterPortHigh)
	return 0
}

// StreamingPair starts a primary and a streaming replica of it that applies
// each commit delay after the primary made it, creates a database on the
// primary and waits until the replica has it too. It returns the
// database's URL on each.
func StreamingPair(tb testing.TB, delay time.Duration) (primaryURL, replicaURL string) {
	tb.Helper()
	p := StartPrimary(tb)
	r := StartReplica(tb, p, delay)
	Exec(tb, p.URL("postgres"), "CREATE DATABASE userapi")
	primaryURL, replicaURL = p.URL("userapi"), r.URL("userapi")
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := pgx.Connect(ctx, replicaURL)
		if err == nil {
			c.Close(ctx)
			cancel()
			return primaryURL, replicaURL
		}
		cancel()
		if time.Now().After(deadline) {
			tb.Fatalf("the replica has no database userapi after 30s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
