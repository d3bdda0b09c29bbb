package postgres_test

import (
	"context"
	"fmt"
	"net"
	neturl "net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"userapi"
	"userapi/internal/pgtest"
	"userapi/internal/testenv"
	"userapi/postgres"
	"userapi/storetest"
)

// openReplicated opens a store on a primary of the test's own with one
// streaming replica applying commits delay late.
func openReplicated(t *testing.T, delay time.Duration) (s *postgres.Store, primary, replica string) {
	t.Helper()
	primary, replica = pgtest.StreamingPair(t, delay)
	s, err := postgres.Open(testenv.Context(t), primary, postgres.Options{
		Migrate: true, MaxConns: 4, Replicas: []string{replica}, ReplicaMaxLag: 5 * time.Second,
	})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, primary, replica
}

// read runs GetUsers with a session and reports what it returned and
// whether a replica served it.
func read(t *testing.T, s *postgres.Store, after userapi.Position, ids ...int64) (map[int64]int64, bool) {
	t.Helper()
	sess := &userapi.Session{After: after}
	users, err := s.GetUsers(userapi.WithSession(testenv.Context(t), sess), ids)
	if err != nil {
		t.Fatalf("GetUsers: %v", err)
	}
	got := map[int64]int64{}
	for _, u := range users {
		got[u.ID] = u.Version
	}
	return got, sess.Replica
}

// TestReplicaRouting: with a replica 300 ms behind, a read of a row just
// written goes to the primary (the replica has not replayed the write);
// reads of other rows, and of the row once the replica has caught up, go
// to the replica; a session token from elsewhere (another instance's
// write) sends reads to the primary until the replica has replayed it. The
// lag and the reads by server are exported.
func TestReplicaRouting(t *testing.T) {
	s, primary, replica := openReplicated(t, 300*time.Millisecond)
	ctx := testenv.Context(t)
	sess := &userapi.Session{}
	a, _, err := s.CreateUser(userapi.WithSession(ctx, sess), userapi.UserCreate{Email: "a@example.com", Name: "A"})
	if err != nil {
		t.Fatal(err)
	}
	if sess.Wrote == 0 {
		t.Fatal("a create returned no commit position")
	}
	got, onReplica := read(t, s, 0, a.ID)
	if onReplica || got[a.ID] != 1 {
		t.Fatalf("read right after the create: %v, served by the replica: %v; want version 1 from the primary", got, onReplica)
	}
	testenv.WaitFor(t, 10*time.Second, "a read of the created row served by the replica", func() bool {
		got, onReplica := read(t, s, 0, a.ID)
		if got[a.ID] != 1 {
			t.Fatalf("read %v, want version 1", got)
		}
		return onReplica
	})

	// Another instance's write: only its token tells this store of it.
	other, err := postgres.Open(ctx, primary, postgres.Options{MaxConns: 2, Replicas: []string{replica}})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	osess := &userapi.Session{}
	name := "A2"
	if _, err := other.UpdateUser(userapi.WithSession(ctx, osess), a.ID, userapi.UserUpdate{Name: &name}); err != nil {
		t.Fatal(err)
	}
	if osess.Wrote <= sess.Wrote {
		t.Fatalf("the update's position %v is not past the create's %v", osess.Wrote, sess.Wrote)
	}
	got, onReplica = read(t, s, osess.Wrote, a.ID)
	if onReplica || got[a.ID] != 2 {
		t.Fatalf("read with the other instance's token: %v, served by the replica: %v; want version 2 from the primary", got, onReplica)
	}
	testenv.WaitFor(t, 10*time.Second, "a read with the token served by the replica once it has replayed the write", func() bool {
		got, onReplica := read(t, s, osess.Wrote, a.ID)
		if got[a.ID] != 2 {
			t.Fatalf("read %v with the token, want version 2", got)
		}
		return onReplica
	})

	reg := prometheus.NewPedanticRegistry()
	s.RegisterMetrics(reg)
	n, err := testutil.GatherAndCount(reg, "userapi_db_replica_lag_bytes", "userapi_db_replica_lag_seconds", "userapi_db_replica_up",
		"userapi_db_reads_total", "userapi_db_replica_fallbacks_total")
	if err != nil {
		t.Fatal(err)
	}
	if n != 3+2+5 {
		t.Errorf("%d replica series, want 10 (lag bytes, lag seconds, up, reads by primary and by the replica, 5 fallback reasons)", n)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "userapi_db_reads_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetCounter().GetValue() == 0 {
				t.Errorf("userapi_db_reads_total %v is 0", m.GetLabel())
			}
		}
	}
}

// TestConformanceWithReplica runs the conformance suite on stores that read
// from a replica applying commits as soon as they arrive; the writes go
// through the pipelined commit-position path. After each case, once the
// replica has caught up, a list and a batched read served by the replica
// equal the primary's.
func TestConformanceWithReplica(t *testing.T) {
	primary := pgtest.StartPrimary(t)
	replica := pgtest.StartReplica(t, primary, 0)
	n := 0
	storetest.Run(t, func(t *testing.T) userapi.Store {
		n++
		db := fmt.Sprintf("conformance_%d", n)
		pgtest.Exec(t, primary.URL("postgres"), "CREATE DATABASE "+db)
		s, err := postgres.Open(testenv.Context(t), primary.URL(db), postgres.Options{
			Migrate: true, MaxConns: 8, Replicas: []string{replica.URL(db)},
		})
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		t.Cleanup(func() { s.Close() })
		t.Cleanup(func() { sameOnReplica(t, s) })
		return s
	})
	// Every write ran in a pipeline with its COMMIT: each one of its own
	// transaction block, or PostgreSQL warns of a COMMIT outside one. The
	// suite's failed writes (conflicts, missing rows) left no block open:
	// the next statement on the connection would fail.
	log, err := os.ReadFile(filepath.Join(primary.Dir, "server.log"))
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"there is no transaction in progress", "current transaction is aborted"} {
		if n := strings.Count(string(log), bad); n > 0 {
			t.Errorf("the primary logged %q %d times", bad, n)
		}
	}
}

// sameOnReplica waits until a list of every user and a batched read of
// them are served by the replica, and checks them against the primary's.
func sameOnReplica(t *testing.T, s *postgres.Store) {
	t.Helper()
	ctx := testenv.Context(t)
	onPrimary := userapi.WithSession(ctx, &userapi.Session{Primary: true})
	want, err := s.ListUsers(onPrimary, userapi.UserFilter{Limit: userapi.MaxLimit})
	if err != nil {
		t.Fatal(err)
	}
	ids := []int64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	wantBatch, err := s.GetUsers(onPrimary, ids)
	if err != nil {
		t.Fatal(err)
	}
	encode := func(us []*userapi.User) string {
		slices.SortFunc(us, func(a, b *userapi.User) int { return int(a.ID - b.ID) })
		var b []byte
		for _, u := range us {
			b = u.AppendJSON(b)
		}
		return string(b)
	}
	// Without a token a list reads the primary: nothing tells it of a
	// write another instance acknowledged.
	plain := &userapi.Session{}
	if _, err := s.ListUsers(userapi.WithSession(ctx, plain), userapi.UserFilter{Limit: userapi.MaxLimit}); err != nil || plain.Replica {
		t.Fatalf("a list without a token: served by the replica %v, %v", plain.Replica, err)
	}
	testenv.WaitFor(t, 10*time.Second, "a list with a token served by the replica", func() bool {
		sess := &userapi.Session{After: 1}
		got, err := s.ListUsers(userapi.WithSession(ctx, sess), userapi.UserFilter{Limit: userapi.MaxLimit})
		if err != nil {
			t.Fatal(err)
		}
		if sess.Replica && encode(got) != encode(want) {
			t.Fatalf("the replica lists %s; the primary %s", encode(got), encode(want))
		}
		return sess.Replica
	})
	testenv.WaitFor(t, 10*time.Second, "a batched read served by the replica", func() bool {
		sess := &userapi.Session{}
		got, err := s.GetUsers(userapi.WithSession(ctx, sess), ids)
		if err != nil {
			t.Fatal(err)
		}
		if sess.Replica && encode(got) != encode(wantBatch) {
			t.Fatalf("the replica has %s; the primary %s", encode(got), encode(wantBatch))
		}
		return sess.Replica
	})
}

// BenchmarkCommitPosition compares the ways a write can learn its commit
// position, on one connection to a primary of the benchmark's own: the
// update alone (no position: the cost without replicas), the update and
// then the position query (two round trips), and the update between BEGIN
// and COMMIT with the position query pipelined behind it (one round trip, what the
// store does). Each iteration runs all three, one after another, so a
// machine whose load drifts slows them alike; each one's median and 90th
// percentile are reported.
func BenchmarkCommitPosition(b *testing.B) {
	primary := pgtest.StartPrimary(b)
	url := primary.URL("postgres")
	pgtest.Exec(b, url, "CREATE TABLE bench (id int PRIMARY KEY, n bigint)")
	pgtest.Exec(b, url, "INSERT INTO bench VALUES (1, 0)")
	ctx := context.Background() // the benchmark may run longer than testenv.Context's 30 s
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close(ctx)
	const update = "UPDATE bench SET n = n + 1 WHERE id = $1 RETURNING n"
	const position = "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint"
	var n, pos int64
	variants := []struct {
		name string
		run  func() error
	}{
		{"update", func() error { return c.QueryRow(ctx, update, 1).Scan(&n) }},
		{"update+query", func() error {
			if err := c.QueryRow(ctx, update, 1).Scan(&n); err != nil {
				return err
			}
			return c.QueryRow(ctx, position).Scan(&pos)
		}},
		{"pipelined", func() error {
			var batch pgx.Batch
			batch.Queue("BEGIN")
			batch.Queue(update, 1)
			batch.Queue("COMMIT")
			batch.Queue(position)
			br := c.SendBatch(ctx, &batch)
			defer br.Close()
			if _, err := br.Exec(); err != nil {
				return err
			}
			if err := br.QueryRow().Scan(&n); err != nil {
				return err
			}
			if _, err := br.Exec(); err != nil {
				return err
			}
			if err := br.QueryRow().Scan(&pos); err != nil {
				return err
			}
			return br.Close()
		}},
	}
	took := make([][]time.Duration, len(variants))
	for b.Loop() {
		for i, v := range variants {
			start := time.Now()
			if err := v.run(); err != nil {
				b.Fatalf("%s: %v", v.name, err)
			}
			took[i] = append(took[i], time.Since(start))
		}
	}
	for i, v := range variants {
		slices.Sort(took[i])
		b.ReportMetric(float64(took[i][len(took[i])/2].Microseconds()), v.name+"-p50-µs")
		b.ReportMetric(float64(took[i][len(took[i])*9/10].Microseconds()), v.name+"-p90-µs")
	}
}

// TestReplicaNotInRecovery: a "replica" that is not in recovery (here the
// primary itself, as a promoted replica or a wrong URL would be) serves no
// read, and says so in userapi_db_replica_up.
func TestReplicaNotInRecovery(t *testing.T) {
	url := newDatabase(t)
	s, err := postgres.Open(testenv.Context(t), url, postgres.Options{Migrate: true, Replicas: []string{url}, ReplicaPoll: time.Millisecond})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer s.Close()
	sess := &userapi.Session{}
	u, _, err := s.CreateUser(userapi.WithSession(testenv.Context(t), sess), userapi.UserCreate{Email: "n@example.com", Name: "N"})
	if err != nil {
		t.Fatal(err)
	}
	if sess.Wrote == 0 {
		t.Fatal("no commit position")
	}
	time.Sleep(50 * time.Millisecond) // many polls
	for range 10 {
		got, onReplica := read(t, s, 0, u.ID)
		if onReplica || got[u.ID] != 1 {
			t.Fatalf("read %v, served by the replica: %v", got, onReplica)
		}
	}
	reg := prometheus.NewPedanticRegistry()
	s.RegisterMetrics(reg)
	want := "# HELP userapi_db_replica_up 1 when the replica answered its poll in the last 100 ms (at most the lag bound) and its lag is within the bound (it may serve reads).\n# TYPE userapi_db_replica_up gauge\n"
	u2, _ := neturl.Parse(url)
	want += fmt.Sprintf("userapi_db_replica_up{replica=%q} 0\n", u2.Host)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "userapi_db_replica_up"); err != nil {
		t.Error(err)
	}
}

// TestReplicaRefusesAsyncCommit: with synchronous_commit off a write's
// position, read after its COMMIT, can be before the commit's record, so a
// replica would qualify without the write: Open refuses replicas then.
func TestReplicaRefusesAsyncCommit(t *testing.T) {
	url := newDatabase(t)
	opt := "options=-c%20synchronous_commit%3Doff"
	async := url + "&" + opt
	if !strings.Contains(url, "?") {
		async = url + "?" + opt
	}
	s, err := postgres.Open(testenv.Context(t), async, postgres.Options{Migrate: true, Replicas: []string{url}})
	if err == nil {
		s.Close()
		t.Fatal("Open with replicas and synchronous_commit=off succeeded")
	}
	if !strings.Contains(err.Error(), "need synchronous_commit") {
		t.Errorf("error %q does not say replicas need synchronous_commit", err)
	}
	s, err = postgres.Open(testenv.Context(t), async, postgres.Options{Migrate: true})
	if err != nil {
		t.Fatalf("Open without replicas and synchronous_commit=off: %v", err)
	}
	s.Close()
}

// hangingProxy forwards TCP connections to addr until hang is called; from
// then on it accepts and holds connections and forwards nothing, like a
// server that hangs.
type hangingProxy struct {
	ln   net.Listener
	hung atomic.Bool
}

func newHangingProxy(t *testing.T, addr string) *hangingProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &hangingProxy{ln: ln}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			up, err := net.Dial("tcp", addr)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, up)
			mu.Unlock()
			go p.pipe(up, c)
			go p.pipe(c, up)
		}
	}()
	return p
}

// pipe copies from src to dst until hang; then it reads and drops.
func (p *hangingProxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		if p.hung.Load() {
			continue
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			return
		}
	}
}

func (p *hangingProxy) hang() { p.hung.Store(true) }

// TestReplicaHangs: a replica that hangs (its connections stay open and
// answer nothing) is no longer picked once it has missed its polls for a
// moment, far sooner than the lag bound (5 s here): later reads go
// straight to the primary instead of each waiting for its timeout there.
func TestReplicaHangs(t *testing.T) {
	primary, replica := pgtest.StreamingPair(t, 0)
	u, err := neturl.Parse(replica)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newHangingProxy(t, u.Host)
	u.Host = proxy.ln.Addr().String()
	s, err := postgres.Open(testenv.Context(t), primary, postgres.Options{
		Migrate: true, MaxConns: 4, Replicas: []string{u.String()}, ReplicaMaxLag: 5 * time.Second,
		QueryTimeout: 2 * time.Second,
	})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	a, _, err := s.CreateUser(testenv.Context(t), userapi.UserCreate{Email: "a@example.com", Name: "A"})
	if err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 10*time.Second, "a read served by the replica", func() bool {
		_, onReplica := read(t, s, 0, a.ID)
		return onReplica
	})

	proxy.hang()
	time.Sleep(300 * time.Millisecond) // about 60 missed polls
	reg := prometheus.NewPedanticRegistry()
	s.RegisterMetrics(reg)
	for range 5 {
		got, onReplica := read(t, s, 0, a.ID)
		if onReplica || got[a.ID] != 1 {
			t.Fatalf("read %v, served by the replica: %v; want version 1 from the primary", got, onReplica)
		}
	}
	if n := testenv.Sum(t, reg, "userapi_db_replica_fallbacks_total", "reason", "failed"); n != 0 {
		t.Errorf("%v reads were sent to the hung replica and waited for their timeout, want none", n)
	}
}
