package cache

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"userapi"
	"userapi/internal/pgtest"
	"userapi/internal/testenv"
	"userapi/postgres"
)

// TestReplicaReadYourWrites: two tiered instances, each with its own
// PostgreSQL store over a primary and a streaming replica that applies
// every commit 300 ms late (clusters the test starts), under mixed load:
// reads, updates and creates through the caches. Checked on every write:
//
//   - read-your-writes on the writing instance: a read through its cache
//     right after the write returns the write's version or a newer one;
//   - with the write's session token: a read through the other instance's
//     cache at once (its notice may not have arrived), and on a third
//     instance's store a batched read (the loader's query) and a list,
//     return it too;
//   - without a token on the other instance, once the write's notice has
//     reached it: a read through its cache returns it (a replica's older
//     row is read again from the primary).
//
// At the end every tier of both instances holds what the primary holds,
// after a last round of reads made while the replica was still behind. The
// share of the loader's batches and lists the replica served is logged and
// must be above 0.
func TestReplicaReadYourWrites(t *testing.T) {
	primary, replica := pgtest.StreamingPair(t, 300*time.Millisecond)
	srv := startRedis(t)
	const users = 1000
	open := func(reg prometheus.Registerer, migrate bool) *postgres.Store {
		s, err := postgres.Open(testenv.Context(t), primary, postgres.Options{
			Migrate: migrate, MaxConns: 4, Replicas: []string{replica}, ReplicaMaxLag: 2 * time.Second,
		})
		if err != nil {
			t.Fatalf("postgres.Open: %v", err)
		}
		t.Cleanup(func() { s.Close() })
		s.RegisterMetrics(reg)
		return s
	}
	regs := []*prometheus.Registry{prometheus.NewRegistry(), prometheus.NewRegistry()}
	dbs := []*postgres.Store{open(regs[0], true), open(regs[1], false)}
	// A third instance's store makes the checks with tokens, so the two
	// instances' metrics count only their caches' reads.
	checker := open(prometheus.NewRegistry(), false)
	pgtest.Exec(t, primary, `
INSERT INTO users (email, name, created_at, updated_at, version)
SELECT 'replica' || g || '@example.com', 'User ' || g, now(), now(), 1
FROM generate_series(1, $1) AS g`, users)

	// noticed[i][id] is the highest version instance i has had a notice of.
	noticed := []map[int64]int64{{}, {}}
	var nmu sync.Mutex
	prefix := testPrefix()
	var inst []*Store
	for i := range 2 {
		cfg := fastTiered(srv.URL(), prefix)
		cfg.onNotice = func(id, v int64, _ time.Time) {
			nmu.Lock()
			noticed[i][id] = max(noticed[i][id], v)
			nmu.Unlock()
		}
		inst = append(inst, newCache(t, dbs[i], cfg))
	}
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(inst[0]) && healthy(inst[1]) })
	// The rows were inserted outside the service (no instance knows their
	// commit position): wait until the replica has them, or the first
	// reads could find them absent there and cache that.
	testenv.WaitFor(t, 10*time.Second, "the replica has the users", func() bool {
		c, err := pgx.Connect(testenv.Context(t), replica)
		if err != nil {
			t.Fatalf("connect to the replica: %v", err)
		}
		defer c.Close(testenv.Context(t))
		var n int
		err = c.QueryRow(testenv.Context(t), "SELECT count(*) FROM users").Scan(&n)
		return err == nil && n == users
	})

	var (
		violations atomic.Int64
		writes     atomic.Int64
		reads      atomic.Int64
		mu         sync.Mutex
		created    []int64
	)
	violation := func(format string, args ...any) {
		if violations.Add(1) <= 10 {
			t.Errorf(format, args...)
		}
	}
	readVersion := func(c *Store, ctx context.Context, id int64) int64 {
		e, err := c.GetUserEncoded(ctx, id)
		if errors.Is(err, userapi.ErrNotFound) {
			return 0
		}
		if err != nil {
			t.Errorf("GetUserEncoded(%d): %v", id, err)
			return -1
		}
		return e.Version
	}
	// check runs every read-your-writes check of a write of id at version
	// v, made through instance home with session token tok.
	check := func(ctx context.Context, home int, id, v int64, tok userapi.Position) {
		other := 1 - home
		if got := readVersion(inst[home], ctx, id); got >= 0 && got < v {
			violation("instance %d wrote id %d at version %d, then read version %d", home, id, v, got)
		}
		sess := &userapi.Session{After: tok}
		us, err := checker.GetUsers(userapi.WithSession(ctx, sess), []int64{id})
		switch {
		case err != nil:
			t.Errorf("GetUsers(%d): %v", id, err)
		case len(us) == 0 || us[0].Version < v:
			violation("instance %d wrote id %d at version %d (token %v); another's batched read with the token returned %v", home, id, v, tok, us)
		}
		if got := readVersion(inst[other], userapi.WithSession(ctx, &userapi.Session{After: tok}), id); got >= 0 && got < v {
			violation("instance %d wrote id %d at version %d (token %v); instance %d, given the token, read version %d", home, id, v, tok, other, got)
		}
		page, err := checker.ListUsers(userapi.WithSession(ctx, &userapi.Session{After: tok}), userapi.UserFilter{AfterID: id - 1, Limit: 1})
		switch {
		case err != nil:
			t.Errorf("ListUsers(after %d): %v", id-1, err)
		case len(page) == 0 || page[0].ID != id || page[0].Version < v:
			violation("instance %d wrote id %d at version %d (token %v); another's list with the token returned %v", home, id, v, tok, page)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			nmu.Lock()
			n := noticed[other][id]
			nmu.Unlock()
			if n >= v {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("instance %d had no notice of id %d at version %d after 5s", other, id, v)
				return
			}
			time.Sleep(time.Millisecond)
		}
		if got := readVersion(inst[other], ctx, id); got >= 0 && got < v {
			violation("instance %d wrote id %d at version %d; instance %d, notified, then read version %d", home, id, v, other, got)
		}
	}

	const workers = 8
	stop := time.Now().Add(8 * time.Second)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			ctx := testenv.Context(t)
			home := w % 2
			for n := 0; time.Now().Before(stop) && !t.Failed(); n++ {
				id := int64(1 + rand.IntN(users))
				switch r := rand.IntN(100); {
				case r < 15:
					sess := &userapi.Session{}
					name := fmt.Sprintf("W%d N%d", w, n)
					u, err := inst[home].UpdateUser(userapi.WithSession(ctx, sess), id, userapi.UserUpdate{Name: &name})
					if err != nil {
						t.Errorf("UpdateUser(%d): %v", id, err)
						return
					}
					writes.Add(1)
					check(ctx, home, id, u.Version, sess.Wrote)
				case r < 18:
					sess := &userapi.Session{}
					u, _, err := inst[home].CreateUser(userapi.WithSession(ctx, sess), userapi.UserCreate{
						Email: fmt.Sprintf("new-%d-%d@example.com", w, n), Name: "New"})
					if err != nil {
						t.Errorf("CreateUser: %v", err)
						return
					}
					writes.Add(1)
					mu.Lock()
					created = append(created, u.ID)
					mu.Unlock()
					check(ctx, home, u.ID, 1, sess.Wrote)
				default:
					readVersion(inst[home], ctx, id)
					reads.Add(1)
				}
			}
		})
	}
	wg.Wait()

	// A last read of every id through both instances while the replica
	// is still behind the last writes, then the tiers against the primary.
	all := make([]int64, 0, users+len(created))
	for id := range int64(users) {
		all = append(all, id+1)
	}
	all = append(all, created...)
	for _, c := range inst {
		for _, id := range all {
			readVersion(c, testenv.Context(t), id)
		}
	}
	for _, c := range inst {
		for _, id := range all {
			checkTiers(t, c, dbs[0], id)
		}
	}

	var onReplica, onPrimary float64
	for _, reg := range regs {
		r, p := routedReads(t, reg)
		onReplica += r
		onPrimary += p
	}
	rereads := value(inst[0].m.replicaRereads) + value(inst[1].m.replicaRereads)
	t.Logf("%d writes, %d plain reads, each write checked 5 ways: %d read-your-writes violations", writes.Load(), reads.Load(), violations.Load())
	t.Logf("the caches' batched reads: %.0f on the replica, %.0f on the primary (replica share %.1f%%); %.0f replica rows read again from the primary",
		onReplica, onPrimary, 100*onReplica/max(1, onReplica+onPrimary), rereads)
	if onReplica == 0 {
		t.Error("the replica served no read")
	}
	if writes.Load() == 0 {
		t.Error("no write was made")
	}
}

// routedReads sums userapi_db_reads_total by role.
func routedReads(t *testing.T, reg *prometheus.Registry) (replica, primary float64) {
	t.Helper()
	return testenv.Sum(t, reg, "userapi_db_reads_total", "role", "replica"),
		testenv.Sum(t, reg, "userapi_db_reads_total", "role", "primary")
}

// replicaSQLite is a SQLite store that says it reads replicas, so the cache
// treats it as one that may (its reads are all the primary's).
type replicaSQLite struct{ userapi.Store }

func (replicaSQLite) ReadsReplicas() bool { return true }

// TestPrimaryCheckBypassesTiers: with a store that reads replicas, a
// GetUser whose session asks for the primary (the HTTP layer's If-Match
// check) reads the store, not the cached copy; other reads still hit.
func TestPrimaryCheckBypassesTiers(t *testing.T) {
	db := newSQLite(t)
	u := mustCreate(t, db, "p@example.com")
	c := newCache(t, replicaSQLite{db}, Config{Mode: ModeLocal, Coalesce: true})
	if v := version(t, c, u.ID); v != 1 {
		t.Fatalf("version %d, want 1", v)
	}
	rename(t, db, u.ID, "Behind the cache's back") // version 2, not invalidated
	if v := version(t, c, u.ID); v != 1 {
		t.Fatalf("the cached copy is version %d, want 1 (still cached)", v)
	}
	ctx := userapi.WithSession(testenv.Context(t), &userapi.Session{Primary: true})
	got, err := c.GetUser(ctx, u.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Version != 2 {
		t.Errorf("GetUser on the primary read version %d, want 2", got.Version)
	}
}

// TestTokenSkipsLocalTier: with a store that reads replicas, a read that
// carries a session token does not take the local tier's copy, which may
// predate the write the token names (made on another instance whose notice
// has not arrived; here, with no notice channel at all); reads without one
// still hit.
func TestTokenSkipsLocalTier(t *testing.T) {
	db := newSQLite(t)
	u := mustCreate(t, db, "k@example.com")
	c := newCache(t, replicaSQLite{db}, Config{Mode: ModeLocal, Coalesce: true})
	if v := version(t, c, u.ID); v != 1 {
		t.Fatalf("version %d, want 1", v)
	}
	rename(t, db, u.ID, "On another instance") // version 2, no notice here
	ctx := userapi.WithSession(testenv.Context(t), &userapi.Session{After: 1})
	e, err := c.GetUserEncoded(ctx, u.ID)
	if err != nil {
		t.Fatal(err)
	}
	if e.Version != 2 {
		t.Errorf("a read with a token got version %d, want 2", e.Version)
	}
	hits := value(c.m.localHit)
	if v := version(t, c, u.ID); v != 2 {
		t.Errorf("a read without a token got version %d after the load filled 2", v)
	}
	if value(c.m.localHit) != hits+1 {
		t.Error("a read without a token did not hit the local tier")
	}
}
