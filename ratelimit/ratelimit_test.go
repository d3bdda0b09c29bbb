package ratelimit_test

import (
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"userapi/internal/testenv"
	"userapi/ratelimit"
)

func TestLocal(t *testing.T) {
	tests := []struct {
		name  string
		limit ratelimit.Limit
		calls int
		want  int // allowed of calls made at once
	}{
		{"burst then refused", ratelimit.Limit{Rate: 1, Burst: 5}, 8, 5},
		{"burst 0 is 1", ratelimit.Limit{Rate: 1, Burst: 0}, 3, 1},
		{"unlimited", ratelimit.Limit{}, 100, 100},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newLocal(t)
			got := 0
			var last ratelimit.Decision
			for range tt.calls {
				last = l.Allow("c", tt.limit)
				if last.Allowed {
					got++
				}
			}
			if got != tt.want {
				t.Errorf("allowed %d of %d, want %d", got, tt.calls, tt.want)
			}
			if !last.Allowed {
				if last.Remaining != 0 || last.RetryAfter <= 0 || last.RetryAfter > time.Second {
					t.Errorf("refusal %+v: want Remaining 0 and RetryAfter in (0, 1s]", last)
				}
				full := time.Duration(float64(max(tt.limit.Burst, 1)) / tt.limit.Rate * float64(time.Second))
				if last.Reset < full-time.Second || last.Reset > full {
					t.Errorf("refusal %+v: want Reset about Burst/Rate = %v", last, full)
				}
			}
		})
	}
}

func TestLocalClientsApart(t *testing.T) {
	l := newLocal(t)
	lim := ratelimit.Limit{Rate: 1, Burst: 2}
	for range 3 {
		l.Allow("a", lim)
	}
	if d := l.Allow("a", lim); d.Allowed {
		t.Errorf("a's 4th request allowed: %+v", d)
	}
	if d := l.Allow("b", lim); !d.Allowed || d.Remaining != 1 {
		t.Errorf("b's first request: %+v, want allowed with 1 remaining", d)
	}
	// A client whose limit changes (a key's own limit) gets it at once.
	if d := l.Allow("a", ratelimit.Limit{Rate: 1, Burst: 10}); !d.Allowed {
		t.Errorf("a with a larger limit refused: %+v", d)
	}
}

func TestWindow(t *testing.T) {
	for _, tt := range []struct {
		l    ratelimit.Limit
		want int
	}{
		{ratelimit.Limit{Rate: 1000, Burst: 2000}, 2},
		{ratelimit.Limit{Rate: 1000, Burst: 10}, 1},
		{ratelimit.Limit{Rate: 3, Burst: 10}, 4},
		{ratelimit.Limit{}, 0},
	} {
		if got := tt.l.Window(); got != tt.want {
			t.Errorf("%+v.Window() = %d, want %d", tt.l, got, tt.want)
		}
	}
}

func newLocal(t *testing.T) *ratelimit.Local {
	t.Helper()
	l, err := ratelimit.NewLocal(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// redisServer starts a redis-server of the test's own, so it can be
// stopped; the tests run when USERAPI_TEST_REDIS_URL is set.
func redisServer(t *testing.T) *testenv.RedisServer {
	t.Helper()
	if os.Getenv(testenv.RedisEnv) == "" {
		t.Skip(testenv.RedisEnv + " not set")
	}
	return testenv.StartRedis(t)
}

func newRedis(t *testing.T, url string, mode ratelimit.Mode) *ratelimit.Redis {
	t.Helper()
	// A timeout far above a Redis call's even under the race detector on
	// a loaded machine: these tests measure the accounting, and the fault
	// test makes its failures itself.
	r, err := ratelimit.NewRedis(ratelimit.RedisConfig{URL: url, KeyPrefix: "t:", Mode: mode, Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if !r.Up() {
		t.Fatal("limiter not up on a running Redis")
	}
	return r
}

// offer calls Allow for key on each limiter from its own goroutine every
// interval for d, and returns how many were allowed in all.
func offer(limiters []ratelimit.Limiter, key string, lim ratelimit.Limit, interval, d time.Duration) int {
	var allowed atomic.Int64
	var wg sync.WaitGroup
	end := time.Now().Add(d)
	for _, l := range limiters {
		wg.Go(func() {
			tick := time.NewTicker(interval)
			defer tick.Stop()
			for time.Now().Before(end) {
				if l.Allow(key, lim).Allowed {
					allowed.Add(1)
				}
				<-tick.C
			}
		})
	}
	wg.Wait()
	return int(allowed.Load())
}

// TestRedisBudgetAcrossInstances: three instances sharing one Redis admit
// one client's budget (burst + rate × time) in all, within 10 %, however
// far above it the client goes, in shared mode; in divided mode too when
// the client spreads evenly over them.
func TestRedisBudgetAcrossInstances(t *testing.T) {
	budgetAcrossInstances(t, redisServer(t).URL())
}

// TestRedisClusterAndSentinelBudget: the same over a Redis Cluster of 3
// masters and over a Sentinel-monitored master, of the test's own
// (USERAPI_TEST_REDIS_SERVER; ports 7120-7127 and 26410-26412, apart from
// the cache package's, which may run at the same time). Every script
// names one key, so a cluster runs them on the key's master.
func TestRedisClusterAndSentinelBudget(t *testing.T) {
	t.Run("cluster", func(t *testing.T) {
		budgetAcrossInstances(t, testenv.StartRedisCluster(t, 20, 3, 1).URL())
	})
	t.Run("sentinel", func(t *testing.T) {
		budgetAcrossInstances(t, testenv.StartSentinelSet(t, "rl-test", 26, 1, 10, 3).URL())
	})
}

func budgetAcrossInstances(t *testing.T, url string) {
	lim := ratelimit.Limit{Rate: 200, Burst: 100}
	const d = 2 * time.Second
	want := float64(lim.Burst) + lim.Rate*d.Seconds()
	for _, mode := range []ratelimit.Mode{ratelimit.Shared, ratelimit.Divided} {
		t.Run(string(mode), func(t *testing.T) {
			var ls []ratelimit.Limiter
			for range 3 {
				ls = append(ls, newRedis(t, url, mode))
			}
			waitInstances(t, ls, 3)
			// 3 × 1000 requests a second offered: 15× the rate.
			got := offer(ls, "ip:"+string(mode), lim, time.Millisecond, d)
			t.Logf("%s: admitted %d, budget %.0f (%.1f%%)", mode, got, want, 100*float64(got)/want)
			if float64(got) > 1.1*want || float64(got) < 0.9*want {
				t.Errorf("admitted %d across 3 instances, want %.0f ± 10%%", got, want)
			}
		})
	}
}

func waitInstances(t *testing.T, ls []ratelimit.Limiter, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, l := range ls {
		for l.(*ratelimit.Redis).Instances() != n {
			if time.Now().After(deadline) {
				t.Fatalf("instances = %d, want %d", l.(*ratelimit.Redis).Instances(), n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// TestRedisDownFailsOpenToLocal: with Redis stopped, or stalled, requests
// are still decided, fast, by the local bucket of the budget divided by the
// instances last counted.
func TestRedisDownFailsOpenToLocal(t *testing.T) {
	srv := redisServer(t)
	var ls []ratelimit.Limiter
	for range 3 {
		ls = append(ls, newRedis(t, srv.URL(), ratelimit.Shared))
	}
	waitInstances(t, ls, 3)
	r := ls[0].(*ratelimit.Redis)
	lim := ratelimit.Limit{Rate: 1, Burst: 30}

	for _, fault := range []struct {
		// The first restarts Redis empty: the instances count again.
		name       string
		start, end func()
	}{
		{"stopped", srv.Stop, srv.Start},
		{"stalled", srv.Pause, srv.Resume},
	} {
		t.Run(fault.name, func(t *testing.T) {
			waitInstances(t, ls, 3)
			fault.start()
			defer fault.end()
			key := "ip:down-" + fault.name
			start := time.Now()
			allowed := 0
			for range 40 {
				if r.Allow(key, lim).Allowed {
					allowed++
				}
			}
			if elapsed := time.Since(start); elapsed > 2*time.Second {
				t.Errorf("40 decisions took %v with Redis %s", elapsed, fault.name)
			}
			if r.Up() {
				t.Error("limiter still up")
			}
			// 30 / 3 instances = 10; the failing takes before the
			// switch are decided locally too.
			if allowed != 10 {
				t.Errorf("allowed %d of 40 with Redis %s, want the divided burst 10", allowed, fault.name)
			}
		})
		// Back on Redis within a heartbeat or two.
		deadline := time.Now().Add(5 * time.Second)
		for !r.Up() {
			if time.Now().After(deadline) {
				t.Fatalf("limiter not back on Redis after it %s", fault.name)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}
