package cache

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/redis/rueidis"
)

// The Redis tier's keys in a Redis Cluster.
//
// A cluster runs a script only if every key it names hashes to one slot,
// and a notice must reach only the nodes that hold its id (sharded pub/sub:
// SPUBLISH goes to the subscribers of the shard that owns the channel's
// slot, not to the whole cluster). So the ids are split into clusterShards
// groups (id mod clusterShards), each pinned to one slot by a hash tag: its
// user keys, its notice channel, its key generation, the run id marker and
// the probe key all share the tag. Every script then names keys of one
// slot only; a notice is published atomically with its tombstone, by the
// script, on its group's channel; and each group's generation and run id
// live with its data, so a failover of the master that holds them is seen
// by the probe of that group, as a new run id, exactly as a restart of a
// single Redis is (docs/cache.md, "Redis Cluster and Sentinel").
//
// On one server, or behind Sentinel, there is one group and the keys are
// the ones of before (no hash tags): <prefix>gen, <prefix>run,
// <prefix>probe, <prefix>notices and <prefix>u:<gen>:<id>.

// clusterShards is the number of id groups in a cluster. The groups' slots
// are spread evenly over the 16384 (see shardTag), so however the slots are
// divided among the masters in ranges, as redis-cli --cluster create and
// rebalance do, each master holds about its share of groups: 32 groups
// over 3 masters hold 11, 11 and 10. More groups would balance more
// masters, at the cost of one subscription, one heartbeat and one probe
// call per group for every instance.
const clusterShards = 32

// shard is one group's keys and state.
type shard struct {
	base    string // key prefix with the hash tag, if any
	genKey  string
	runKey  string // the run id of the Redis the generation belongs to
	probeK  string
	channel string // notices; "" in redis mode (no local tiers to notify)

	gen      atomic.Int64
	keys     atomic.Pointer[string] // key prefix of the current generation
	runID    atomic.Pointer[string] // the run id of its Redis at the last probe
	lastBeat atomic.Int64           // unix nanoseconds our heartbeat was last heard on channel
}

func (sh *shard) setGen(g int64) {
	sh.gen.Store(g)
	k := sh.base + "u:" + strconv.FormatInt(g, 10) + ":"
	sh.keys.Store(&k)
}

func (sh *shard) key(id int64) string { return *sh.keys.Load() + strconv.FormatInt(id, 10) }

// layout is the tier's key layout: one shard on a single server or behind
// Sentinel, clusterShards in a cluster.
type layout struct {
	cluster bool
	publish string // PUBLISH, or SPUBLISH in a cluster
	shards  []*shard
}

func newLayout(prefix string, cluster, tiered bool) *layout {
	l := &layout{cluster: cluster, publish: "PUBLISH"}
	n := 1
	if cluster {
		l.publish = "SPUBLISH"
		n = clusterShards
	}
	for i := range n {
		base := prefix
		if cluster {
			base = prefix + "{" + shardTag(i, n) + "}"
		}
		sh := &shard{base: base, genKey: base + "gen", runKey: base + "run", probeK: base + "probe"}
		if tiered {
			sh.channel = base + "notices"
		}
		sh.setGen(0)
		l.shards = append(l.shards, sh)
	}
	return l
}

func (l *layout) shardOf(id int64) *shard { return l.shards[l.groupOf(id)] }

// groupOf is the index of id's group.
func (l *layout) groupOf(id int64) int {
	if len(l.shards) == 1 {
		return 0
	}
	return int(uint64(id) % uint64(len(l.shards)))
}

// shardTag is group i's hash tag: "s<i>.<n>" with the smallest n whose
// slot falls in the i-th of n equal ranges of the 16384 slots. Every
// instance computes the same tags.
func shardTag(i, groups int) string {
	lo, hi := i*16384/groups, (i+1)*16384/groups
	for n := 0; ; n++ {
		t := "s" + strconv.Itoa(i) + "." + strconv.Itoa(n)
		if s := int(crc16(t) % 16384); s >= lo && s < hi {
			return t
		}
	}
}

// crc16 is CRC-16/XMODEM, Redis Cluster's key hash.
func crc16(s string) uint16 {
	var crc uint16
	for i := 0; i < len(s); i++ {
		crc ^= uint16(s[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}

// hasHashTag reports whether a key prefix holds a hash tag of its own,
// which would put every key of a cluster in one slot.
func hasHashTag(prefix string) bool {
	i := strings.IndexByte(prefix, '{')
	return i >= 0 && strings.IndexByte(prefix[i+1:], '}') > 0
}

// script is a Lua script with its SHA-1, run by EVALSHA (loading it with
// EVAL when a node does not know it).
type script struct {
	lua *rueidis.Lua
	sha string
}

func newScript(src string) script {
	sum := sha1.Sum([]byte(src))
	return script{lua: rueidis.NewLuaScript(src), sha: hex.EncodeToString(sum[:])}
}

func (s script) exec(ctx context.Context, c rueidis.Client, keys, args []string) rueidis.RedisResult {
	return s.lua.Exec(ctx, c, keys, args)
}

// execMulti runs the script once per exec, pipelined: in a cluster rueidis
// sends each call to its slot's master, in parallel. Unlike
// rueidis.Lua.ExecMulti it does not first load the script on every node
// (one round trip more, and a failure whenever any node, even a dead one
// still in the slot map, does not answer).
func (s script) execMulti(ctx context.Context, c rueidis.Client, execs []rueidis.LuaExec) []rueidis.RedisResult {
	cmds := make(rueidis.Commands, len(execs))
	for i, e := range execs {
		cmds[i] = c.B().Evalsha().Sha1(s.sha).Numkeys(int64(len(e.Keys))).Key(e.Keys...).Arg(e.Args...).Build()
	}
	res := c.DoMulti(ctx, cmds...)
	for i, rr := range res {
		if re, ok := rueidis.IsRedisErr(rr.Error()); ok && re.IsNoScript() {
			res[i] = s.lua.Exec(ctx, c, execs[i].Keys, execs[i].Args)
		}
	}
	return res
}
