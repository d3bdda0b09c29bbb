package shed_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"userapi"
	"userapi/cache"
	"userapi/internal/sqlitetest"
	"userapi/internal/testenv"
	"userapi/shed"
)

// fixed is a Limiter whose limit does not move, so tests know it.
func fixed(n uint, reg prometheus.Registerer) *shed.Limiter {
	return shed.New(shed.Config{MinLimit: n, InitialLimit: n, MaxLimit: n, Registerer: reg})
}

func TestAdmit(t *testing.T) {
	reg := prometheus.NewRegistry()
	l := fixed(2, reg)
	d1, err1 := l.Admit(t.Context())
	d2, err2 := l.Admit(t.Context())
	if err1 != nil || err2 != nil {
		t.Fatalf("within the limit: %v, %v", err1, err2)
	}
	if _, err := l.Admit(t.Context()); !errors.Is(err, userapi.ErrOverloaded) {
		t.Fatalf("over the limit: %v, want ErrOverloaded", err)
	}
	d1()
	d3, err := l.Admit(t.Context())
	if err != nil {
		t.Fatalf("after one finished: %v", err)
	}
	d2()
	d3()
	if got, err := testutil.GatherAndCount(reg, "userapi_shed_rejected_total", "userapi_shed_limit", "userapi_shed_inflight"); err != nil || got != 3 {
		t.Errorf("metrics: %d series, %v; want 3", got, err)
	}
}

// gate is a store whose reads wait while closed.
type gate struct {
	userapi.Store
	mu     sync.Mutex
	open   chan struct{}
	inside chan struct{} // a token per call that reached the database
}

func (g *gate) wait(ctx context.Context) error {
	g.inside <- struct{}{}
	g.mu.Lock()
	ch := g.open
	g.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (g *gate) GetUser(ctx context.Context, id int64) (*userapi.User, error) {
	if err := g.wait(ctx); err != nil {
		return nil, err
	}
	return g.Store.GetUser(ctx, id)
}

func (g *gate) GetUsers(ctx context.Context, ids []int64) ([]*userapi.User, error) {
	if err := g.wait(ctx); err != nil {
		return nil, err
	}
	return g.Store.GetUsers(ctx, ids)
}

func (g *gate) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	if err := g.wait(ctx); err != nil {
		return nil, err
	}
	return g.Store.UpdateUser(ctx, id, upd)
}

// TestShedBehindCache runs the mechanism as the service wires it: the
// cache over the shedder over the database. With the database stuck and
// the limit (2) taken by waiting misses, further misses and writes fail at
// once with ErrOverloaded, while cache hits are served; when the database
// moves again, work is admitted again. Both with the coalescing loader
// (misses admitted by the cache's hook) and without (by the store).
func TestShedBehindCache(t *testing.T) {
	for _, coalesce := range []bool{true, false} {
		t.Run(map[bool]string{true: "coalesce", false: "direct"}[coalesce], func(t *testing.T) {
			ctx := testenv.Context(t)
			db, _ := sqlitetest.Open(t)
			var ids []int64
			for _, e := range []string{"a@example.com", "b@example.com", "c@example.com", "d@example.com"} {
				u, _, err := db.CreateUser(ctx, userapi.UserCreate{Email: e, Name: "N"})
				if err != nil {
					t.Fatal(err)
				}
				ids = append(ids, u.ID)
			}
			g := &gate{Store: db, open: make(chan struct{}), inside: make(chan struct{}, 16)}
			close(g.open)
			l := fixed(2, nil)
			c, err := cache.New(ctx, shed.NewStore(g, l), cache.Config{
				Mode: cache.ModeLocal, Coalesce: coalesce, LocalBytes: 1 << 20,
				TTL: time.Minute, NegativeTTL: time.Minute, Admit: l.Admit,
			})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()

			// ids[0] is cached; then the database gets stuck.
			if _, err := c.GetUserEncoded(ctx, ids[0]); err != nil {
				t.Fatal(err)
			}
			<-g.inside
			g.mu.Lock()
			g.open = make(chan struct{})
			g.mu.Unlock()

			var wg sync.WaitGroup
			for _, id := range ids[1:3] {
				wg.Go(func() {
					if _, err := c.GetUserEncoded(ctx, id); err != nil {
						t.Errorf("admitted miss %d: %v", id, err)
					}
				})
			}
			// Both admitted misses are waiting (the loader may take them
			// as one batch, or one at a time).
			<-g.inside
			deadline := time.Now().Add(5 * time.Second)
			for l.Inflight() < 2 {
				if time.Now().After(deadline) {
					t.Fatalf("inflight %d, want 2", l.Inflight())
				}
				time.Sleep(time.Millisecond)
			}

			if _, err := c.GetUserEncoded(ctx, ids[3]); !errors.Is(err, userapi.ErrOverloaded) {
				t.Errorf("miss over the limit: %v, want ErrOverloaded", err)
			}
			name := "M"
			if _, err := c.UpdateUser(ctx, ids[0], userapi.UserUpdate{Name: &name}); !errors.Is(err, userapi.ErrOverloaded) {
				t.Errorf("write over the limit: %v, want ErrOverloaded", err)
			}
			if enc, err := c.GetUserEncoded(ctx, ids[0]); err != nil || enc.ID != ids[0] {
				t.Errorf("cache hit while the limit is full: %v, %v; want it served", enc.ID, err)
			}

			close(g.open)
			wg.Wait()
			for len(g.inside) > 0 {
				<-g.inside
			}
			if _, err := c.GetUserEncoded(ctx, ids[3]); err != nil {
				t.Errorf("miss after the database moved again: %v", err)
			}
		})
	}
}
