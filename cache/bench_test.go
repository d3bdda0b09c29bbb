package cache

import (
	"context"
	"testing"
)

// BenchmarkLocalHit is the cached read's hot path: it must not allocate.
func BenchmarkLocalHit(b *testing.B) {
	db := newSQLite(b)
	u := mustCreate(b, db, "hot@example.com")
	c := newCache(b, db, Config{Mode: ModeLocal, Coalesce: true})
	ctx := context.Background()
	if _, err := c.GetUserEncoded(ctx, u.ID); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.GetUserEncoded(ctx, u.ID); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkRedisHit reads through the Redis tier only.
func BenchmarkRedisHit(b *testing.B) {
	db := newSQLite(b)
	u := mustCreate(b, db, "warm@example.com")
	c := newCache(b, db, Config{Mode: ModeRedis, Coalesce: true})
	ctx := context.Background()
	if _, err := c.GetUserEncoded(ctx, u.ID); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.GetUserEncoded(ctx, u.ID); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkMissCoalesced loads distinct ids through the loader (no tier).
func BenchmarkMissCoalesced(b *testing.B) {
	db := newSQLite(b)
	u := mustCreate(b, db, "miss@example.com")
	c := newCache(b, db, Config{Mode: ModeOff, Coalesce: true})
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.GetUserEncoded(ctx, u.ID); err != nil {
				b.Fatal(err)
			}
		}
	})
}
