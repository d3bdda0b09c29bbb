package cache

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"userapi"
	"userapi/internal/testenv"
)

// The Redis faults that used to leave a stale entry behind. Each test ends
// the same way: within the bound, every instance serves what the database
// holds.

// settle is long enough for every liveness check of fastTiered to have run
// after a fault, so "healthy" means it was noticed and dealt with.
const settle = 500 * time.Millisecond

// outsideRename changes the row in the database without the cache knowing,
// as psql or another service would.
func outsideRename(t *testing.T, db userapi.Store, id int64, name string) int64 {
	t.Helper()
	u, err := db.UpdateUser(testenv.Context(t), id, userapi.UserUpdate{Name: &name})
	if err != nil {
		t.Fatal(err)
	}
	return u.Version
}

// serves waits until c serves version want of every id, failing after d.
func serves(t *testing.T, c *Store, ids []int64, want map[int64]int64, d time.Duration, who string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for _, id := range ids {
		for {
			v := version(t, c, id)
			if v == want[id] {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still serves user %d at version %d after %v; the database has %d", who, id, v, d, want[id])
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// TestLocalCopyOfRedisEntryExpires: an entry B copied from Redis into its
// local tier must expire when the Redis entry does. A change no instance
// invalidated (made outside the API, with no change stream) is then seen
// after the TTL, the last line of defence, on every instance.
func TestLocalCopyOfRedisEntryExpires(t *testing.T) {
	url := needRedis(t)
	db := newSQLite(t)
	ids := createUsers(t, db, "ttl", 5)
	prefix := testPrefix()
	cfg := fastTiered(url, prefix)
	cfg.TTL = 300 * time.Millisecond
	a := newCache(t, db, cfg)
	b := newCache(t, db, cfg)
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	for _, id := range ids {
		version(t, a, id) // fills Redis
	}
	for _, id := range ids {
		version(t, b, id) // copies from Redis
	}
	if value(b.m.redisHit) == 0 {
		t.Fatal("B did not read through Redis")
	}
	want := map[int64]int64{}
	start := time.Now()
	for _, id := range ids {
		want[id] = outsideRename(t, db, id, "Outside")
	}
	serves(t, b, ids, want, 2*time.Second, "B")
	serves(t, a, ids, want, 2*time.Second, "A")
	// Without a change stream this is the bound for a write made outside
	// the service: the TTL.
	t.Logf("outside writes served by both instances %v after the first, with a TTL of %v", time.Since(start).Round(time.Millisecond), cfg.TTL)
}

// TestRedisRefusingWrites: a Redis that still answers reads and PUBLISH but
// refuses writes (out of memory under noeviction; a read-only replica) takes
// no tombstones, so every instance must stop trusting both tiers until it
// takes writes again.
func TestRedisRefusingWrites(t *testing.T) {
	faults := []struct {
		name   string
		inject func(*testenv.RedisServer) error
		heal   func(*testenv.RedisServer) error
	}{
		{
			name: "oom",
			inject: func(r *testenv.RedisServer) error {
				if err := r.Do("CONFIG", "SET", "maxmemory-policy", "noeviction"); err != nil {
					return err
				}
				return r.Do("CONFIG", "SET", "maxmemory", "1")
			},
			heal: func(r *testenv.RedisServer) error { return r.Do("CONFIG", "SET", "maxmemory", "0") },
		},
		{
			name: "readonly",
			// A replica of a master that is not there: it keeps its data,
			// answers reads and refuses writes.
			inject: func(r *testenv.RedisServer) error { return r.Do("REPLICAOF", "127.0.0.1", "1") },
			heal:   func(r *testenv.RedisServer) error { return r.Do("REPLICAOF", "NO", "ONE") },
		},
	}
	for _, f := range faults {
		t.Run(f.name, func(t *testing.T) {
			srv := startRedis(t)
			db := newSQLite(t)
			ids := createUsers(t, db, f.name, 20)
			prefix := testPrefix()
			a := newCache(t, db, fastTiered(srv.URL(), prefix))
			b := newCache(t, db, fastTiered(srv.URL(), prefix))
			testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
			for _, id := range ids {
				version(t, a, id)
				version(t, b, id)
				version(t, b, id) // a local hit
			}
			if err := f.inject(srv); err != nil {
				t.Fatal(err)
			}
			want := map[int64]int64{}
			for _, id := range ids {
				want[id] = rename(t, a, id, "During").Version
			}
			serves(t, a, ids, want, 0, "A (read-your-writes)")
			serves(t, b, ids, want, 3*time.Second, "B")
			if err := f.heal(srv); err != nil {
				t.Fatal(err)
			}
			testenv.WaitFor(t, 5*time.Second, "instances healthy again", func() bool { return healthy(a) && healthy(b) })
			serves(t, b, ids, want, 0, "B after recovery")
			for _, id := range ids {
				checkTiers(t, a, db, id)
				checkTiers(t, b, db, id)
			}
		})
	}
}

// TestRedisStalledBelowHeartbeat: a Redis slower than the calls' deadline
// but fast enough for a heartbeat to come back within the channel timeout
// must not keep the local tier in service while writes' invalidations time
// out.
func TestRedisStalledBelowHeartbeat(t *testing.T) {
	srv := startRedis(t)
	db := newSQLite(t)
	ids := createUsers(t, db, "slow", 10)
	prefix := testPrefix()
	a := newCache(t, db, fastTiered(srv.URL(), prefix))
	b := newCache(t, db, fastTiered(srv.URL(), prefix))
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	for _, id := range ids {
		version(t, a, id)
		version(t, b, id)
	}
	// Stall Redis in bursts: paused 150 ms of every 200 ms, so every call
	// with the 50 ms deadline may time out while PUBLISH still gets through
	// between the bursts.
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			srv.Pause()
			select {
			case <-stop:
				srv.Resume()
				return
			case <-time.After(150 * time.Millisecond):
			}
			srv.Resume()
			time.Sleep(50 * time.Millisecond)
		}
	}()
	want := map[int64]int64{}
	for _, id := range ids {
		want[id] = rename(t, a, id, "Slow").Version
		// Read-your-writes on the writer, whose invalidation may have
		// timed out.
		if v := version(t, a, id); v < want[id] {
			t.Fatalf("A read user %d at version %d right after writing version %d", id, v, want[id])
		}
	}
	serves(t, b, ids, want, 3*time.Second, "B during the stall")
	close(stop)
	<-done
	testenv.WaitFor(t, 5*time.Second, "instances healthy again", func() bool { return healthy(a) && healthy(b) })
	serves(t, b, ids, want, 0, "B after the stall")
	serves(t, a, ids, want, 0, "A after the stall")
	for _, id := range ids {
		checkTiers(t, a, db, id)
		checkTiers(t, b, db, id)
	}
}

// TestRedisRestartedEmptyDuringFill: a fill read the row before a write;
// Redis then restarted empty, losing the write's tombstone; the fill must
// not install the old row into the new Redis, where every instance (the
// writer too, once its channel reconnects and its local tier starts afresh)
// would read it.
func TestRedisRestartedEmptyDuringFill(t *testing.T) {
	srv := startRedis(t)
	sq := newSQLite(t)
	u := mustCreate(t, sq, "restart@example.com")
	h := &hookStore{Store: sq}
	prefix := testPrefix()
	a := newCache(t, h, fastTiered(srv.URL(), prefix))
	b := newCache(t, sq, fastTiered(srv.URL(), prefix))
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })

	release := gateFirstLoad(t, h)
	read := make(chan int64)
	go func() { read <- version(t, a, u.ID) }()
	testenv.WaitFor(t, 2*time.Second, "the fill's read in flight", func() bool { return h.reads() == 1 })
	nu := rename(t, a, u.ID, "Newer")

	srv.Stop()
	srv.Start()
	release()
	<-read
	time.Sleep(settle)

	serves(t, a, []int64{u.ID}, map[int64]int64{u.ID: nu.Version}, 0, "A (read-your-writes)")
	testenv.WaitFor(t, 5*time.Second, "instances healthy again", func() bool { return healthy(a) && healthy(b) })
	serves(t, a, []int64{u.ID}, map[int64]int64{u.ID: nu.Version}, 0, "A after the restart")
	serves(t, b, []int64{u.ID}, map[int64]int64{u.ID: nu.Version}, 0, "B after the restart")
	checkTiers(t, a, sq, u.ID)
	checkTiers(t, b, sq, u.ID)
}

// TestRedisRestoredFromOldSnapshot: Redis comes back from a snapshot taken
// before a write, holding the old row as a value. Every instance must move
// to a new key generation instead of reading it.
func TestRedisRestoredFromOldSnapshot(t *testing.T) {
	srv := startRedisSaving(t)
	db := newSQLite(t)
	ids := createUsers(t, db, "snap", 5)
	prefix := testPrefix()
	a := newCache(t, db, fastTiered(srv.URL(), prefix))
	b := newCache(t, db, fastTiered(srv.URL(), prefix))
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	for _, id := range ids {
		version(t, a, id)
		version(t, b, id)
	}
	if err := srv.Do("SAVE"); err != nil {
		t.Fatal(err)
	}
	want := map[int64]int64{}
	for _, id := range ids {
		want[id] = rename(t, a, id, "AfterSnapshot").Version
		version(t, a, id) // the new version in Redis too
	}
	srv.Stop()
	srv.Start() // loads the snapshot, with the old rows in it
	time.Sleep(settle)
	testenv.WaitFor(t, 5*time.Second, "instances healthy again", func() bool { return healthy(a) && healthy(b) })
	serves(t, a, ids, want, 0, "A")
	serves(t, b, ids, want, 0, "B")
	for _, id := range ids {
		checkTiers(t, a, db, id)
		checkTiers(t, b, db, id)
	}
}

// TestRedisEvictingPolicyRefused: a Redis whose maxmemory-policy may evict
// (a maxmemory set, any policy but noeviction) is not used at all, since an
// evicted tombstone or intent would let a stale fill in: reads go to the
// database and the refusal is logged with its fix. Once the policy is
// noeviction, the tier is used.
func TestRedisEvictingPolicyRefused(t *testing.T) {
	// volatile-ttl is the worst: it evicts the short-lived tombstones and
	// intents first.
	for _, policy := range []string{"allkeys-lru", "volatile-ttl"} {
		t.Run(policy, func(t *testing.T) {
			srv := startRedis(t)
			prefix := testPrefix()
			// An instance that used this Redis before its policy changed
			// (which it does not notice until Redis restarts).
			before := newCache(t, newSQLite(t), fastTiered(srv.URL(), prefix))
			testenv.WaitFor(t, 5*time.Second, "the earlier instance healthy", func() bool { return healthy(before) })
			gen := before.redis.shards()[0].gen.Load()
			for _, kv := range [][2]string{{"maxmemory", "100mb"}, {"maxmemory-policy", policy}} {
				if err := srv.Do("CONFIG", "SET", kv[0], kv[1]); err != nil {
					t.Fatal(err)
				}
			}
			sq := newSQLite(t)
			ids := createUsers(t, sq, "evict", 3)
			h := &hookStore{Store: sq}
			logs := &testenv.Buffer{}
			cfg := fastTiered(srv.URL(), prefix)
			cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
			c := newCache(t, h, cfg)

			time.Sleep(settle) // several probes
			if redisUsable(c) {
				t.Fatalf("the Redis tier is in use with maxmemory-policy %s", policy)
			}
			for range 2 {
				for _, id := range ids {
					if v := version(t, c, id); v != 1 {
						t.Fatalf("user %d: version %d, want 1", id, v)
					}
				}
			}
			// The local tier is bypassed too while Redis is unusable:
			// every read is a database read.
			if got, want := h.reads(), int64(2*len(ids)); got != want {
				t.Errorf("%d database reads, want %d (one per read)", got, want)
			}
			if n := value(c.m.redisHit) + value(c.m.fillRedisInstalled); n != 0 {
				t.Errorf("%v Redis hits and fills, want none", n)
			}
			if value(c.m.redisSkip) == 0 {
				t.Error("no Redis lookup counted as skipped")
			}
			if got := value(c.m.breakerState); got != 2 {
				t.Errorf("breaker state %v, want 2 (open)", got)
			}
			log := logs.String()
			if n := strings.Count(log, "redis tier not used"); n != 1 {
				t.Errorf("the refusal logged %d times, want once", n)
			}
			for _, want := range []string{"redis tier not used", "maxmemory-policy is " + policy, "set maxmemory-policy noeviction"} {
				if !strings.Contains(log, want) {
					t.Errorf("the log does not say %q:\n%s", want, log)
				}
			}

			// A refused Redis whose policy cannot be read stays refused.
			if err := srv.Do("ACL", "SETUSER", "default", "-config"); err != nil {
				t.Fatal(err)
			}
			time.Sleep(settle)
			if redisUsable(c) {
				t.Fatal("the Redis tier is in use again after its policy could not be read")
			}
			if err := srv.Do("ACL", "SETUSER", "default", "+config"); err != nil {
				t.Fatal(err)
			}

			if err := srv.Do("CONFIG", "SET", "maxmemory-policy", "noeviction"); err != nil {
				t.Fatal(err)
			}
			testenv.WaitFor(t, 5*time.Second, "instance healthy with noeviction", func() bool { return healthy(c) })
			// While the policy could evict, the earlier instance's
			// tombstones may have gone: its entries are not trusted.
			if c.redis.shards()[0].gen.Load() == gen {
				t.Error("the tier is in use again in the generation the earlier instance filled")
			}
			for _, id := range ids {
				version(t, c, id) // fills Redis
			}
			testenv.WaitFor(t, 2*time.Second, "Redis filled", func() bool { return value(c.m.fillRedisInstalled) == float64(len(ids)) })
			for _, id := range ids {
				checkTiers(t, c, sq, id)
			}
		})
	}
}
