package cache

import (
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"userapi"
	"userapi/internal/pgtest"
	"userapi/internal/testenv"
)

// coherenceWindow is the staleness the coherence test allows a read on an
// instance other than the writer's. The design's bound is the largest of:
// the notice's delivery (well under a millisecond), noticing that the
// channel is down (at once when Redis crashes and the connection closes; at
// most channelTimeout, 400 ms in fastTiered, when it stalls), and, after an
// outage, the writer's next recovery probe (probeInterval, 50 ms here),
// which applies the invalidations it could not deliver. The test reports
// the staleness it actually measured.
const coherenceWindow = 500 * time.Millisecond

// coherenceOp is one recorded operation.
type coherenceOp struct {
	client, instance int
	key              int64
	write            bool
	version          int64 // read: the version seen (0: absent); write: the new version
	call, ret        time.Time
}

// TestCoherence runs writers and readers on overlapping keys through three
// instances sharing one database and one Redis (a server of the test's own),
// and crashes and restarts Redis in the middle. It checks that:
//
//	(a) an instance never serves a version older than a write it
//	    acknowledged before the read began (read-your-writes), exactly;
//	(b) other instances serve the new version within coherenceWindow: the
//	    history, with every read's start moved back by the window, is
//	    linearizable (porcupine), and the staleness of every read is measured
//	    and reported (p99, max), with the notices' delivery delays;
//	(c) afterwards every cached entry in every tier equals its database row.
func TestCoherence(t *testing.T) {
	srv := startRedis(t)
	runCoherence(t, coherenceRun{
		url: srv.URL(), keys: 4, run: 3 * time.Second, window: coherenceWindow,
		fault: func(start time.Time, run time.Duration) {
			time.Sleep(run * 3 / 10)
			srv.Stop()
			t.Logf("Redis stopped at %v", time.Since(start).Round(time.Millisecond))
			time.Sleep(run * 3 / 10)
			srv.Start()
			t.Logf("Redis restarted at %v", time.Since(start).Round(time.Millisecond))
		},
	})
}

// coherenceRun is one run of the coherence check (see TestCoherence).
type coherenceRun struct {
	url  string // Redis
	keys int
	run  time.Duration
	// window is the staleness allowed a read on an instance other than
	// the writer's.
	window time.Duration
	// fault runs while the clients do, from the load's start.
	fault func(start time.Time, run time.Duration)
	// keysCreated, when set, is called with the keys' ids before the load,
	// and ready with the instances once they are healthy.
	keysCreated func(ids []int64)
	ready       func(instances []*Store)
	// pause is added to every client's pause between operations, so that
	// a long run stays within the operations the checker is given.
	pause time.Duration
	// outage, when set, is the span the fault sets as Redis's outage (from
	// the kill until it is whole again): the run must have read and written
	// during it, else it proved nothing.
	outage *[2]time.Time
}

func runCoherence(t *testing.T, cr coherenceRun) {
	coherenceWindow := cr.window
	// On a PostgreSQL with logical replication the instances follow its
	// change stream, and one more client writes straight into the
	// database, as psql would, bypassing every instance.
	var db userapi.Store
	var feed userapi.ChangeFeed
	switch {
	case os.Getenv(pgtest.LogicalEnv) != "":
		pg, _ := logicalDB(t)
		db, feed = pg, pg
	case postgresURL() != "":
		db = newPostgres(t)
	default:
		db = newSQLite(t)
	}
	const (
		nInstances = 3
		nClients   = 6
		maxOps     = 2000 // per client, to bound the checker's work
	)
	nKeys, run := cr.keys, cr.run
	var keys []int64
	for i := range nKeys {
		keys = append(keys, mustCreate(t, db, fmt.Sprintf("k%d@example.com", i)).ID)
	}
	if cr.keysCreated != nil {
		cr.keysCreated(keys)
	}

	// Notice arrivals per instance: (key, version) → time.
	type kv struct{ key, version int64 }
	var nmu sync.Mutex
	arrivals := make([]map[kv]time.Time, nInstances)
	prefix := testPrefix()
	instances := make([]*Store, nInstances)
	for i := range instances {
		arrivals[i] = map[kv]time.Time{}
		cfg := fastTiered(cr.url, prefix)
		cfg.Changes = feed
		cfg.onNotice = func(id, v int64, at time.Time) {
			nmu.Lock()
			if _, ok := arrivals[i][kv{id, v}]; !ok {
				arrivals[i][kv{id, v}] = at
			}
			nmu.Unlock()
		}
		instances[i] = newCache(t, db, cfg)
	}
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool {
		for _, s := range instances {
			if !healthy(s) {
				return false
			}
		}
		return true
	})
	if cr.ready != nil {
		cr.ready(instances)
	}

	var hmu sync.Mutex
	var history []coherenceOp
	start := time.Now()
	clients := nClients
	if feed != nil {
		clients++ // the outside writer
	}
	var wg sync.WaitGroup
	for c := range clients {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(c), 42))
			ctx := testenv.Context(t)
			var ops []coherenceOp
			outside := c == nClients
			for n := 0; n < maxOps && time.Since(start) < run; n++ {
				op := coherenceOp{client: c, instance: rng.IntN(nInstances), key: keys[rng.IntN(nKeys)], write: rng.IntN(5) == 0}
				var s userapi.Store = instances[op.instance]
				if outside {
					op.instance, op.write, s = -1, true, db
				}
				op.call = time.Now()
				if op.write {
					name := fmt.Sprintf("c%d-%d", c, n)
					u, err := s.UpdateUser(ctx, op.key, userapi.UserUpdate{Name: &name})
					if err != nil {
						t.Errorf("client %d: update %d on instance %d: %v", c, op.key, op.instance, err)
						return
					}
					op.version = u.Version
				} else {
					e, err := instances[op.instance].GetUserEncoded(ctx, op.key)
					if err != nil {
						t.Errorf("client %d: read %d on instance %d: %v", c, op.key, op.instance, err)
						return
					}
					op.version = e.Version
				}
				op.ret = time.Now()
				ops = append(ops, op)
				time.Sleep(time.Duration(200+rng.IntN(400))*time.Microsecond + cr.pause)
				if outside {
					time.Sleep(5 * time.Millisecond) // about as many writes as one client through the instances
				}
			}
			hmu.Lock()
			history = append(history, ops...)
			hmu.Unlock()
		})
	}
	cr.fault(start, run)
	wg.Wait()
	if t.Failed() {
		return
	}

	// Index the writes per key by version.
	type write struct{ call, ret time.Time }
	writes := map[int64]map[int64]write{}
	writesOn := map[int64]map[int64]int{} // key → version → instance
	nw := 0
	for _, op := range history {
		if op.write {
			if writes[op.key] == nil {
				writes[op.key] = map[int64]write{}
				writesOn[op.key] = map[int64]int{}
			}
			writes[op.key][op.version] = write{op.call, op.ret}
			writesOn[op.key][op.version] = op.instance
			nw++
		}
	}
	t.Logf("%d operations (%d writes) by %d clients on %d instances (outside writes: %v)", len(history), nw, clients, nInstances, feed != nil)
	if cr.outage != nil {
		var reads, writes int
		for _, op := range history {
			if op.call.After(cr.outage[0]) && op.ret.Before(cr.outage[1]) {
				if op.write {
					writes++
				} else {
					reads++
				}
			}
		}
		t.Logf("during the outage (%v): %d reads, %d writes, none failed", cr.outage[1].Sub(cr.outage[0]).Round(time.Millisecond), reads, writes)
		if reads == 0 || writes == 0 {
			t.Errorf("no reads or no writes during the outage")
		}
	}

	// (a) and the staleness of (b).
	var stale []time.Duration
	ryw := 0
	for _, op := range history {
		if op.write {
			continue
		}
		firstNewer := time.Time{}
		for v, w := range writes[op.key] {
			if v <= op.version || !w.ret.Before(op.call) {
				continue
			}
			if writesOn[op.key][v] == op.instance {
				ryw++
				t.Errorf("instance %d served key %d at version %d after acknowledging version %d", op.instance, op.key, op.version, v)
			}
			if firstNewer.IsZero() || w.ret.Before(firstNewer) {
				firstNewer = w.ret
			}
		}
		if !firstNewer.IsZero() {
			stale = append(stale, op.call.Sub(firstNewer))
		}
	}
	t.Logf("(a) read-your-writes violations: %d", ryw)
	if len(stale) > 0 {
		p50, p99, maxd := percentiles(stale)
		t.Logf("(b) stale reads on other instances: %d of %d reads; staleness p50 %v, p99 %v, max %v",
			len(stale), len(history)-nw, p50, p99, maxd)
		if maxd > coherenceWindow {
			t.Errorf("a read was stale by %v, beyond the %v window", maxd, coherenceWindow)
		}
	} else {
		t.Logf("(b) no stale read on any instance")
	}
	var delays []time.Duration
	nmu.Lock()
	for key, ws := range writes {
		for v, w := range ws {
			for i := range instances {
				if at, ok := arrivals[i][kv{key, v}]; ok && i != writesOn[key][v] {
					delays = append(delays, at.Sub(w.ret))
				}
			}
		}
	}
	nmu.Unlock()
	if len(delays) > 0 {
		p50, p99, maxd := percentiles(delays)
		t.Logf("(b) notice arrival on other instances after the write returned: %d notices, p50 %v, p99 %v, max %v (negative: before the return)", len(delays), p50, p99, maxd)
	}

	// (b) as linearizability with reads allowed to take effect up to the
	// window before they started.
	ops := make([]porcupine.Operation, 0, len(history))
	for _, op := range history {
		call := op.call
		if !op.write {
			call = call.Add(-coherenceWindow)
		}
		ops = append(ops, porcupine.Operation{
			ClientId: op.client,
			Input:    registerInput{key: op.key, write: op.write},
			Call:     call.Sub(start).Nanoseconds(),
			Output:   op.version,
			Return:   op.ret.Sub(start).Nanoseconds(),
		})
	}
	switch res := porcupine.CheckOperationsTimeout(versionRegister(), ops, 60*time.Second); res {
	case porcupine.Ok:
		t.Logf("(b) history is linearizable with reads shifted by %v", coherenceWindow)
	default:
		t.Errorf("linearizability check with reads shifted by %v: %v", coherenceWindow, res)
	}

	// (c) every tier equals the database, once Redis is back in use.
	ended := time.Now()
	testenv.WaitFor(t, 10*time.Second, "instances healthy", func() bool {
		for _, s := range instances {
			if !healthy(s) {
				return false
			}
		}
		return true
	})
	t.Logf("(c) every instance healthy %v after the load ended", time.Since(ended).Round(time.Millisecond))
	for _, s := range instances {
		for _, k := range keys {
			version(t, s, k) // fill every tier
		}
	}
	for _, s := range instances {
		for _, k := range keys {
			checkTiers(t, s, db, k)
		}
	}
}

type registerInput struct {
	key   int64
	write bool
}

// versionRegister models each user as a register holding its version: an
// update moves it from v-1 to the v it returned, a read returns it.
func versionRegister() porcupine.Model {
	return porcupine.Model{
		Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
			byKey := map[int64][]porcupine.Operation{}
			for _, op := range history {
				k := op.Input.(registerInput).key
				byKey[k] = append(byKey[k], op)
			}
			var keys []int64
			for k := range byKey {
				keys = append(keys, k)
			}
			sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
			var parts [][]porcupine.Operation
			for _, k := range keys {
				parts = append(parts, byKey[k])
			}
			return parts
		},
		Init: func() any { return int64(1) },
		Step: func(state, input, output any) (bool, any) {
			v, in, out := state.(int64), input.(registerInput), output.(int64)
			if in.write {
				return out == v+1, out
			}
			return out == v, v
		},
		DescribeOperation: func(input, output any) string {
			in := input.(registerInput)
			if in.write {
				return fmt.Sprintf("update(%d) -> v%d", in.key, output)
			}
			return fmt.Sprintf("read(%d) -> v%d", in.key, output)
		},
	}
}
