package cache

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"userapi"
)

// benchReads reads ids[i] round-robin from parallel goroutines through a
// cache in cfg's mode, after one warming read of each id.
func benchReads(b *testing.B, cfg Config, users int) {
	db := newSQLite(b)
	if err := db.(userapi.Seeder).SeedUsers(testContext(b), 1, users, nil); err != nil {
		b.Fatal(err)
	}
	page, err := db.ListUsers(testContext(b), userapi.UserFilter{Limit: users})
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
