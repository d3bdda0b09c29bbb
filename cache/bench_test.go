package cache

import (
	"context"
	"sync/atomic"
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
	var next atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			id := page[int(next.Add(1))%users].ID
			if _, err := c.GetUserEncoded(ctx, id); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkLocalHit is the cached read's hot path: it must not allocate.
func BenchmarkLocalHit(b *testing.B) { benchReads(b, Config{Mode: ModeLocal, Coalesce: true}, 1) }

// BenchmarkRedisHit reads through the Redis tier only.
func BenchmarkRedisHit(b *testing.B) { benchReads(b, Config{Mode: ModeRedis, Coalesce: true}, 1) }

// BenchmarkMissCoalesced loads distinct ids through the loader (no tier
// caches them), so concurrent misses are batched.
func BenchmarkMissCoalesced(b *testing.B) { benchReads(b, Config{Mode: ModeOff, Coalesce: true}, 1000) }
