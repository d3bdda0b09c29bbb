package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/failsafe-go/failsafe-go/circuitbreaker"
	"github.com/redis/rueidis"

	"userapi/internal/panics"
)

// Redis values are a small header, the kind and the version, then the JSON:
//
//	v42|{"id":7,...}   the row at version 42
//	n0|                the id does not exist
//	t43|               versions below 43 are stale (a write's tombstone)
//	w42|               a write is under way (an intent); 42 is the version
//	                   the entry it replaced knew of
//
// The scripts below read the header to guard fills by version, the same
// rule as admit. Versions are compared as Lua numbers (doubles): exact up to
// 2^53, and poisonVersion is a power of two.

// fillScript installs fills, each unless its key holds something that
// rejects it, and none unless Redis is the one the filler last probed: a
// Redis restarted empty has lost the tombstones that would reject a fill
// whose read began before the restart, and no instance has moved to a new
// generation yet. One call fills a whole batch: a script call costs Redis
// far more than the few commands it runs for one key.
// KEYS[1] the run id marker (see probeScript); KEYS[2..] the keys.
// ARGV[1] the run id the filler last probed; then for each key its value,
// the value's version and its TTL in ms.
// Returns one result per key: 1 installed, 0 stale, 2 unchanged, 3 another
// Redis.
const fillScript = `
local res = {}
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  for i = 2, #KEYS do res[i - 1] = 3 end
  return res
end
local function fill(key, val, ver, ttl)
  local cur = redis.call('GET', key)
  if cur then
    local k = string.sub(cur, 1, 1)
    local sep = string.find(cur, '|', 2, true)
    local cv = tonumber(string.sub(cur, 2, sep - 1))
    local v = tonumber(ver)
    if k == 'w' then return 0 end
    if string.sub(val, 1, 1) == 'n' then
      if k == 'n' then return 2 end
      return 0
    end
    if k == 'v' and cv == v then return 2 end
    if k ~= 'n' and v < cv then return 0 end
  end
  redis.call('SET', key, val, 'PX', ttl)
  return 1
end
for i = 2, #KEYS do
  local a = 3 * i - 4
  res[i - 1] = fill(KEYS[i], ARGV[a], ARGV[a + 1], ARGV[a + 2])
end
return res
`

// invalidateScript installs a write's tombstone unless the key already
// holds that version or a newer one, and publishes the notice, in one round
// trip and atomically: an instance that sees the notice finds the tombstone.
// Over an intent it installs the tombstone at the higher of the two
// versions, and a release (version 0) does nothing else.
// KEYS[1] key; KEYS[2] its group's generation; ARGV[1] the tombstone's
// version; ARGV[2] TTL in ms; ARGV[3] the channel (empty for none); ARGV[4]
// the notice; ARGV[5] PUBLISH, or SPUBLISH in a cluster (the channel is in
// the key's slot).
// Returns 1 installed, 0 kept; fails with STALEGEN (see genGuard).
const invalidateScript = genGuard + `
local cur = redis.call('GET', KEYS[1])
local v = ARGV[1]
local set = 1
if cur then
  local k = string.sub(cur, 1, 1)
  local sep = string.find(cur, '|', 2, true)
  local cv = string.sub(cur, 2, sep - 1)
  if k == 'w' then
    if tonumber(cv) > tonumber(v) then v = cv end
  elseif v == '0' or (k ~= 'n' and tonumber(cv) >= tonumber(v)) then
    set = 0
  end
elseif v == '0' then
  set = 0
end
if set == 1 then redis.call('SET', KEYS[1], 't' .. v .. '|', 'PX', ARGV[2]) end
if ARGV[3] ~= '' then redis.call(ARGV[5], ARGV[3], ARGV[4]) end
return set
`

// intentScript installs a write's intent, carrying the version of what it
// replaces, and publishes the notice.
// KEYS[1] key; KEYS[2] its group's generation; ARGV[1] TTL in ms; ARGV[2]
// the channel (empty for none); ARGV[3] the notice; ARGV[4] PUBLISH or
// SPUBLISH. Fails with STALEGEN (see genGuard).
const intentScript = genGuard + `
local cur = redis.call('GET', KEYS[1])
local v = '0'
if cur and string.sub(cur, 1, 1) ~= 'n' then
  v = string.sub(cur, 2, string.find(cur, '|', 2, true) - 1)
end
redis.call('SET', KEYS[1], 'w' .. v .. '|', 'PX', ARGV[1])
if ARGV[2] ~= '' then redis.call(ARGV[4], ARGV[2], ARGV[3]) end
return 1
`

// genGuard opens the scripts that write a guard (a tombstone or an
// intent): the generation in the key's name (…u:<gen>:<id>) must be the
// group's generation in Redis. An instance that has not yet adopted a
// generation another instance moved to (after a failover it has not
// probed, a missed notice) would otherwise put its guard where no one
// reads, and a fill in the new generation would go unguarded. The script
// then writes nothing and fails with STALEGEN; the caller remembers the
// invalidation and probes, which adopts the generation and applies it
// there.
const genGuard = `
if redis.call('GET', KEYS[2]) ~= string.match(KEYS[1], 'u:(%d+):%d+$') then
  return redis.error_reply('STALEGEN the key generation has moved')
end
`

// isStaleGen reports whether err is genGuard's refusal.
func isStaleGen(err error) bool {
	re, ok := rueidis.IsRedisErr(err)
	return ok && strings.HasPrefix(re.Error(), "STALEGEN")
}

// guardKeys are the keys of a script that writes id's guard (genGuard).
func (r *redisTier) guardKeys(id int64) []string {
	sh := r.lay.Load().shardOf(id)
	return []string{sh.key(id), sh.genKey}
}

// probeScript is the liveness check of every tick, and it proves what the
// tier needs, not just that Redis answers: that Redis takes writes (a PING
// or a PUBLISH still succeeds on a Redis out of memory, read-only or
// refusing writes for MISCONF or NOREPLICAS, while every tombstone fails),
// and that it is the same Redis, with the same data, as at the last tick. A
// restart (empty, or from an older snapshot) or a failover shows as a new
// run id; the script then moves every instance to a new key generation, so
// no entry from before, and no fill that raced with the change, is read.
// A new generation is the caller's clock in microseconds, above the old
// one: never reused, even by a Redis restored to an older generation.
// KEYS[1] the marker (run id of the Redis the generation belongs to),
// KEYS[2] the generation, KEYS[3] the probe key; ARGV[1] a fresh
// generation; ARGV[2] the probe key's TTL in ms.
// Returns {generation, run id, 1 if it moved the generation}.
const probeScript = `
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local g = tonumber(redis.call('GET', KEYS[2]) or '0')
local moved = 0
if redis.call('GET', KEYS[1]) ~= run then
  g = math.max(tonumber(ARGV[1]), g + 1)
  redis.call('SET', KEYS[2], string.format('%d', g))
  redis.call('SET', KEYS[1], run)
  moved = 1
end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
return {string.format('%d', g), run, moved}
`

// newGenScript moves to a new key generation (see probeScript) and tells
// the instances. KEYS[1] the generation; ARGV[1] a fresh generation;
// ARGV[2] the channel (empty for none); ARGV[3] PUBLISH or SPUBLISH.
const newGenScript = `
local g = math.max(tonumber(ARGV[1]), tonumber(redis.call('GET', KEYS[1]) or '0') + 1)
redis.call('SET', KEYS[1], string.format('%d', g))
if ARGV[2] ~= '' then redis.call(ARGV[3], ARGV[2], 'g:' .. string.format('%d', g)) end
return string.format('%d', g)
`

// Notices on the channel: "i:<id>:<version>" an invalidation, "w:<id>" a
// write's intent, "h:<nonce>" a heartbeat (each instance listens for its
// own), "g:<gen>" a new key generation.

// redisTier is the shared tier. It is usable only while Redis answers and
// every invalidation this instance could not deliver has been applied:
// until then reads and fills skip it.
type redisTier struct {
	redisDeps
	opt     *rueidis.ClientOption // nil when the client was injected
	box     atomic.Pointer[clientBox]
	timeout time.Duration

	tiered bool                   // notices go to local tiers
	lay    atomic.Pointer[layout] // set before the tier is first usable (see shard.go)
	nonce  string                 // tells our heartbeats from others'

	fillLua, inval, intent, probe, newGen script
	policyErr                             error       // probeNow's own: a run id's eviction policy is unsafe
	probeMu                               sync.Mutex  // one probe at a time
	subscribed                            atomic.Bool // the notice channel is subscribed and heard
	gateMu                                sync.Mutex  // orders refreshGate's transitions

	cb circuitbreaker.CircuitBreaker[any]
	// health goes up by one at every change of usability and is odd while
	// the tier is usable. A fill is sent only if the tier has been usable
	// since its read began: a read made while Redis was unusable may
	// predate a write whose invalidation is still pending on another
	// instance.
	health epoch
	wake   chan struct{}

	// Invalidations not yet applied to Redis: id → highest version.
	pmu        sync.Mutex
	pending    map[int64]int64
	npending   atomic.Int64
	overflowed atomic.Bool // pending hit PendingMax: drop the namespace
	dropped    uint64      // invalidations not remembered for it (under pmu)
	// owed counts the moves to a new generation that Redis did not take
	// (startAfresh); recover makes one and takes back the ones it covers.
	// The pending invalidations are complete: they go on being applied to
	// the shards that answer, and the move makes unneeded only those
	// remembered before it.
	owed atomic.Uint64

	fills chan fillJob // the loader's fills, for filler

	beat chan struct{} // our own heartbeat came back (one server)

	dialWarned bool // recover's own: the first failed connection was logged

	movedAt atomic.Int64 // unix ns of the last move to a new generation; 0 never
}

type clientBox struct {
	c   rueidis.Client
	own bool
}

// redisDeps are what the Redis tier is handed by the cache it serves.
type redisDeps struct {
	ctx context.Context // ends at Close
	wg  *sync.WaitGroup // the tier's goroutines, waited for at Close
	log *slog.Logger
	cfg *Config
	m   *metrics
	// state is the notice channel's epoch (Store.state): the tier reads
	// it, events moves it.
	state  *epoch
	events tierEvents
}

// tierEvents is what the Redis tier tells the cache around it: the notices
// it hears, the notice channel going up and down, and a Redis that lost
// writes (every local copy must go). *Store implements it.
type tierEvents interface {
	onNotice(id, version int64)
	onIntent(id int64)
	channelUp()
	channelDown()
	flushLocal()
}

func newRedisTier(deps redisDeps, client rueidis.Client, opt *rueidis.ClientOption) *redisTier {
	p := deps.cfg.KeyPrefix
	r := &redisTier{
		redisDeps: deps,
		opt:       opt,
		timeout:   deps.cfg.RedisTimeout,
		tiered:    deps.cfg.Mode == ModeTiered,
		nonce:     strconv.FormatUint(rand.Uint64(), 36),
		fillLua:   newScript(fillScript),
		inval:     newScript(invalidateScript),
		intent:    newScript(intentScript),
		probe:     newScript(probeScript),
		newGen:    newScript(newGenScript),
		pending:   make(map[int64]int64),
		wake:      make(chan struct{}, 1),
		beat:      make(chan struct{}, 1),
		fills:     make(chan fillJob, fillQueueLen),
	}
	r.lay.Store(newLayout(p, false, r.tiered))
	if client != nil {
		r.useLayoutOf(client)
		r.box.Store(&clientBox{c: client})
	}
	// Five failures among the last ten calls: one timeout is noise, half
	// of the calls failing means Redis is sick and costs every request its
	// timeout. Recovery is not left to half-open trial calls: recover
	// probes and applies the pending invalidations first.
	r.cb = circuitbreaker.NewBuilder[any]().
		WithFailureThresholdRatio(5, 10).
		WithDelay(deps.cfg.probeInterval).
		OnStateChanged(func(e circuitbreaker.StateChangedEvent) {
			deps.m.breakerState.Set(breakerGauge(e.NewState))
		}).
		Build()
	r.cb.Open() // until the first probe succeeds
	return r
}

func breakerGauge(st circuitbreaker.State) float64 {
	switch st {
	case circuitbreaker.OpenState:
		return 2
	case circuitbreaker.HalfOpenState:
		return 1
	}
	return 0
}

// start connects (once, synchronously, so a healthy Redis is in use when
// New returns) and starts the recovery loop and, in tiered mode, the notice
// channel.
func (r *redisTier) start() {
	r.recover()
	r.wg.Go(panics.Loop(r.ctx, r.log, "cache_redis_probe", r.maintain))
	r.wg.Go(panics.Loop(r.ctx, r.log, "cache_redis_filler", r.filler))
	if !r.tiered {
		return
	}
	r.wg.Go(panics.Loop(r.ctx, r.log, "cache_notice_channel", r.subscribeLoop))
	// Give the channel a moment to come up so the local tier serves from
	// the first request; if Redis is away it comes up later.
	deadline := time.Now().Add(time.Second)
	for !r.state.up() && time.Now().Before(deadline) && r.box.Load() != nil {
		time.Sleep(5 * time.Millisecond)
	}
}

func (r *redisTier) close() {
	if b := r.box.Load(); b != nil && b.own {
		b.c.Close()
	}
}

func (r *redisTier) client() rueidis.Client {
	if b := r.box.Load(); b != nil {
		return b.c
	}
	return nil
}

// useLayoutOf picks the key layout for client, before the tier is first
// used: a cluster's when rueidis found a cluster behind the address (one
// seed of a cluster is enough), else one group with the keys of a single
// server.
func (r *redisTier) useLayoutOf(c rueidis.Client) {
	cluster := c.Mode() == rueidis.ClientModeCluster
	if r.lay.Load().cluster == cluster {
		return
	}
	if cluster && hasHashTag(r.cfg.KeyPrefix) {
		r.log.Warn("redis cluster: the key prefix holds a hash tag, so every key of the cache is in one slot", "prefix", r.cfg.KeyPrefix)
	}
	r.lay.Store(newLayout(r.cfg.KeyPrefix, cluster, r.tiered))
}

// shards is the layout's groups; one unless Redis is a cluster.
func (r *redisTier) shards() []*shard { return r.lay.Load().shards }

func (r *redisTier) key(id int64) string { return r.lay.Load().shardOf(id).key(id) }

// readable reports whether id may be read from (or filled into) Redis: the
// tier is healthy and no invalidation of id is waiting to be applied.
func (r *redisTier) readable(id int64) bool {
	if !r.usable() || r.overflowed.Load() || r.owed.Load() > 0 {
		return false
	}
	if r.npending.Load() == 0 {
		return true
	}
	r.pmu.Lock()
	_, ok := r.pending[id]
	r.pmu.Unlock()
	return !ok
}

func (r *redisTier) usable() bool { return r.health.up() }

// setUsable changes the usability and reports whether it changed.
func (r *redisTier) setUsable(u bool) bool { return r.health.set(u) }

// succeeded and failed feed the breaker. A caller that went away is not
// Redis's failure.
func (r *redisTier) succeeded() { r.cb.RecordSuccess() }

func (r *redisTier) failed(err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	r.cb.RecordFailure()
	if r.cb.IsOpen() && r.setUsable(false) {
		r.log.Warn("redis unhealthy, failing open to the database", "err", err)
		r.refreshGate()
		r.poke()
	}
}

func (r *redisTier) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// get reads id's entry and its remaining lifetime (entry.ttl), in one round
// trip; nil when Redis has none. A local copy made from it lives no longer
// than the Redis entry, so the TTL bounds a missed invalidation on every
// instance, not only on the one that filled Redis.
func (r *redisTier) get(ctx context.Context, id int64) (*entry, error) {
	return r.getWithin(ctx, id, r.timeout)
}

// getWithin is get with its own deadline (tests inspect Redis with one
// that a loaded machine cannot miss).
func (r *redisTier) getWithin(ctx context.Context, id int64, d time.Duration) (*entry, error) {
	res, err := r.getMany(ctx, []int64{id}, d)
	if err != nil {
		return nil, err
	}
	return res[0].e, res[0].err
}

// lookup is one id's answer from Redis: its entry (nil when Redis has
// none), or err when the value cannot be read (not one of ours).
type lookup struct {
	e   *entry
	err error
}

// getMany reads the entries of ids with their remaining lifetimes (as get
// does), all in one pipelined round trip with deadline d: a GET and a PTTL
// per id, which rueidis writes to the connection together. It fails as a
// whole when the round trip does (one failure for the breaker, not one per
// id). Single-key commands, not MGET or a script over all keys, so that
// each command names one key.
func (r *redisTier) getMany(ctx context.Context, ids []int64, d time.Duration) ([]lookup, error) {
	c := r.client()
	cmds := make(rueidis.Commands, 0, 2*len(ids))
	for _, id := range ids {
		k := r.key(id)
		cmds = append(cmds, c.B().Get().Key(k).Build(), c.B().Pttl().Key(k).Build())
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	res := c.DoMulti(ctx, cmds...)
	cancel()
	out := make([]lookup, len(ids))
	for i, id := range ids {
		b, err := res[2*i].AsBytes()
		if rueidis.IsRedisNil(err) {
			continue
		}
		var ms int64
		if err == nil {
			ms, err = res[2*i+1].AsInt64()
		}
		if err != nil {
			r.failed(err)
			return nil, fmt.Errorf("redis get %d: %w", id, err)
		}
		e, err := decodeEntry(b)
		if err != nil {
			out[i].err = fmt.Errorf("redis get %d: %w", id, err)
			continue
		}
		switch {
		case ms > 0:
			e.ttl = min(r.cfg.TTL, time.Duration(ms)*time.Millisecond)
		case ms == -1:
			// No expiry: not one of ours (every fill sets one); the TTL bounds it.
			e.ttl = r.cfg.TTL
		default:
			// Expired since the GET. Never zero: the local tier keeps an
			// entry with a zero lifetime forever.
			e.ttl = time.Millisecond
		}
		out[i].e = e
	}
	r.succeeded()
	return out, nil
}

func encodeEntry(e *entry) string {
	var b strings.Builder
	b.Grow(24 + len(e.json))
	switch e.kind {
	case kindValue:
		b.WriteByte('v')
	case kindAbsent:
		b.WriteByte('n')
	case kindIntent:
		b.WriteByte('w')
	default:
		b.WriteByte('t')
	}
	b.WriteString(strconv.FormatInt(e.version, 10))
	b.WriteByte('|')
	b.Write(e.json)
	return b.String()
}

// decodeEntry parses a Redis value. The JSON aliases b.
func decodeEntry(b []byte) (*entry, error) {
	sep := bytes.IndexByte(b, '|')
	if len(b) < 2 || sep < 2 {
		return nil, fmt.Errorf("malformed cache value %.20q", b)
	}
	v, err := strconv.ParseInt(string(b[1:sep]), 10, 64)
	if err != nil {
		return nil, fmt.Errorf("malformed cache value %.20q", b)
	}
	e := &entry{version: v}
	switch b[0] {
	case 'v':
		e.kind, e.json = kindValue, b[sep+1:]
	case 'n':
		e.kind = kindAbsent
	case 't':
		e.kind = kindTombstone
	case 'w':
		e.kind = kindIntent
	default:
		return nil, fmt.Errorf("malformed cache value %.20q", b)
	}
	return e, nil
}

// fill installs database results, guarded by fillScript, in one
// pipelined round trip of one script call per fillChunk ids. health is the
// tier's health when the read began.
//
// The health is checked again after the groups' run ids and keys are read,
// and a probe that finds a new run id or generation starts a new health
// epoch before it stores them: a fill that read a new run id or key has
// therefore seen the new epoch and is dropped, and one that read the old
// ones is refused by the new Redis (another run id) or lands in the
// abandoned generation, which no one reads. A read that began before a
// failover never fills the Redis after it.
func (r *redisTier) fill(ctx context.Context, ids []int64, entries []*entry, health uint64) {
	m := r.m
	if r.health.Load() != health || health&1 == 0 {
		m.fillRedisSkipped.Add(float64(len(ids)))
		return
	}
	// One call per group (a cluster's scripts name keys of one slot), of
	// at most fillChunk keys; on one server a single group.
	l := r.lay.Load()
	open := make([]fillCall, len(l.shards))
	var calls []rueidis.LuaExec
	for i, id := range ids {
		if !r.readable(id) {
			m.fillRedisSkipped.Inc()
			continue
		}
		gi := l.groupOf(id)
		sh := l.shards[gi]
		call := &open[gi]
		if len(call.keys) == 0 {
			run := sh.runID.Load()
			if run == nil {
				m.fillRedisSkipped.Inc()
				continue
			}
			*call = fillCall{keys: []string{sh.runKey}, args: []string{*run}}
		}
		call.add(sh.key(id), entries[i])
		if len(call.keys) > fillChunk {
			calls = append(calls, rueidis.LuaExec{Keys: call.keys, Args: call.args})
			*call = fillCall{}
		}
	}
	for _, call := range open {
		if len(call.keys) > 0 {
			calls = append(calls, rueidis.LuaExec{Keys: call.keys, Args: call.args})
		}
	}
	if len(calls) == 0 {
		return
	}
	if r.health.Load() != health {
		m.fillRedisSkipped.Add(float64(len(ids)))
		return
	}
	c := r.client()
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	// A Redis that restarted lost the script: execMulti loads it.
	res := r.fillLua.execMulti(ctx, c, calls)
	var failure error // one failed round trip is one failure for the breaker
	for i, rr := range res {
		vals, err := rr.ToArray()
		n := len(calls[i].Keys) - 1
		if err == nil && len(vals) != n {
			err = fmt.Errorf("redis fill: %d results for %d keys", len(vals), n)
		}
		if err != nil {
			m.redisError.Add(float64(n))
			failure = err
			continue
		}
		for _, v := range vals {
			switch got, _ := v.AsInt64(); got {
			case 1:
				m.fillRedisInstalled.Inc()
			case 0:
				m.fillRedisStale.Inc()
			case 3:
				m.fillRedisSkipped.Inc()
			default:
				m.fillRedisUnchanged.Inc()
			}
		}
	}
	if failure != nil {
		r.failed(failure)
	} else {
		r.succeeded()
	}
}

// fillChunk bounds the keys of one fillScript call: Redis runs a script
// alone, and a hundred keys keep it to a fraction of a millisecond.
const fillChunk = 100

// fillCall is one fillScript call's keys and arguments.
type fillCall struct{ keys, args []string }

// add appends key's fill of e.
func (f *fillCall) add(key string, e *entry) {
	f.keys = append(f.keys, key)
	f.args = append(f.args, encodeEntry(e), strconv.FormatInt(e.version, 10), strconv.FormatInt(e.ttl.Milliseconds(), 10))
}

// fillJob is one batch's Redis fill, queued for the filler: the entries
// (already installed locally) with the tier's health when their read began
// and the time it began.
type fillJob struct {
	ids     []int64
	entries []*entry
	health  uint64
	at      time.Time
}

// fillQueueLen bounds the fills waiting for the filler: each is one batch,
// and the filler takes all that are waiting at once, so the queue fills up
// only while Redis is slow; fills beyond it are dropped (the ids are loaded
// again by their next miss).
const fillQueueLen = 256

// maxFillMerge bounds the ids of one merged fill round trip.
const maxFillMerge = 512

// fillLater queues a fill for the filler, so that the callers of the batch,
// already answered from the local tier, do not wait for Redis. It never
// blocks. The checks of fill apply when it is sent, against the read's
// health and start time: a fill that waited is as guarded as one that did
// not.
func (r *redisTier) fillLater(j fillJob) {
	select {
	case r.fills <- j:
	default:
		r.m.fillRedisSkipped.Add(float64(len(j.ids)))
	}
}

// filler sends the queued fills until Close, each round trip merging every
// fill that queued while the previous one ran.
func (r *redisTier) filler() {
	ids := make([]int64, 0, maxFillMerge)
	entries := make([]*entry, 0, maxFillMerge)
	for {
		var j fillJob
		select {
		case <-r.ctx.Done():
			return
		case j = <-r.fills:
		}
		ids, entries = ids[:0], entries[:0]
		health := r.health.Load()
	merge:
		for {
			switch {
			case j.health != health:
				// Redis was unusable or moved generation since the
				// read; fill would skip it too.
				r.m.fillRedisSkipped.Add(float64(len(j.ids)))
			case time.Since(j.at) > r.cfg.TombstoneTTL/2:
				r.m.fillLate.Add(float64(len(j.ids)))
			default:
				ids = append(ids, j.ids...)
				entries = append(entries, j.entries...)
			}
			if len(ids) >= maxFillMerge {
				break merge
			}
			select {
			case j = <-r.fills:
			default:
				break merge
			}
		}
		if len(ids) > 0 {
			r.fill(r.ctx, ids, entries, health)
		}
	}
}

// invalidate installs a tombstone for id at version and notifies the other
// instances. If Redis cannot take it now, it is remembered and applied
// before Redis is read again.
//
// A release is not remembered: the intent it would resolve expires on its
// own, and it guards nothing.
func (r *redisTier) invalidate(ctx context.Context, id, version int64) {
	if !r.usable() || r.overflowed.Load() {
		if version != releaseVersion {
			r.remember(id, version)
		}
		return
	}
	c := r.client()
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	err := r.inval.exec(ctx, c, r.guardKeys(id), r.invalidateArgs(id, version)).Error()
	cancel()
	if err != nil {
		r.m.invFailed.Inc()
		if !isStaleGen(err) { // not Redis's failure: the probe puts it right
			r.failed(err)
		}
		if version != releaseVersion {
			r.remember(id, version)
			r.poke()
		}
		return
	}
	r.succeeded()
	r.m.invSent.Inc()
	if r.npending.Load() > 0 {
		r.pmu.Lock()
		if v, ok := r.pending[id]; ok && v <= version {
			delete(r.pending, id)
			r.npending.Store(int64(len(r.pending)))
		}
		r.pmu.Unlock()
	}
}

func (r *redisTier) invalidateArgs(id, version int64) []string {
	v := strconv.FormatInt(version, 10)
	l := r.lay.Load()
	return []string{v, strconv.FormatInt(r.cfg.TombstoneTTL.Milliseconds(), 10),
		l.shardOf(id).channel, "i:" + strconv.FormatInt(id, 10) + ":" + v, l.publish}
}

// intend installs a write's intent for id and notifies the other
// instances. When Redis cannot take it the write goes on without one: the
// invalidation after the write is what is remembered.
func (r *redisTier) intend(ctx context.Context, id int64) {
	if !r.usable() || r.overflowed.Load() {
		return
	}
	c := r.client()
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	l := r.lay.Load()
	sh := l.shardOf(id)
	err := r.intent.exec(ctx, c, []string{sh.key(id), sh.genKey}, []string{
		strconv.FormatInt(r.cfg.TombstoneTTL.Milliseconds(), 10),
		sh.channel, "w:" + strconv.FormatInt(id, 10), l.publish,
	}).Error()
	cancel()
	if isStaleGen(err) {
		r.poke() // adopt the generation before the write's invalidation
		return
	}
	if err != nil {
		r.failed(err)
		return
	}
	r.succeeded()
	r.m.intentsSent.Inc()
}

// remember keeps an invalidation for later; past PendingMax the set is
// abandoned and the namespace will be dropped instead.
func (r *redisTier) remember(id, version int64) {
	r.pmu.Lock()
	defer r.pmu.Unlock()
	if v, ok := r.pending[id]; ok {
		r.pending[id] = max(v, version)
		return
	}
	if len(r.pending) >= r.cfg.PendingMax {
		r.overflowed.Store(true)
		r.dropped++
		return
	}
	r.pending[id] = version
	r.npending.Store(int64(len(r.pending)))
}

// maintain runs recover whenever Redis may need it.
func (r *redisTier) maintain() {
	t := time.NewTicker(r.cfg.probeInterval)
	defer t.Stop()
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		case <-r.wake:
		}
		r.recover()
	}
}

// recover runs at every tick: it connects if needed and probes Redis
// (probeScript). A failed probe makes the tier unusable at once, without
// waiting for the breaker to count failures: a Redis that refuses writes
// answers reads happily and would never open it. While the tier is
// unusable or has invalidations pending, recover applies them and only then
// makes the tier usable again.
func (r *redisTier) recover() {
	if r.box.Load() == nil {
		c, err := rueidis.NewClient(*r.opt)
		if err != nil {
			if !r.dialWarned {
				r.log.Warn("redis unreachable, failing open to the database until it answers", "err", err)
				r.dialWarned = true
			}
			return
		}
		r.useLayoutOf(c)
		r.box.Store(&clientBox{c: c, own: true})
	}
	same, err := r.probeGroups()
	if err != nil {
		if r.ctx.Err() != nil {
			return
		}
		r.cb.Open()
		if r.setUsable(false) {
			r.log.Warn("redis unusable, failing open to the database", "err", err)
		}
		r.refreshGate()
		if slices.Contains(same, true) && r.npending.Load() > 0 && !r.overflowed.Load() {
			// One shard of a cluster down does not stop the others:
			// the writes of their ids made meanwhile are applied to
			// them now, not when the whole cluster is back (an
			// instance back before this one would read those ids' old
			// entries there). Only to groups whose probe just passed
			// on the master of before: a group that failed over is
			// moving to a new generation, and a tombstone put in the
			// old one would be lost while its write was forgotten.
			if err := r.applyPending(r.ctx, same); err != nil {
				r.log.Debug("redis: pending invalidations not all applied", "err", err)
			}
		}
		return
	}
	if r.usable() && r.npending.Load() == 0 && !r.overflowed.Load() && r.owed.Load() == 0 {
		return
	}
	if err := r.applyPending(r.ctx, nil); err != nil {
		r.log.Debug("redis: pending invalidations not applied yet", "err", err)
		return
	}
	if r.setUsable(true) {
		r.cb.Close()
		r.log.Info("redis healthy, cache tier in use")
	}
	r.refreshGate()
}

// probeNow runs probeScript, for each group of the layout (in a cluster,
// on the master of each group's slot), adopts the generations it returns
// and, for a Redis not seen before (a new run id) or one whose policy was
// refused, checks its eviction policy. It fails if any group's probe did.
func (r *redisTier) probeNow() error {
	_, err := r.probeGroups()
	return err
}

// probeGroups is probeNow, and also reports which groups' probes passed
// on the Redis of the previous probe (same run id, so the generation
// adopted is the one in use): in a cluster with one shard down, the
// others'.
func (r *redisTier) probeGroups() (same []bool, err error) {
	r.probeMu.Lock()
	defer r.probeMu.Unlock()
	c := r.client()
	l := r.lay.Load()
	ctx, cancel := context.WithTimeout(r.ctx, 4*r.timeout)
	defer cancel()
	fresh, ttl := freshGen(), strconv.FormatInt(probeTTL.Milliseconds(), 10)
	var res []rueidis.RedisResult
	if len(l.shards) == 1 {
		sh := l.shards[0]
		res = []rueidis.RedisResult{r.probe.exec(ctx, c, []string{sh.runKey, sh.genKey, sh.probeK}, []string{fresh, ttl})}
	} else {
		execs := make([]rueidis.LuaExec, len(l.shards))
		for i, sh := range l.shards {
			execs[i] = rueidis.LuaExec{Keys: []string{sh.runKey, sh.genKey, sh.probeK}, Args: []string{fresh, ttl}}
		}
		res = r.probe.execMulti(ctx, c, execs)
	}
	gens := make([]int64, len(l.shards))
	runs := make([]string, len(l.shards))
	ok := make([]bool, len(l.shards))
	moved := 0
	var firstErr error
	for i, rr := range res {
		g, run, mv, err := parseProbe(rr)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			gens[i] = l.shards[i].gen.Load() // unchanged
			continue
		}
		gens[i], runs[i], ok[i] = g, run, true
		moved += int(mv)
	}
	same = make([]bool, len(l.shards))
	changed, seen := 0, false
	for i, sh := range l.shards {
		if !ok[i] {
			continue
		}
		if prev := sh.runID.Load(); prev == nil || *prev != runs[i] {
			seen = seen || prev != nil
			r.bumpHealth() // before the store: see fill
			sh.runID.Store(&runs[i])
			changed++
		} else {
			same[i] = true
		}
	}
	if seen {
		r.log.Warn("redis restarted, failed over or was restored; its entries are not trusted",
			"groups", changed, "moved_generation", moved > 0)
	}
	// Checked again at every probe while refused, so that an operator's
	// CONFIG SET maxmemory-policy noeviction takes effect without a
	// restart; logged once per refusal, not at every probe.
	if changed > 0 || r.policyErr != nil {
		was := r.policyErr
		r.policyErr = r.checkPolicy(ctx, was != nil)
		switch {
		case r.policyErr != nil && (was == nil || changed > 0):
			r.log.Error("redis tier not used", "err", r.policyErr)
		case r.policyErr == nil && was != nil:
			// Refused until now: while its policy could evict, another
			// instance's tombstones and intents may have gone from any
			// of its nodes (a group whose run id changed moves anyway,
			// the others would not), so none of its entries is trusted.
			r.owed.Add(1)
		}
	}
	if r.policyErr != nil {
		return nil, r.policyErr
	}
	r.adoptGens(l, gens)
	if firstErr != nil {
		return same, fmt.Errorf("redis probe: %w", firstErr)
	}
	return same, nil
}

// parseProbe reads probeScript's answer.
func parseProbe(rr rueidis.RedisResult) (gen int64, run string, moved int64, err error) {
	vals, err := rr.ToArray()
	if err != nil {
		return 0, "", 0, err
	}
	if len(vals) != 3 {
		return 0, "", 0, fmt.Errorf("%d values", len(vals))
	}
	gs, err1 := vals[0].ToString()
	run, err2 := vals[1].ToString()
	moved, err3 := vals[2].AsInt64()
	gen, err4 := strconv.ParseInt(gs, 10, 64)
	return gen, run, moved, errors.Join(err1, err2, err3, err4)
}

// probeTTL keeps the probe key from lingering after the last instance stops.
const probeTTL = 10 * time.Second

// freshGen is a key generation no Redis has held: the clock in
// microseconds (exact as a Lua number until the year 2255).
func freshGen() string { return strconv.FormatInt(time.Now().UnixMicro(), 10) }

// checkPolicy refuses a Redis that may evict keys: an evicted tombstone or
// intent lets a stale fill in. noeviction (writes fail when memory is full,
// and the tier then fails open) or no memory limit at all is safe. A Redis
// that hides CONFIG (a managed service) is used, with a warning, unless
// strict: a Redis refused before is used again only once every node has
// shown a safe policy.
//
// In a cluster every node the client knows of is asked (a replica is a
// master after its failover).
func (r *redisTier) checkPolicy(ctx context.Context, strict bool) error {
	c := r.client()
	nodes := map[string]rueidis.Client{"": c}
	if r.lay.Load().cluster {
		nodes = c.Nodes()
	}
	for addr, n := range nodes {
		m, err := n.Do(ctx, n.B().ConfigGet().Parameter("maxmemory", "maxmemory-policy").Build()).AsStrMap()
		if err != nil && strict {
			return fmt.Errorf("redis %scannot read the eviction policy, refused before: %w", strings.TrimPrefix(addr+" ", " "), err)
		}
		if err != nil {
			r.log.Warn("redis: cannot read the eviction policy; it must be noeviction (see docs/cache.md)", "node", addr, "err", err)
			continue
		}
		if pol := m["maxmemory-policy"]; m["maxmemory"] != "0" && pol != "noeviction" {
			return fmt.Errorf("redis %smaxmemory-policy is %s with maxmemory %s: it may evict the tombstones that keep stale rows out; set maxmemory-policy noeviction", strings.TrimPrefix(addr+" ", " "), pol, m["maxmemory"])
		}
	}
	return nil
}

// adoptGens moves each group of l to its generation in gens if it is not
// the current one. Entries were filled under the other generation, whose
// invalidations this instance may not have seen, and fills under way read
// before the move: every fill under way is dropped and the local tier
// starts afresh (for any group: which ids the local tier holds of each is
// not worth tracking for so rare an event).
func (r *redisTier) adoptGens(l *layout, gens []int64) {
	moved := false
	for i, sh := range l.shards {
		if g := sh.gen.Load(); gens[i] != g {
			r.bumpHealth() // before the move: see fill
			sh.setGen(gens[i])
			moved = true
		}
	}
	if moved {
		// Even the first adoption: an instance that could not reach
		// Redis since its start may adopt a generation moved a moment
		// ago, whose empty keys hold none of the tombstones of the
		// writes just before.
		r.moved()
		r.events.flushLocal()
	}
}

// adoptGen moves sh to generation g (a notice's), as adoptGens does.
func (r *redisTier) adoptGen(sh *shard, g int64) {
	if g <= sh.gen.Load() {
		return
	}
	r.bumpHealth() // before the move: see fill
	sh.setGen(g)
	r.moved()
	r.events.flushLocal()
}

// bumpHealth starts a new health epoch without a change of usability, so
// that every fill whose read began before is dropped.
func (r *redisTier) bumpHealth() { r.health.renew() }

// moved records a move to a new key generation, for movedWithin.
func (r *redisTier) moved() { r.movedAt.Store(time.Now().UnixNano()) }

// movedWithin reports whether the tier moved to a new key generation in
// the last d (of any group: which ids a batch holds of each is not worth
// tracking for so rare an event).
func (r *redisTier) movedWithin(d time.Duration) bool {
	at := r.movedAt.Load()
	return at != 0 && time.Since(time.Unix(0, at)) < d
}

// refreshGate serves the local tier only while the notice channel is
// subscribed and Redis is usable: without both, invalidations may be
// missed.
func (r *redisTier) refreshGate() {
	if !r.tiered {
		return
	}
	r.gateMu.Lock()
	defer r.gateMu.Unlock()
	if r.subscribed.Load() && r.usable() {
		r.events.channelUp()
	} else {
		r.events.channelDown()
	}
}

// applyPending applies the remembered invalidations, or, if there were too
// many to remember, moves every instance to a new, empty key generation.
// Each round trip has its own deadline; ctx only ends the whole.
//
// With only set, just the ids of the groups it marks are applied (see
// recover), and nothing is moved.
func (r *redisTier) applyPending(ctx context.Context, only []bool) error {
	c := r.client()
	if owed := r.owed.Load(); (r.overflowed.Load() || owed > 0) && only == nil {
		// The move makes the invalidations remembered before it
		// unneeded (the new generation is empty), not the ones
		// remembered while it runs: those writes may be read from the
		// database by another instance, already in the new generation,
		// and filled there. They are applied below.
		r.pmu.Lock()
		before, dropped := maps.Clone(r.pending), r.dropped
		r.pmu.Unlock()
		if err := r.moveGeneration(ctx); err != nil {
			return err
		}
		r.log.Warn("redis: invalidations missed, moved to a new key generation", "gen", r.shards()[0].gen.Load())
		r.owed.CompareAndSwap(owed, 0) // one owed meanwhile is still owed
		r.pmu.Lock()
		for id, v := range before {
			if cur, ok := r.pending[id]; ok && cur <= v {
				delete(r.pending, id)
			}
		}
		r.npending.Store(int64(len(r.pending)))
		if r.dropped == dropped { // none lost meanwhile
			r.overflowed.Store(false)
		}
		r.pmu.Unlock()
	}
	r.pmu.Lock()
	snap := make(map[int64]int64, len(r.pending))
	for id, v := range r.pending {
		snap[id] = v
	}
	r.pmu.Unlock()
	if len(snap) == 0 {
		return nil
	}
	execs := make([]rueidis.LuaExec, 0, len(snap))
	ids := make([]int64, 0, len(snap))
	l := r.lay.Load()
	for id, v := range snap {
		if only != nil && !only[l.groupOf(id)] {
			continue
		}
		execs = append(execs, rueidis.LuaExec{Keys: r.guardKeys(id), Args: r.invalidateArgs(id, v)})
		ids = append(ids, id)
	}
	// In chunks, each with its own deadline, so a large backlog drains
	// step by step instead of timing out as a whole.
	const chunk = 512
	var errs error
	for lo := 0; lo < len(execs); lo += chunk {
		hi := min(lo+chunk, len(execs))
		cctx, cancel := context.WithTimeout(ctx, 4*r.timeout)
		res := r.inval.execMulti(cctx, c, execs[lo:hi])
		cancel()
		var firstErr error
		failed := 0
		r.pmu.Lock()
		for i, rr := range res {
			if err := rr.Error(); err != nil {
				if firstErr == nil {
					firstErr = err
				}
				failed++
				continue
			}
			r.m.invSent.Inc()
			id := ids[lo+i]
			if v, ok := r.pending[id]; ok && v <= snap[id] {
				delete(r.pending, id)
			}
		}
		r.npending.Store(int64(len(r.pending)))
		r.pmu.Unlock()
		if failed == len(res) {
			return fmt.Errorf("redis apply invalidations: %w", firstErr)
		}
		// In a cluster some shards may take them while one is down:
		// go on with the rest, and report the failure at the end.
		errs = errors.Join(errs, firstErr)
	}
	if errs != nil {
		return fmt.Errorf("redis apply invalidations: %w", errs)
	}
	return nil
}

// startAfresh moves every instance to a new, empty key generation, for
// changes that were missed. A move Redis did not take (down, or one shard
// of a cluster down) is owed: the tier reads and fills nothing until
// recover has made it, while invalidations go on. The change stream does
// not ask again: a new slot, once created, is not new the next time.
func (r *redisTier) startAfresh(ctx context.Context) error {
	err := r.moveGeneration(ctx)
	if err != nil {
		r.owed.Add(1)
		r.events.flushLocal()
		r.poke()
	}
	return err
}

// moveGeneration moves every instance to a new, empty key generation: for
// when invalidations were lost and which ids they were is unknown.
func (r *redisTier) moveGeneration(ctx context.Context) error {
	c := r.client()
	if c == nil {
		return errors.New("redis new generation: not connected")
	}
	ctx, cancel := context.WithTimeout(ctx, 4*r.timeout)
	defer cancel()
	// The notice is best effort: an instance that misses it reads the
	// generation at its next probe.
	l := r.lay.Load()
	fresh := freshGen()
	execs := make([]rueidis.LuaExec, len(l.shards))
	for i, sh := range l.shards {
		execs[i] = rueidis.LuaExec{Keys: []string{sh.genKey}, Args: []string{fresh, sh.channel, l.publish}}
	}
	gens := make([]int64, len(l.shards))
	for i, rr := range r.newGen.execMulti(ctx, c, execs) {
		gs, err := rr.ToString()
		if err != nil {
			return fmt.Errorf("redis new generation: %w", err)
		}
		if gens[i], err = strconv.ParseInt(gs, 10, 64); err != nil {
			return fmt.Errorf("redis new generation: %w", err)
		}
	}
	r.adoptGens(l, gens)
	return nil
}

// invalidateMany applies the database's committed changes (see
// Store.applyChanges) in one pipelined round trip, and fails unless Redis
// took them all. Nothing is remembered on failure: the change stream
// delivers them again.
func (r *redisTier) invalidateMany(ctx context.Context, ids, versions []int64) error {
	if !r.usable() {
		return errors.New("redis tier unusable")
	}
	c := r.client()
	execs := make([]rueidis.LuaExec, len(ids))
	for i, id := range ids {
		execs[i] = rueidis.LuaExec{Keys: r.guardKeys(id), Args: r.invalidateArgs(id, versions[i])}
	}
	// In chunks, each with its own deadline, as applyPending does.
	const chunk = 512
	for lo := 0; lo < len(execs); lo += chunk {
		cctx, cancel := context.WithTimeout(ctx, 4*r.timeout)
		res := r.inval.execMulti(cctx, c, execs[lo:min(lo+chunk, len(execs))])
		cancel()
		for _, rr := range res {
			if err := rr.Error(); err != nil {
				r.m.invFailed.Inc()
				if isStaleGen(err) {
					r.poke() // the stream delivers them again, into the adopted generation
				} else {
					r.failed(err)
				}
				return fmt.Errorf("redis invalidate: %w", err)
			}
		}
	}
	r.succeeded()
	r.m.invSent.Add(float64(len(ids)))
	return nil
}

// subscribeLoop keeps the notice channel subscribed. While it is down the
// local tier does not serve (Store.state).
func (r *redisTier) subscribeLoop() {
	backoff := 50 * time.Millisecond
	for r.ctx.Err() == nil {
		c := r.client()
		if c == nil {
			r.sleep(r.cfg.probeInterval)
			continue
		}
		var up bool
		var err error
		if l := r.lay.Load(); l.cluster {
			up, err = r.subscribeSharded(c, l)
		} else {
			up, err = r.subscribeOnce(c, l.shards[0])
		}
		r.subscribed.Store(false)
		wasUp := r.state.up()
		r.refreshGate()
		if r.ctx.Err() != nil {
			return
		}
		if wasUp {
			r.log.Warn("cache notice channel down, local tier bypassed", "err", err)
		}
		if up {
			backoff = 50 * time.Millisecond
		} else {
			backoff = min(2*backoff, time.Second)
		}
		r.sleep(backoff)
	}
}

func (r *redisTier) sleep(d time.Duration) {
	select {
	case <-r.ctx.Done():
	case <-time.After(d):
	}
}

var errChannelStalled = errors.New("own heartbeat not heard back")

// subscribeOnce subscribes on a dedicated connection, proves the path with
// a heartbeat of our own, marks the channel up and watches it until the
// connection breaks or our heartbeats stop coming back. up reports whether
// the channel came up at all.
//
// A panic here, or in handling a notice, ends the subscription with the
// panic as err: the loop then marks the channel down, as for any break, so
// the local tier serves nothing that may have missed the lost notice.
func (r *redisTier) subscribeOnce(c rueidis.Client, sh *shard) (up bool, err error) {
	defer panics.Recover(r.log, "cache_notice_channel", &err)
	dc, _ := c.Dedicate()
	// Close, not release: the connection carries our subscription.
	defer dc.Close()
	hookFailed := make(chan error, 1)
	closed := dc.SetPubSubHooks(rueidis.PubSubHooks{OnMessage: func(m rueidis.PubSubMessage) {
		r.notice(sh, m, hookFailed)
	}})
	ctx, cancel := context.WithTimeout(r.ctx, r.cfg.channelTimeout)
	err = dc.Do(ctx, dc.B().Subscribe().Channel(sh.channel).Build()).Error()
	cancel()
	if err != nil {
		return false, fmt.Errorf("subscribe: %w", err)
	}
	select {
	case <-r.beat:
	default:
	}
	r.heartbeat(c, sh)
	select {
	case <-r.beat:
	case err := <-hookFailed:
		return false, err
	case err := <-closed:
		return false, fmt.Errorf("subscription closed: %w", err)
	case <-time.After(r.cfg.channelTimeout):
		return false, errChannelStalled
	case <-r.ctx.Done():
		return false, nil
	}
	// The Redis behind the new connection may not be the one of the last
	// probe (a restart or a failover): probe it before trusting it.
	if err := r.probeNow(); err != nil {
		return false, err
	}
	r.subscribed.Store(true)
	r.refreshGate()
	t := time.NewTicker(r.cfg.heartbeat)
	defer t.Stop()
	for {
		select {
		case err := <-hookFailed:
			return true, err
		case err := <-closed:
			if err == nil {
				err = errors.New("subscription closed")
			}
			return true, err
		case <-r.ctx.Done():
			return true, nil
		case <-t.C:
			if time.Since(time.Unix(0, sh.lastBeat.Load())) > r.cfg.channelTimeout {
				return true, errChannelStalled
			}
			r.heartbeat(c, sh)
		}
	}
}

// notice handles one message of sh's channel; a notice that could not be
// handled is lost, so the local tier stops serving at once, not when the
// subscription's loop hears of it on failed.
func (r *redisTier) notice(sh *shard, m rueidis.PubSubMessage, failed chan<- error) {
	if err := r.handleNotice(sh, m); err != nil {
		r.subscribed.Store(false)
		r.refreshGate()
		select {
		case failed <- err:
		default:
		}
	}
}

// subscribeSharded is subscribeOnce for a cluster: one SSUBSCRIBE per
// group, each on the connection rueidis keeps to the master of the group's
// slot, and a heartbeat of ours on every group's channel, each of which
// must come back. The channel is up only while every group's is: a
// subscription that ends (its master died, or the slot moved and Redis
// unsubscribed us) or a group whose heartbeat stops coming back ends them
// all, and the loop subscribes again, to wherever the slots are now.
func (r *redisTier) subscribeSharded(c rueidis.Client, l *layout) (up bool, err error) {
	defer panics.Recover(r.log, "cache_notice_channel", &err)
	ctx, cancel := context.WithCancel(r.ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	ended := make(chan error, len(l.shards))
	hookFailed := make(chan error, 1)
	for _, sh := range l.shards {
		wg.Go(func() {
			err := c.Receive(ctx, c.B().Ssubscribe().Channel(sh.channel).Build(), func(m rueidis.PubSubMessage) {
				r.notice(sh, m, hookFailed)
			})
			if err == nil {
				err = fmt.Errorf("%s unsubscribed by redis", sh.channel)
			}
			ended <- fmt.Errorf("subscription: %w", err)
		})
	}
	since := time.Now().UnixNano()
	heard := func() bool {
		for _, sh := range l.shards {
			if sh.lastBeat.Load() < since {
				return false
			}
		}
		return true
	}
	// Until every group's heartbeat has come back once: a heartbeat sent
	// before its SSUBSCRIBE took effect is lost, so they are sent again.
	deadline := time.After(r.cfg.channelTimeout)
	poll := time.NewTicker(5 * time.Millisecond)
	defer poll.Stop()
	sent := time.Time{}
	for !heard() {
		if time.Since(sent) >= r.cfg.heartbeat/2 {
			r.heartbeatSharded(c, l, since)
			sent = time.Now()
		}
		select {
		case <-poll.C:
		case err := <-ended:
			return false, err
		case err := <-hookFailed:
			return false, err
		case <-deadline:
			return false, errChannelStalled
		case <-r.ctx.Done():
			return false, nil
		}
	}
	// The masters behind the new subscriptions may not be the ones of the
	// last probe (a failover): probe them before trusting them.
	if err := r.probeNow(); err != nil {
		return false, err
	}
	r.subscribed.Store(true)
	r.refreshGate()
	t := time.NewTicker(r.cfg.heartbeat)
	defer t.Stop()
	for {
		select {
		case err := <-hookFailed:
			return true, err
		case err := <-ended:
			return true, err
		case <-r.ctx.Done():
			return true, nil
		case <-t.C:
			for _, sh := range l.shards {
				if time.Since(time.Unix(0, sh.lastBeat.Load())) > r.cfg.channelTimeout {
					return true, fmt.Errorf("%w on %s", errChannelStalled, sh.channel)
				}
			}
			r.heartbeatSharded(c, l, 0)
		}
	}
}

// heartbeatSharded publishes our heartbeat on the channel of every group
// whose heartbeat was last heard before since, in one pipelined round
// trip (rueidis sends each to its slot's master).
func (r *redisTier) heartbeatSharded(c rueidis.Client, l *layout, since int64) {
	cmds := make(rueidis.Commands, 0, len(l.shards))
	for _, sh := range l.shards {
		if since == 0 || sh.lastBeat.Load() < since {
			cmds = append(cmds, c.B().Spublish().Channel(sh.channel).Message("h:"+r.nonce).Build())
		}
	}
	ctx, cancel := context.WithTimeout(r.ctx, r.cfg.heartbeat)
	c.DoMulti(ctx, cmds...)
	cancel()
}

// heartbeat publishes our own heartbeat; its return through the
// subscription proves the channel works end to end.
func (r *redisTier) heartbeat(c rueidis.Client, sh *shard) {
	ctx, cancel := context.WithTimeout(r.ctx, r.cfg.heartbeat)
	c.Do(ctx, c.B().Publish().Channel(sh.channel).Message("h:"+r.nonce).Build())
	cancel()
}

// handleNotice runs onMessage in the client's reader goroutine, where a
// panic would end the process; it returns the panic as an error instead.
func (r *redisTier) handleNotice(sh *shard, m rueidis.PubSubMessage) (err error) {
	defer panics.Recover(r.log, "cache_notice_handler", &err)
	r.onMessage(sh, m)
	return nil
}

// onMessage handles one notice of sh's channel; rueidis calls it on one
// goroutine per connection, in the order Redis sent them.
func (r *redisTier) onMessage(sh *shard, m rueidis.PubSubMessage) {
	msg := m.Message
	switch {
	case strings.HasPrefix(msg, "i:"):
		idS, verS, ok := strings.Cut(msg[2:], ":")
		id, err1 := strconv.ParseInt(idS, 10, 64)
		ver, err2 := strconv.ParseInt(verS, 10, 64)
		if !ok || err1 != nil || err2 != nil {
			r.log.Warn("malformed cache notice", "msg", msg)
			return
		}
		r.events.onNotice(id, ver)
	case strings.HasPrefix(msg, "w:"):
		id, err := strconv.ParseInt(msg[2:], 10, 64)
		if err != nil {
			r.log.Warn("malformed cache notice", "msg", msg)
			return
		}
		r.events.onIntent(id)
	case msg == "h:"+r.nonce:
		sh.lastBeat.Store(time.Now().UnixNano())
		select {
		case r.beat <- struct{}{}:
		default:
		}
	case strings.HasPrefix(msg, "g:"):
		if g, err := strconv.ParseInt(msg[2:], 10, 64); err == nil && g > sh.gen.Load() {
			// Some instance lost track of its invalidations; which ids
			// they were is unknown, so the local tier starts afresh too.
			r.adoptGen(sh, g)
		}
	}
}
