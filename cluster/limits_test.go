package cluster

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// clientFrom is an HTTP client whose connections come from the loopback
// address from, so instances and nginx see it as its own client.
func clientFrom(from string) *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			DialContext:         (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}).DialContext,
			MaxIdleConnsPerHost: 16,
		},
		Timeout: 10 * time.Second,
	}
}

// TestRateLimitAcrossInstances: one client (127.0.0.2) spreading requests
// over 3 instances far above its budget gets 429s with Retry-After and the
// RateLimit fields from every instance, and is admitted its budget (burst +
// rate × time) in all, within 10 %, because the instances share one bucket
// in Redis; another client (127.0.0.3) meanwhile is never refused. Through
// nginx, its own per-address limit answers 429 problem+json too.
func TestRateLimitAcrossInstances(t *testing.T) {
	const rate, burst = 100, 50
	c := startClusterWith(t, 3, []string{"--addr-rate", "200", "--addr-burst", "20"},
		"--rate-limit", fmt.Sprint(rate), "--rate-burst", fmt.Sprint(burst),
		// A Redis deadline no call misses on a loaded machine: this test
		// measures the shared budget, not failing open (ratelimit's tests).
		"--redis-timeout", "500ms")

	type tally struct {
		ok, limited atomic.Int64
		other       sync.Map // unexpected statuses
		seen429     [3]atomic.Bool
	}
	hammer := func(ctx context.Context, client *http.Client, pace time.Duration, tl *tally, check func(i int, resp *http.Response)) {
		var wg sync.WaitGroup
		for i, a := range c.addrs {
			wg.Go(func() {
				url := "http://" + a + "/users/1"
				for ctx.Err() == nil {
					resp, err := client.Get(url)
					if err != nil {
						tl.other.Store(err.Error(), true)
						continue
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					switch resp.StatusCode {
					case 401, 404: // no credential, or no user 1: admitted by the limiter all the same
						tl.ok.Add(1)
					case 429:
						tl.limited.Add(1)
						tl.seen429[i].Store(true)
					default:
						tl.other.Store(resp.Status, true)
					}
					check(i, resp)
					time.Sleep(pace)
				}
			})
		}
		wg.Wait()
	}

	var bad atomic.Value
	checkHeaders := func(i int, resp *http.Response) {
		policy := fmt.Sprintf(`"client";q=%d;w=1`, burst)
		if got := resp.Header.Get("RateLimit-Policy"); got != policy {
			bad.Store(fmt.Sprintf("instance %d: RateLimit-Policy %q, want %q", i+1, got, policy))
		}
		rl := resp.Header.Get("RateLimit")
		if !strings.HasPrefix(rl, `"client";r=`) || !strings.Contains(rl, ";t=") {
			bad.Store(fmt.Sprintf("instance %d: RateLimit %q", i+1, rl))
		}
		if resp.StatusCode == 429 {
			if resp.Header.Get("Retry-After") != "1" || resp.Header.Get("Content-Type") != "application/problem+json" ||
				!strings.HasPrefix(rl, `"client";r=0;`) {
				bad.Store(fmt.Sprintf("instance %d: 429 with Retry-After %q, Content-Type %q, RateLimit %q",
					i+1, resp.Header.Get("Retry-After"), resp.Header.Get("Content-Type"), rl))
			}
		}
	}

	const d = 3 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var heavy, light tally
	var wg sync.WaitGroup
	start := time.Now()
	// About 3 × 250 requests a second offered, 7.5 × the budget.
	wg.Go(func() { hammer(ctx, clientFrom("127.0.0.2"), 4*time.Millisecond, &heavy, checkHeaders) })
	// 3 × 5 requests a second: a tenth of the budget.
	wg.Go(func() {
		hammer(ctx, clientFrom("127.0.0.3"), 200*time.Millisecond, &light, func(int, *http.Response) {})
	})
	wg.Wait()
	elapsed := time.Since(start)

	if v := bad.Load(); v != nil {
		t.Error(v)
	}
	heavy.other.Range(func(k, _ any) bool { t.Errorf("heavy client got %v", k); return true })
	light.other.Range(func(k, _ any) bool { t.Errorf("light client got %v", k); return true })
	for i := range 3 {
		if !heavy.seen429[i].Load() {
			t.Errorf("instance %d never answered the heavy client 429", i+1)
		}
	}
	if n := light.limited.Load(); n != 0 || light.ok.Load() == 0 {
		t.Errorf("light client: %d admitted, %d refused; want none refused", light.ok.Load(), n)
	}
	budget := burst + rate*elapsed.Seconds()
	got := float64(heavy.ok.Load())
	t.Logf("heavy client: %d admitted, %d refused in %v; budget %.0f (%.1f%%)",
		heavy.ok.Load(), heavy.limited.Load(), elapsed.Round(time.Millisecond), budget, 100*got/budget)
	if got < 0.9*budget || got > 1.1*budget {
		t.Errorf("admitted %.0f across 3 instances, want the budget %.0f ± 10%%", got, budget)
	}

	t.Run("nginx per-address limit", func(t *testing.T) {
		client := clientFrom("127.0.0.4")
		var limited, ok int
		for range 100 {
			resp, err := client.Get(c.url + "/users/1")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			switch {
			case resp.StatusCode == 401 || resp.StatusCode == 404:
				ok++
			case resp.StatusCode == 429 && resp.Header.Get("RateLimit-Policy") == "":
				// nginx's own: no RateLimit fields (the service's 429
				// carries them), problem+json with Retry-After.
				limited++
				if resp.Header.Get("Retry-After") != "1" || resp.Header.Get("Content-Type") != "application/problem+json" ||
					!strings.Contains(string(body), `"status":429`) {
					t.Errorf("nginx 429: Retry-After %q, Content-Type %q, body %s",
						resp.Header.Get("Retry-After"), resp.Header.Get("Content-Type"), body)
				}
			default:
				t.Errorf("through nginx: %s %s", resp.Status, body)
			}
		}
		// 100 requests at once against a burst of 20 at 200 r/s.
		if limited == 0 || ok < 20 {
			t.Errorf("through nginx: %d admitted, %d refused by nginx; want both", ok, limited)
		}
	})
}
