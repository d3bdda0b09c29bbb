package cache

import (
	"fmt"
	"testing"
	"time"

	"userapi/internal/testenv"
)

// TestGuardRulesAgree: the admission rules are written twice, in Go for the
// local tier (admit, localTier.tombstone and intent) and in Lua for Redis
// (fillScript, invalidateScript, intentScript). The same table of states and
// operations runs through both, so the two cannot drift: every operation
// from every state must end in the same entry, and fills with the same
// verdict.
func TestGuardRulesAgree(t *testing.T) {
	url := needRedis(t)
	db := newSQLite(t)
	c := newCache(t, db, Config{Mode: ModeTiered, RedisURL: url, KeyPrefix: testPrefix()})
	testenv.WaitFor(t, 5*time.Second, "redis usable", func() bool { return c.redis.usable() && c.redis.shards()[0].runID.Load() != nil })
	r := c.redis

	val := func(v int64) *entry {
		return &entry{kind: kindValue, version: v, json: []byte(fmt.Sprintf(`{"v":%d}`, v)), epoch: 1, ttl: time.Minute}
	}
	absent := &entry{kind: kindAbsent, epoch: 1, ttl: time.Minute}
	tomb := func(v int64) *entry { return &entry{kind: kindTombstone, version: v, ttl: time.Minute} }
	intent := func(v int64) *entry { return &entry{kind: kindIntent, version: v, ttl: time.Minute} }

	states := map[string]*entry{
		"nothing": nil, "value 3": val(3), "absent": absent,
		"tombstone 3": tomb(3), "intent 3": intent(3), "intent 0": intent(0),
		"poison": tomb(poisonVersion),
	}
	type op struct {
		name  string
		local func(l *localTier, id int64, st *epoch) string
		redis func(key string) string
	}
	verdict := map[fillResult]string{fillInstalled: "installed", fillStale: "stale", fillUnchanged: "unchanged", fillSkipped: "skipped"}
	redisVerdict := map[int64]string{1: "installed", 0: "stale", 2: "unchanged", 3: "skipped"}
	fillOp := func(name string, e *entry) op {
		return op{
			name: name,
			local: func(l *localTier, id int64, st *epoch) string {
				return verdict[l.fill(id, e, st)]
			},
			redis: func(key string) string {
				f := fillCall{keys: []string{r.shards()[0].runKey}, args: []string{*r.shards()[0].runID.Load()}}
				f.add(key, e)
				vals, err := r.fillLua.exec(testenv.Context(t), r.client(), f.keys, f.args).AsIntSlice()
				if err != nil || len(vals) != 1 {
					t.Fatalf("%s: %v, %v", name, vals, err)
				}
				return redisVerdict[vals[0]]
			},
		}
	}
	tombOp := func(name string, v int64) op {
		return op{
			name: name,
			local: func(l *localTier, id int64, _ *epoch) string {
				l.tombstone(id, v, time.Minute)
				return ""
			},
			redis: func(key string) string {
				if err := r.inval.exec(testenv.Context(t), r.client(), []string{key, r.shards()[0].genKey}, []string{fmt.Sprint(v), "60000", "", ""}).Error(); err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				return ""
			},
		}
	}
	ops := []op{
		fillOp("fill value 2", val(2)), fillOp("fill value 3", val(3)), fillOp("fill value 4", val(4)),
		fillOp("fill absent", absent),
		tombOp("tombstone 2", 2), tombOp("tombstone 3", 3), tombOp("tombstone 4", 4),
		tombOp("poison", poisonVersion), tombOp("release", releaseVersion),
		{
			name: "intent",
			local: func(l *localTier, id int64, _ *epoch) string {
				l.intent(id, time.Minute)
				return ""
			},
			redis: func(key string) string {
				if err := r.intent.exec(testenv.Context(t), r.client(), []string{key, r.shards()[0].genKey}, []string{"60000", "", ""}).Error(); err != nil {
					t.Fatalf("intent: %v", err)
				}
				return ""
			},
		},
	}
	describe := func(e *entry) string {
		if e == nil {
			return "nothing"
		}
		return fmt.Sprintf("%s", encodeEntry(e))
	}
	id := int64(0)
	for sname, s := range states {
		for _, o := range ops {
			t.Run(sname+"/"+o.name, func(t *testing.T) {
				id++
				l, err := newLocalTier(1 << 20)
				if err != nil {
					t.Fatal(err)
				}
				var st epoch
				st.Store(1)
				key := r.key(id)
				client := r.client()
				if err := client.Do(testenv.Context(t), client.B().Del().Key(key).Build()).Error(); err != nil {
					t.Fatal(err)
				}
				if s != nil {
					l.c.Set(id, s)
					if err := client.Do(testenv.Context(t), client.B().Set().Key(key).Value(encodeEntry(s)).Px(time.Minute).Build()).Error(); err != nil {
						t.Fatal(err)
					}
				}
				gotLocal := o.local(l, id, &st)
				gotRedis := o.redis(key)
				if gotLocal != gotRedis {
					t.Errorf("verdict: local %q, Redis %q", gotLocal, gotRedis)
				}
				le, _ := l.get(id)
				re, err := r.getWithin(testenv.Context(t), id, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if describe(le) != describe(re) {
					t.Errorf("after it: local holds %s, Redis %s", describe(le), describe(re))
				}
			})
		}
	}
}
