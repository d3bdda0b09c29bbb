package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"userapi"
)

// pooled is a store that reports its pool's size and nothing else.
type pooled struct {
	userapi.Store
	size int
}

func (p pooled) PoolSize() int { return p.size }

// TestShedLimitFollowsPool: with --coalesce=false every admitted read is a
// query of its own on the primary (GetUser, replicas or not), so the
// shedder admits no more than the pool's connections; a request beyond
// them would only queue in the pool, unseen by the limit. With
// coalescing, misses share queries: the limit starts at 4 × its minimum,
// which is a batch unless --shed-min-limit says otherwise.
func TestShedLimitFollowsPool(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tc := range []struct {
		name     string
		coalesce bool
		minLimit uint
		replicas int
		want     int
	}{
		{"uncoalesced", false, 0, 0, 3},
		{"uncoalesced, a larger minimum", false, 16, 0, 3},
		{"uncoalesced with a replica", false, 0, 1, 3},
		{"coalesced", true, 0, 0, 80},
		{"coalesced, a minimum", true, 16, 0, 64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &config{Shed: true, ShedMinLimit: tc.minLimit, ShedMaxWait: -time.Nanosecond, Coalesce: tc.coalesce, MaxBatch: 20}
			for range tc.replicas {
				c.Replicas = append(c.Replicas, "postgres://replica")
			}
			_, admit := shedding(c, pooled{size: 3}, log, nil)
			var dones []func()
			defer func() {
				for _, done := range dones {
					done()
				}
			}()
			for i := range tc.want {
				done, err := admit(context.Background())
				if err != nil {
					t.Fatalf("request %d of %d refused: %v", i+1, tc.want, err)
				}
				dones = append(dones, done)
			}
			if _, err := admit(context.Background()); !errors.Is(err, userapi.ErrOverloaded) {
				t.Fatalf("request %d admitted (%v), want ErrOverloaded", tc.want+1, err)
			}
		})
	}
}
