package cache

import (
	"context"
	"sync"
	"testing"
	"time"

	"userapi"
	"userapi/internal/testenv"
)

// TestWriteBeforeGenerationAdopted: a failover that closes no connection of
// the writer (a graceful CLUSTER or SENTINEL FAILOVER, MOVED followed) is
// seen first by another instance, whose probe moves the group to a new
// generation. The writer, not probed yet, must not put its intent and
// tombstone in the old generation, where no one reads: a read on the other
// instance that straddled the commit would fill the old row into the new
// generation unguarded, and every instance, the writer included once it
// adopts the new generation, would serve it until its TTL. The guard
// scripts refuse a stale generation (genGuard); the writer remembers the
// invalidation, probes and applies it in the new generation.
func TestWriteBeforeGenerationAdopted(t *testing.T) {
	url := needRedis(t)
	db := newSQLite(t)
	u := mustCreate(t, db, "gen@example.com")
	prefix := testPrefix()
	hA := &hookStore{Store: db}
	hB := &hookStore{Store: db}
	cfgA := fastTiered(url, prefix)
	cfgA.probeInterval = time.Hour // A does not probe on its own during the test
	a := newCache(t, hA, cfgA)
	b := newCache(t, hB, fastTiered(url, prefix))
	testenv.WaitFor(t, 5*time.Second, "healthy", func() bool { return healthy(a) && healthy(b) })
	version(t, a, u.ID)
	version(t, b, u.ID)

	// The serving Redis is "another" one: the marker no longer names it
	// (what a promoted replica looks like). B probes first.
	ctx := testenv.Context(t)
	c := b.redis.client()
	if err := c.Do(ctx, c.B().Set().Key(prefix+"run").Value("ffffffff").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	g1 := a.redis.shards()[0].gen.Load()
	if err := b.redis.probeNow(); err != nil {
		t.Fatal(err)
	}
	if g2 := b.redis.shards()[0].gen.Load(); g2 == g1 {
		t.Fatal("B did not move generation")
	}
	testenv.WaitFor(t, 5*time.Second, "B healthy", func() bool { return healthy(b) })

	readDone, proceed := make(chan struct{}), make(chan struct{})
	var once sync.Once
	hB.setHook(func(_ []int64, us []*userapi.User, err error) ([]*userapi.User, error) {
		once.Do(func() { close(readDone); <-proceed })
		return us, err
	})
	fills := func() float64 {
		return value(b.m.fillRedisInstalled) + value(b.m.fillRedisStale) + value(b.m.fillRedisSkipped) + value(b.m.fillRedisUnchanged) + value(b.m.fillLate)
	}
	before := fills()
	got := make(chan int64, 1)
	go func() { got <- version(t, b, u.ID) }()
	<-readDone
	v2 := rename(t, a, u.ID, "New").Version // A still on the old generation
	close(proceed)
	<-got
	testenv.WaitFor(t, 5*time.Second, "B's Redis fill sent", func() bool {
		return fills() > before
	})
	t.Logf("B fills: installed %v stale %v skipped %v", value(b.m.fillRedisInstalled), value(b.m.fillRedisStale), value(b.m.fillRedisSkipped))
	// A now probes and adopts the generation B moved to.
	if err := a.redis.probeNow(); err != nil {
		t.Fatal(err)
	}
	if a.redis.shards()[0].gen.Load() == g1 {
		t.Fatal("A did not adopt the new generation")
	}
	testenv.WaitFor(t, 5*time.Second, "A healthy", func() bool { return healthy(a) })
	if v := version(t, a, u.ID); v != v2 {
		t.Errorf("read-your-writes: the writer A reads version %d after writing %d", v, v2)
	}
	cfgC := fastTiered(url, prefix)
	cc := newCache(t, db, cfgC)
	testenv.WaitFor(t, 5*time.Second, "C healthy", func() bool { return healthy(cc) })
	if v := version(t, cc, u.ID); v != v2 {
		t.Errorf("a third instance reads version %d; the database has %d", v, v2)
	}
}

// lagReplica answers non-primary batches from a snapshot taken earlier (a
// replica a few hundred ms behind), and says so.
type lagReplica struct {
	userapi.Store
	mu  sync.Mutex
	old map[int64]*userapi.User
}

func (*lagReplica) ReadsReplicas() bool { return true }

func (l *lagReplica) GetUsers(ctx context.Context, ids []int64) ([]*userapi.User, error) {
	sess := userapi.SessionFrom(ctx)
	l.mu.Lock()
	old := l.old
	l.mu.Unlock()
	if sess != nil && !sess.Primary && old != nil {
		sess.Replica = true
		var out []*userapi.User
		for _, id := range ids {
			if u, ok := old[id]; ok {
				c := *u
				out = append(out, &c)
			}
		}
		return out, nil
	}
	return l.Store.GetUsers(ctx, ids)
}

// TestReplicaRowAfterGenerationMove: after a move to a new key generation
// (a failover's, a restart's, a missed change stream's), the tombstones the
// replica check relies on (olderThanKnown) are gone from the new generation
// and from the flushed local tiers, so for a while batches read the
// primary: a lagging replica's old row would otherwise be filled into the
// new generation and served by every instance.
func TestReplicaRowAfterGenerationMove(t *testing.T) {
	url := needRedis(t)
	db := newSQLite(t)
	u := mustCreate(t, db, "rep@example.com")
	prefix := testPrefix()
	rep := &lagReplica{Store: db}
	a := newCache(t, db, fastTiered(url, prefix))  // the writer, reads the primary
	b := newCache(t, rep, fastTiered(url, prefix)) // reads a replica
	testenv.WaitFor(t, 5*time.Second, "healthy", func() bool { return healthy(a) && healthy(b) })
	version(t, a, u.ID)
	version(t, b, u.ID)
	rep.mu.Lock()
	rep.old = map[int64]*userapi.User{u.ID: u} // the replica has not replayed the write below yet
	rep.mu.Unlock()
	v2 := rename(t, a, u.ID, "New").Version
	// Once A's notice reached B (B's local tier held version 1), B's
	// loads meet the tombstone and read the primary again.
	testenv.WaitFor(t, time.Second, "before the move, B reads the write (the replica check works)", func() bool {
		return version(t, b, u.ID) == v2
	})
	if err := a.redis.moveGeneration(testenv.Context(t)); err != nil {
		t.Fatal(err)
	}
	g := a.redis.shards()[0].gen.Load()
	testenv.WaitFor(t, 5*time.Second, "B on the new generation", func() bool { return b.redis.shards()[0].gen.Load() == g && healthy(b) })
	vb := version(t, b, u.ID)
	time.Sleep(200 * time.Millisecond) // B's Redis fill
	va := version(t, a, u.ID)
	if vb != v2 || va != v2 {
		t.Errorf("after the generation move: B reads %d, the writer A reads %d; the database has %d", vb, va, v2)
	}
}

// TestReplicaWithoutRedis: an instance whose Redis does not answer knows
// nothing of what other instances wrote (no tombstone to compare, no
// notice), so its batches read the primary, not a lagging replica.
func TestReplicaWithoutRedis(t *testing.T) {
	url := needRedis(t)
	db := newSQLite(t)
	u := mustCreate(t, db, "noredis@example.com")
	prefix := testPrefix()
	a := newCache(t, db, fastTiered(url, prefix)) // the writer, on a healthy Redis
	testenv.WaitFor(t, 5*time.Second, "A healthy", func() bool { return healthy(a) })
	dead := startRedis(t)
	dead.Stop()
	rep := &lagReplica{Store: db}
	cfg := fastTiered(dead.URL(), prefix)
	cfg.Mode = ModeRedis // no local tier: every read asks the loader
	b := newCache(t, rep, cfg)
	rep.mu.Lock()
	rep.old = map[int64]*userapi.User{u.ID: u} // the replica lacks the write below
	rep.mu.Unlock()
	v2 := rename(t, a, u.ID, "New").Version
	for range 5 {
		if v := version(t, b, u.ID); v != v2 {
			t.Fatalf("B, its Redis down, reads version %d from a lagging replica; the database has %d", v, v2)
		}
	}
}
