package auth

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"userapi"
	"userapi/internal/testenv"
)

// TestJWKS: bearer tokens verify against the keys a provider publishes at
// its JWKS URL, and the service follows the provider's key rotations:
//   - a token naming a kid the set lacks makes the set be fetched again,
//     once for all the requests that need it at that moment;
//   - a token of a retired key is refused, and a stream of unknown kids
//     costs no fetch within the interval, one after it;
//   - a forced fetch that fails answers ErrUnavailable (503), also to the
//     tokens that come during the retry wait, and the next fetch after
//     that wait succeeds.
func TestJWKS(t *testing.T) {
	ctx := testenv.Context(t)
	idp := testenv.NewIdP(t)
	idp.Rotate(t, "k1")
	var jwks atomic.Pointer[[]byte]
	publish := func() { b := idp.JWKS(t); jwks.Store(&b) }
	publish()
	var fetches atomic.Int64
	var failing atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fetches.Add(1)
		if failing.Load() {
			http.Error(w, "down", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(*jwks.Load())
	}))
	t.Cleanup(srv.Close)

	a, err := New(ctx, newKeyStore(t), Config{JWT: JWTConfig{JWKSURL: srv.URL, Issuer: idp.Issuer, Audience: idp.Audience}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	const interval, retry = 300 * time.Millisecond, 100 * time.Millisecond
	a.jwt.refetch.interval, a.jwt.refetch.retry = interval, retry
	authenticate := func(token string) (*userapi.Principal, error) {
		return a.Authenticate(ctx, []byte("Bearer "+token), time.Now())
	}

	first := idp.Token(t, testenv.Claims{"scope": "users:read"})
	// The first fetch runs in the background; until it lands, tokens are
	// answered "unavailable" (503), never "unauthenticated".
	testenv.WaitFor(t, 5*time.Second, "the first JWKS fetch", func() bool {
		_, err := authenticate(first)
		if err != nil && !errors.Is(err, userapi.ErrUnavailable) {
			t.Fatalf("before the first fetch: %v, want ErrUnavailable", err)
		}
		return err == nil
	})
	p, err := authenticate(first)
	if err != nil || p.ID != "jwt:user-1" || p.Scopes != userapi.ScopeUsersRead {
		t.Fatalf("token of k1: %+v, %v", p, err)
	}

	retired := *idp
	idp.Rotate(t, "k2")
	publish()
	before := fetches.Load()
	var wg sync.WaitGroup
	for i := range 16 {
		token := idp.Token(t, testenv.Claims{"sub": "user-2", "n": i})
		wg.Go(func() {
			if p, err := authenticate(token); err != nil || p.ID != "jwt:user-2" {
				t.Errorf("token %d of the rotated key k2, 16 at once: %+v, %v", i, p, err)
			}
		})
	}
	wg.Wait()
	if got := fetches.Load() - before; got != 1 {
		t.Errorf("fetches for the new kid = %d, want 1", got)
	}

	before = fetches.Load()
	for i := range 20 {
		_, err := authenticate(retired.Token(t, testenv.Claims{"sub": "user-3", "n": i}))
		if !errors.Is(err, userapi.ErrUnauthenticated) {
			t.Fatalf("token of the retired key k1: %v, want ErrUnauthenticated", err)
		}
	}
	if got := fetches.Load() - before; got != 0 {
		t.Errorf("20 tokens of an unknown kid within the interval made %d fetches, want 0", got)
	}
	time.Sleep(interval)
	if _, err := authenticate(retired.Token(t, testenv.Claims{"sub": "user-3"})); !errors.Is(err, userapi.ErrUnauthenticated) {
		t.Fatalf("token of the retired key k1 after the interval: %v, want ErrUnauthenticated", err)
	}
	if got := fetches.Load() - before; got != 1 {
		t.Errorf("an unknown kid after the interval made %d fetches, want 1", got)
	}

	// The provider fails while it rotates again.
	time.Sleep(interval)
	failing.Store(true)
	idp.Rotate(t, "k3")
	publish()
	before = fetches.Load()
	for i := range 3 {
		if _, err := authenticate(idp.Token(t, testenv.Claims{"sub": "user-4", "n": i})); !errors.Is(err, userapi.ErrUnavailable) {
			t.Fatalf("token %d of k3 while the provider fails: %v, want ErrUnavailable", i, err)
		}
	}
	if got := fetches.Load() - before; got < 1 {
		t.Errorf("fetches while the provider fails = %d, want at least 1", got)
	}
	failing.Store(false)
	time.Sleep(retry)
	if p, err := authenticate(idp.Token(t, testenv.Claims{"sub": "user-4"})); err != nil || p.ID != "jwt:user-4" {
		t.Fatalf("token of k3 once the provider answers: %+v, %v", p, err)
	}
}
