package cache

import (
	"context"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"userapi"
	"userapi/internal/pgtest"
	"userapi/internal/testenv"
	"userapi/postgres"
)

// TestDatabaseUnreachable puts a fault-injecting proxy between the store
// and PostgreSQL and makes it swallow all traffic (a black hole, as a
// partition looks: no error, no answer). Cached entries are still served at
// once; a miss fails with ErrUnavailable, never later than the caller's
// deadline; and reads succeed again within a second of the database coming
// back.
func TestDatabaseUnreachable(t *testing.T) {
	if postgresURL() == "" {
		t.Skipf("%s is not set", pgtest.Env)
	}
	base, err := url.Parse(postgresURL())
	if err != nil {
		t.Fatal(err)
	}
	upstream := base.Host
	if !strings.Contains(upstream, ":") {
		upstream = net.JoinHostPort(upstream, "5432")
	}
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	proxy := toxiproxy.NewProxy(server, "postgres", "127.0.0.1:0", upstream)
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)

	// A short query timeout, as a deployment that wants a dead database
	// to turn into 503s quickly would set.
	const queryTimeout = 500 * time.Millisecond
	db := newPostgresVia(t, proxy.Listen, postgres.Options{MaxConns: 4, QueryTimeout: queryTimeout})
	cached := mustCreate(t, db, "cached@example.com")
	other := mustCreate(t, db, "other@example.com")
	c := newCache(t, db, Config{Mode: ModeLocal, Coalesce: true})
	version(t, c, cached.ID)

	if _, err := proxy.Toxics.AddToxicJson(strings.NewReader(
		`{"name":"blackhole","type":"timeout","stream":"upstream","attributes":{"timeout":0}}`)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if v := version(t, c, cached.ID); v != 1 {
		t.Errorf("cached entry while the database is unreachable: version %d", v)
	}
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Errorf("cached read took %v while the database is unreachable", d)
	}

	// A miss with a request deadline shorter than the query timeout ends at
	// the deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	start = time.Now()
	_, err = c.GetUserEncoded(ctx, other.ID)
	cancel()
	if d := time.Since(start); !errors.Is(err, userapi.ErrUnavailable) || d > 400*time.Millisecond {
		t.Errorf("miss with a 200ms deadline: %v after %v; want ErrUnavailable by the deadline", err, d)
	}
	// Without one, the store's query timeout ends it.
	start = time.Now()
	_, err = c.GetUserEncoded(testenv.Context(t), other.ID)
	if d := time.Since(start); !errors.Is(err, userapi.ErrUnavailable) || d > queryTimeout+time.Second {
		t.Errorf("miss: %v after %v; want ErrUnavailable within the query timeout", err, d)
	}
	_, err = c.UpdateUser(testenv.Context(t), other.ID, userapi.UserUpdate{Name: ptr("X")})
	if !errors.Is(err, userapi.ErrUnavailable) {
		t.Errorf("write while the database is unreachable: %v, want ErrUnavailable", err)
	}

	if err := proxy.Toxics.RemoveToxic(context.Background(), "blackhole"); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.GetUserEncoded(ctx, other.ID)
		cancel()
		if err == nil {
			break
		}
		if time.Since(back) > time.Second {
			t.Fatalf("no successful read within a second of the database returning: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("reads succeed again %v after the database returned", time.Since(back))
}
