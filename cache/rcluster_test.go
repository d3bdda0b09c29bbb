package cache

import (
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"userapi/internal/testenv"
)

// Redis Cluster and Sentinel, on servers the tests start themselves
// (USERAPI_TEST_REDIS_SERVER): the cluster's key layout, sharded notices,
// and a master killed under load, with the coherence checks of
// TestCoherence.

// Ports (see testenv): the cluster tests use 7100-7105, the Sentinel tests
// 7110-7113 and 26400-26405.

// TestShardTags: the groups' hash tags put them in distinct, evenly spread
// slots, and crc16 is Redis's (the slots CLUSTER KEYSLOT gives for the
// examples of the cluster specification).
func TestShardTags(t *testing.T) {
	if got := crc16("123456789"); got != 0x31C3 {
		t.Fatalf("crc16(123456789) = %#x, want 0x31c3", got)
	}
	slots := map[int]bool{}
	for i := range clusterShards {
		tag := shardTag(i, clusterShards)
		s := int(crc16(tag) % 16384)
		lo, hi := i*16384/clusterShards, (i+1)*16384/clusterShards
		if s < lo || s >= hi || slots[s] {
			t.Errorf("group %d: tag %q in slot %d, want a new one in [%d, %d)", i, tag, s, lo, hi)
		}
		slots[s] = true
	}
	l := newLayout("userapi:", true, true)
	sh := l.shardOf(37)
	tag := "{" + shardTag(37%clusterShards, clusterShards) + "}"
	for _, k := range []string{sh.key(37), sh.genKey, sh.runKey, sh.probeK, sh.channel} {
		if i := strings.IndexByte(k, '{'); i < 0 || !strings.HasPrefix(k[i:], tag) {
			t.Errorf("key %q does not hash by its group's tag %s", k, tag)
		}
	}
	if one := newLayout("userapi:", false, true); one.shards[0].key(5) != "userapi:u:0:5" || one.shards[0].channel != "userapi:notices" {
		t.Errorf("one server's keys changed: %q, %q", one.shards[0].key(5), one.shards[0].channel)
	}
}

// TestRedisClusterTiered: tiered instances over a Redis Cluster of 3
// masters use the cluster's layout; writes on one reach the others through
// the sharded channels of every group; the slots Redis reports for the
// keys are the groups'; each notice reaches only its shard (a node of
// another shard sees no SPUBLISH traffic for it).
func TestRedisClusterTiered(t *testing.T) {
	rc := testenv.StartRedisCluster(t, 0, 3, 1)
	db := newSQLite(t)
	ids := createUsers(t, db, "cl", 64)
	prefix := testPrefix()
	a := newCache(t, db, fastTiered(rc.URL(), prefix))
	b := newCache(t, db, fastTiered(rc.URL(), prefix))
	testenv.WaitFor(t, 10*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	if !a.redis.lay.Load().cluster || len(a.redis.shards()) != clusterShards {
		t.Fatalf("layout: cluster %v, %d groups", a.redis.lay.Load().cluster, len(a.redis.shards()))
	}
	for _, id := range ids {
		version(t, a, id) // fills Redis
		version(t, b, id) // copies from Redis
	}
	if value(b.m.redisHit) == 0 {
		t.Fatal("B read nothing from Redis")
	}
	want := map[int64]int64{}
	for _, id := range ids {
		want[id] = rename(t, a, id, "Renamed").Version
	}
	serves(t, b, ids, want, 2*time.Second, "B")
	if n := noticesIn(b); n < float64(len(ids)) {
		t.Errorf("B heard %v notices for %d writes", n, len(ids))
	}
	for _, id := range ids {
		checkTiers(t, a, db, id)
		checkTiers(t, b, db, id)
	}
	// One seed is enough: the client finds the cluster behind it. And the
	// redis mode (no local tier, so no notices to hear or send; it is not
	// meant to be mixed with tiered writers) reads the same keys.
	one := newCache(t, db, fastTiered("redis://"+rc.Nodes[1].Addr(), prefix))
	rcfg := fastTiered(rc.URL(), prefix)
	rcfg.Mode = ModeRedis
	rm := newCache(t, db, rcfg)
	testenv.WaitFor(t, 10*time.Second, "one-seed and redis-mode instances healthy", func() bool {
		return healthy(one) && redisUsable(rm)
	})
	if !one.redis.lay.Load().cluster || !rm.redis.lay.Load().cluster {
		t.Fatal("an instance given one seed, or in redis mode, does not use the cluster layout")
	}
	serves(t, one, ids, want, 2*time.Second, "the one-seed instance")
	serves(t, rm, ids, want, 2*time.Second, "the redis-mode instance")
	for _, id := range ids[:8] {
		want[id] = rename(t, one, id, "Again").Version
	}
	serves(t, b, ids, want, 2*time.Second, "B, after the one-seed instance wrote")
	serves(t, rm, ids, want, 2*time.Second, "the redis-mode instance, after the one-seed instance wrote")

	// Starting every tier afresh (a lost change-stream position, too many
	// invalidations missed) moves every group, and the other instance
	// follows through every group's channel.
	gensOf := func(c *Store) []int64 {
		var g []int64
		for _, sh := range c.redis.shards() {
			g = append(g, sh.gen.Load())
		}
		return g
	}
	old := gensOf(a)
	if err := a.redis.moveGeneration(testenv.Context(t)); err != nil {
		t.Fatal(err)
	}
	moved := gensOf(a)
	for i := range moved {
		if moved[i] <= old[i] {
			t.Fatalf("group %d: generation %d after a move from %d", i, moved[i], old[i])
		}
	}
	testenv.WaitFor(t, 2*time.Second, "B on every new generation", func() bool { return slices.Equal(gensOf(b), moved) })
	serves(t, b, ids, want, 2*time.Second, "B after the move")

	// Each group's keys are in the slot of its tag, as Redis hashes them.
	sh := a.redis.lay.Load().shardOf(ids[0])
	node := rc.MasterOf(t, sh.key(ids[0]))
	for _, k := range []string{sh.genKey, sh.channel, sh.runKey} {
		if m := rc.MasterOf(t, k); m != node {
			t.Errorf("%s is on %d, %s on %d", k, m.Port, sh.key(ids[0]), node.Port)
		}
	}
	// Sharded pub/sub: no notice or heartbeat goes out by PUBLISH, which a
	// cluster forwards to every node; SPUBLISH stays within its shard.
	spub := 0
	for _, n := range rc.Nodes {
		info, err := n.Do("INFO", "commandstats")
		if err != nil {
			t.Fatal(err)
		}
		if p := statCalls(info, "publish"); p != 0 {
			t.Errorf("node %d ran PUBLISH %d times; notices must be sharded", n.Port, p)
		}
		spub += statCalls(info, "spublish")
	}
	if spub == 0 {
		t.Error("no node ran SPUBLISH")
	}
}

// statCalls reads calls=N of a command's line in INFO commandstats.
func statCalls(info, cmd string) int {
	for line := range strings.Lines(info) {
		if rest, ok := strings.CutPrefix(line, "cmdstat_"+cmd+":calls="); ok {
			n, _ := strconv.Atoi(rest[:strings.IndexByte(rest, ',')])
			return n
		}
	}
	return 0
}

// sentinelFailoverWindow is the staleness allowed a read on an instance
// other than the writer's when a Sentinel set fails over: TestCoherence's.
// While the set has no master every instance bypasses both tiers, and the
// sentinels tell every client of the new master at once (+switch-master).
const sentinelFailoverWindow = coherenceWindow

// clusterFailoverWindow is that staleness when a cluster's master fails
// over. An instance finds the promoted replica when its client next
// refreshes the slot map, which rueidis does after an error (or every
// second) following a random delay of up to 1 s, so that many clients do
// not all ask at once. Until then that instance's probe fails and a write
// it makes of an id of the failed shard stays pending, while an instance
// that refreshed earlier is back on Redis and its local tier: it serves
// the id's old version until the writer's probe passes and applies the
// invalidation. Bound: 1 s of refresh delay, two probe ticks (50 ms here),
// and TestCoherence's margin.
const clusterFailoverWindow = time.Second + coherenceWindow

// TestRedisClusterFailover: three tiered instances under read and write
// load over a Redis Cluster of 3 masters with a replica each; the master
// that holds the first key is killed with SIGKILL, and its replica takes
// over. Checks TestCoherence's (a), (b) and (c) (no failed read, no
// read-your-writes violation, every tier equals the database afterwards),
// and that the killed master's groups, and only they, moved to a new
// generation on every instance: the failover was treated as a restart
// that may have lost writes.
func TestRedisClusterFailover(t *testing.T) {
	rc := testenv.StartRedisCluster(t, 0, 3, 1)
	var victim *testenv.Node
	var victimGroups []int
	var inst []*Store
	gens := func(c *Store) []int64 {
		var g []int64
		for _, sh := range c.redis.shards() {
			g = append(g, sh.gen.Load())
		}
		return g
	}
	var before []int64
	var outage [2]time.Time
	runCoherence(t, coherenceRun{
		url: rc.URL(), keys: 8, run: 8 * time.Second, window: clusterFailoverWindow,
		pause: 3 * time.Millisecond, outage: &outage,
		keysCreated: func(ids []int64) {
			tag := func(i int) string { return "x{" + shardTag(i, clusterShards) + "}" }
			victim = rc.MasterOf(t, tag(int(uint64(ids[0])%clusterShards)))
			for i := range clusterShards {
				if rc.MasterOf(t, tag(i)) == victim {
					victimGroups = append(victimGroups, i)
				}
			}
			t.Logf("master %d holds %d of the %d groups, key %d's among them", victim.Port, len(victimGroups), clusterShards, ids[0])
		},
		ready: func(instances []*Store) {
			inst = instances
			before = gens(inst[0])
			for _, c := range inst {
				if !c.redis.lay.Load().cluster {
					t.Fatal("an instance does not use the cluster layout")
				}
			}
		},
		fault: func(start time.Time, run time.Duration) {
			time.Sleep(run * 2 / 10)
			outage[0] = time.Now()
			victim.Kill()
			t.Logf("master %d killed at %v", victim.Port, time.Since(start).Round(time.Millisecond))
			rc.WaitFailover(t, victim, 20*time.Second)
			outage[1] = time.Now()
			t.Logf("cluster whole again (replica promoted) at %v", time.Since(start).Round(time.Millisecond))
			if rest := run - time.Since(start); rest > 0 {
				time.Sleep(rest)
			}
		},
	})
	if t.Failed() {
		return
	}
	for i, c := range inst {
		after := gens(c)
		for g := range after {
			moved := after[g] != before[g]
			if want := slices.Contains(victimGroups, g); moved != want {
				t.Errorf("instance %d: group %d moved generation %v, want %v (the killed master's: %v)", i, g, moved, want, want)
			}
		}
	}
}

// TestRedisSentinelFailover: three tiered instances under read and write
// load over a master watched by three sentinels; the master is killed with
// SIGKILL and the sentinels promote its replica. The same checks as the
// cluster's, and every instance ends on the promoted replica (the run id
// it probed is the replica's) under a new generation.
func TestRedisSentinelFailover(t *testing.T) {
	ss := testenv.StartSentinelSet(t, "userapi-test", 10, 1, 0, 3)
	var inst []*Store
	var before int64
	var outage [2]time.Time
	runCoherence(t, coherenceRun{
		url: ss.URL(), keys: 4, run: 6 * time.Second, window: sentinelFailoverWindow,
		pause: 2 * time.Millisecond, outage: &outage,
		ready: func(instances []*Store) {
			inst = instances
			before = inst[0].redis.shards()[0].gen.Load()
		},
		fault: func(start time.Time, run time.Duration) {
			time.Sleep(run * 2 / 10)
			outage[0] = time.Now()
			ss.Servers[0].Kill()
			t.Logf("master %d killed at %v", ss.Servers[0].Port, time.Since(start).Round(time.Millisecond))
			deadline := time.Now().Add(20 * time.Second)
			for ss.Master(t) == ss.Servers[0].Port {
				if time.Now().After(deadline) {
					t.Error("the sentinels did not promote the replica within 20s")
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
			outage[1] = time.Now()
			t.Logf("sentinels promoted %d at %v", ss.Master(t), time.Since(start).Round(time.Millisecond))
			if rest := run - time.Since(start); rest > 0 {
				time.Sleep(rest)
			}
		},
	})
	if t.Failed() {
		return
	}
	info, err := ss.Servers[1].Do("INFO", "server")
	if err != nil {
		t.Fatal(err)
	}
	_, run, _ := strings.Cut(info, "run_id:")
	run = strings.TrimSpace(run[:strings.IndexByte(run, '\n')])
	for i, c := range inst {
		sh := c.redis.shards()[0]
		if got := sh.runID.Load(); got == nil || *got != run {
			t.Errorf("instance %d probed run id %v, want the promoted replica's %s", i, got, run)
		}
		if sh.gen.Load() == before {
			t.Errorf("instance %d is still on generation %d after the failover", i, before)
		}
	}
}

// TestRedisClusterManualFailover: a graceful failover (CLUSTER FAILOVER on
// a replica) closes no connection: the old master stays up as a replica,
// answers MOVED and unsubscribes the shard channels of its slots. The
// instances follow it, move the failed-over master's groups (only they)
// to a new generation, and writes on one still reach the other.
func TestRedisClusterManualFailover(t *testing.T) {
	rc := testenv.StartRedisCluster(t, 0, 3, 1)
	db := newSQLite(t)
	ids := createUsers(t, db, "mf", 64)
	a, b := warmPair(t, db, fastTiered(rc.URL(), testPrefix()), ids)
	gens := func(c *Store) []int64 {
		var g []int64
		for _, sh := range c.redis.shards() {
			g = append(g, sh.gen.Load())
		}
		return g
	}
	before := gens(a)
	master := rc.MasterOf(t, "x{"+shardTag(0, clusterShards)+"}")
	var groups []int
	for i := range clusterShards {
		if rc.MasterOf(t, "x{"+shardTag(i, clusterShards)+"}") == master {
			groups = append(groups, i)
		}
	}
	replica := rc.ReplicaOf(t, master)
	if _, err := replica.Do("CLUSTER", "FAILOVER"); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if role, _ := replica.Do("INFO", "replication"); strings.Contains(role, "role:master") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the replica was not promoted within 20s")
		}
	}
	testenv.WaitFor(t, 10*time.Second, "every instance on the new master's generations, healthy", func() bool {
		for _, c := range []*Store{a, b} {
			g := gens(c)
			for _, i := range groups {
				if g[i] == before[i] {
					return false
				}
			}
			if !healthy(c) {
				return false
			}
		}
		return true
	})
	for _, c := range []*Store{a, b} {
		g := gens(c)
		for i := range g {
			if !slices.Contains(groups, i) && g[i] != before[i] {
				t.Errorf("group %d, not on the failed-over master, moved generation", i)
			}
		}
	}
	want := map[int64]int64{}
	for _, id := range ids {
		want[id] = rename(t, a, id, "After").Version
	}
	serves(t, b, ids, want, 2*time.Second, "B")
	for _, id := range ids {
		checkTiers(t, a, db, id)
		checkTiers(t, b, db, id)
	}
}

// TestRedisSentinelManualFailover: a graceful SENTINEL FAILOVER leaves the
// old master up, as a replica: no connection closes, and the instances
// must follow the sentinels' announcement (or find the demoted master
// refusing writes), move to a new generation on the new master, and keep
// writes on one reaching the other.
func TestRedisSentinelManualFailover(t *testing.T) {
	ss := testenv.StartSentinelSet(t, "userapi-mf", 12, 1, 3, 3)
	db := newSQLite(t)
	ids := createUsers(t, db, "smf", 16)
	a, b := warmPair(t, db, fastTiered(ss.URL(), testPrefix()), ids)
	before := a.redis.shards()[0].gen.Load()
	if _, err := ss.Sentinels[0].Do("SENTINEL", "FAILOVER", ss.Name); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ss.Master(t) != ss.Servers[1].Port; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the sentinels did not promote the replica within 20s")
		}
	}
	info, err := ss.Servers[1].Do("INFO", "server")
	if err != nil {
		t.Fatal(err)
	}
	_, run, _ := strings.Cut(info, "run_id:")
	run = strings.TrimSpace(run[:strings.IndexByte(run, '\n')])
	testenv.WaitFor(t, 10*time.Second, "every instance on the new master, healthy", func() bool {
		for _, c := range []*Store{a, b} {
			sh := c.redis.shards()[0]
			if got := sh.runID.Load(); got == nil || *got != run || sh.gen.Load() == before || !healthy(c) {
				return false
			}
		}
		return true
	})
	want := map[int64]int64{}
	for _, id := range ids {
		want[id] = rename(t, a, id, "After").Version
	}
	serves(t, b, ids, want, 2*time.Second, "B")
	for _, id := range ids {
		checkTiers(t, a, db, id)
		checkTiers(t, b, db, id)
	}
}
