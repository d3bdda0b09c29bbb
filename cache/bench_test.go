package cache

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"userapi/internal/testenv"

	"userapi"
)

// benchReads reads ids[i] round-robin from parallel goroutines through a
// cache in cfg's mode, after one warming read of each id.
func benchReads(b *testing.B, cfg Config, users int) {
	db := newSQLite(b)
	if err := db.(userapi.Seeder).SeedUsers(testenv.Context(b), 1, users, nil); err != nil {
		b.Fatal(err)
	}
	page, err := db.ListUsers(testenv.Context(b), userapi.UserFilter{Limit: users})
	if err != nil || len(page) != users {
		b.Fatalf("seeded users = %d, %v", len(page), err)
	}
	c := newCache(b, db, cfg)
	ctx := context.Background()
	for _, u := range page {
		if _, err := c.GetUserEncoded(ctx, u.ID); err != nil {
			b.Fatal(err)
		}
	}
	// Read in a shuffled order, as a server's requests come: walking the
	// ids in order would let the CPU prefetch the next entry.
	ids := make([]int64, len(page))
	for i, j := range rand.New(rand.NewPCG(1, 2)).Perm(len(page)) {
		ids[i] = page[j].ID
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := rand.IntN(len(ids)) // each goroutine starts elsewhere
		for pb.Next() {
			i++
			if i == len(ids) {
				i = 0
			}
			if _, err := c.GetUserEncoded(ctx, ids[i]); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkLocalHit is the cached read's hot path: it must not allocate.
// One id measures the code; a hot set of 10,000 ids (scripts/perf's) adds
// the memory traffic of entries that no longer all fit in the CPU's caches.
func BenchmarkLocalHit(b *testing.B) {
	for _, n := range []int{1, 10000} {
		b.Run(fmt.Sprintf("ids=%d", n), func(b *testing.B) {
			benchReads(b, Config{Mode: ModeLocal, Coalesce: true}, n)
		})
	}
}

// BenchmarkRedisHit reads through the Redis tier only.
func BenchmarkRedisHit(b *testing.B) { benchReads(b, Config{Mode: ModeRedis, Coalesce: true}, 1) }

// BenchmarkMissCoalesced loads distinct ids through the loader (no tier
// caches them), so concurrent misses are batched.
func BenchmarkMissCoalesced(b *testing.B) { benchReads(b, Config{Mode: ModeOff, Coalesce: true}, 1000) }

// BenchmarkMiss reads ids that no tier holds yet, from 64 goroutines (as
// many as scripts/perf-tiered's connections): the miss path, with the
// Redis lookup, the batched database read and the fills of both tiers in
// the tiered mode. Every read is of a new id of missUsers seeded users,
// and each run starts with a new, empty cache; beyond missUsers reads the
// ids are absent, still misses, but cheaper ones.
func BenchmarkMiss(b *testing.B) {
	const missUsers = 200_000
	db := newSQLite(b)
	if err := db.(userapi.Seeder).SeedUsers(testenv.Context(b), 1, missUsers, nil); err != nil {
		b.Fatal(err)
	}
	for _, m := range []Mode{ModeLocal, ModeTiered} {
		b.Run(string(m), func(b *testing.B) {
			c := newCache(b, db, Config{Mode: m, Coalesce: true})
			if m == ModeTiered && !c.state.up() {
				b.Fatal("notice channel not up")
			}
			var next atomic.Int64
			b.SetParallelism(64 / runtime.GOMAXPROCS(0))
			b.ReportAllocs()
			b.ResetTimer()
			cpu := processCPU(b)
			b.RunParallel(func(pb *testing.PB) {
				ctx := context.Background()
				for pb.Next() {
					_, err := c.GetUserEncoded(ctx, next.Add(1))
					if err != nil && !errors.Is(err, userapi.ErrNotFound) {
						b.Fatal(err)
					}
				}
			})
			// The process's CPU time per read (SQLite's included, the same
			// in both modes): on a shared machine steadier than ns/op.
			b.ReportMetric(float64(processCPU(b)-cpu)/float64(b.N), "cpu-ns/op")
		})
	}
}

// processCPU is the CPU time (user and system) this process has used.
func processCPU(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
