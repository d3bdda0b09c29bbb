package auth

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"userapi"
	"userapi/internal/testenv"
)

// TestJWKS: bearer tokens verify against the keys a provider publishes at
// its JWKS URL. When the provider rotates its key, a token naming the new
// kid verifies at once (the unknown kid makes the set be fetched again),
// a token of the retired key is refused, and a stream of unknown kids
// costs at most one fetch per jwksRefetchInterval.
func TestJWKS(t *testing.T) {
	ctx := testenv.Context(t)
	idp := testenv.NewIdP(t)
	idp.Rotate(t, "k1")
	var jwks atomic.Pointer[[]byte]
	publish := func() { b := idp.JWKS(t); jwks.Store(&b) }
	publish()
	var fetches atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fetches.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Write(*jwks.Load())
	}))
	t.Cleanup(srv.Close)

	a, err := New(ctx, newKeyStore(t), Config{JWT: JWTConfig{JWKSURL: srv.URL, Issuer: idp.Issuer, Audience: idp.Audience}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
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
	p, err = authenticate(idp.Token(t, testenv.Claims{"sub": "user-2", "scope": "users:write"}))
	if err != nil || p.ID != "jwt:user-2" {
		t.Fatalf("token of the rotated key k2: %+v, %v", p, err)
	}
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
		t.Errorf("20 tokens of an unknown kid within %v of the last fetch made %d fetches, want 0", jwksRefetchInterval, got)
	}
}
