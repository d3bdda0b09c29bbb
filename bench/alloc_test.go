package bench

import (
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// TestSenderAllocatesNothing: in steady state a request costs no heap
// allocation in the generator (the request, response, URI and body buffers
// are reused), so the garbage collector never competes with the server for
// CPU. The in-process server answers from a fixed body so that it, too,
// allocates nothing; AllocsPerRun counts the whole process.
func TestSenderAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's instrumentation allocates")
	}
	page := []byte(`{"items":[{"id":1}],"next_cursor":"k:1"}`)
	user := []byte(`{"id":1,"email":"user1@example.com","name":"User","version":1}`)
	url := serveHandler(t, func(c *fasthttp.RequestCtx) {
		switch {
		case c.IsPost():
			c.SetStatusCode(201)
			c.SetBody(user)
		case len(c.QueryArgs().Peek("limit")) > 0:
			c.SetBody(page)
		default:
			c.Response.Header.Set("ETag", `"1"`)
			c.SetBody(user)
		}
	})
	for _, tc := range []struct {
		name string
		wl   Workload
	}{
		{"uniform reads", Workload{Kind: "uniform", IDs: 1000, KeyDist: "uniform", Mix: Mix{OpRead: 1}, ListLimit: 50}},
		{"zipf reads", Workload{Kind: "zipf", IDs: 1000, ZipfS: 1.1, KeyDist: "zipf", Mix: Mix{OpRead: 1}, ListLimit: 50}},
		{"mixed", Workload{Kind: "mixed", IDs: 1000, KeyDist: "uniform", Mix: Mix{40, 20, 20, 20}, ListLimit: 50}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := quickConfig(url)
			cfg.Workload = tc.wl
			senders, err := newSenders(&cfg)
			if err != nil {
				t.Fatal(err)
			}
			s := senders[0]
			defer s.disconnect()
			s.buf = make([]sample, 0, 4096)
			t0 := time.Now()
			step := func() {
				now := int64(time.Since(t0))
				smp := s.do(s.pick.op(), now, now, t0)
				if smp.out != outOK {
					t.Fatalf("request failed: %+v", smp)
				}
				s.record(smp)
			}
			for range 200 { // connect and grow the buffers
				step()
			}
			s.buf = s.buf[:0]
			if got := testing.AllocsPerRun(1000, step); got != 0 {
				t.Errorf("%.2f allocations per request, want 0", got)
			}
		})
	}
}
