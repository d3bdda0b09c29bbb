package auth

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"os"
	"strings"
	"time"

	"github.com/lestrrat-go/httprc/v3"
	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"github.com/maypok86/otter/v2"

	"userapi"
)

// Defaults of JWTConfig.
const (
	// DefaultJWTAlgorithms are the signature algorithms accepted unless
	// configured otherwise: asymmetric only, so the service holds no
	// signing secret and a public key can never be used as an HMAC secret.
	DefaultJWTAlgorithms = "RS256,ES256,EdDSA"

	// DefaultJWTLeeway is the clock skew tolerated on exp and nbf: small,
	// since identity providers issue short-lived tokens.
	DefaultJWTLeeway = 30 * time.Second

	// DefaultJWKSRefresh is the least interval between fetches of the
	// JWKS; the provider's Cache-Control may make it longer (up to a day).
	DefaultJWKSRefresh = 15 * time.Minute

	// jwksRefetchInterval is the least interval between the fetches that a
	// token naming an unknown kid forces: a provider that rotates its key
	// is followed at once, a stream of forged kids costs one fetch per
	// interval.
	jwksRefetchInterval = 30 * time.Second

	// jwksRefetchRetry is the wait after a forced fetch that failed.
	jwksRefetchRetry = time.Second

	// maxCachedTokens bounds the cache of verified tokens.
	maxCachedTokens = 100_000
)

// JWTConfig configures bearer tokens from an identity provider. Exactly one
// of JWKSURL and PublicKeyFile is set; Issuer and Audience are required.
type JWTConfig struct {
	JWKSURL       string
	PublicKeyFile string // PEM: a public key or a certificate
	Issuer        string
	Audience      string
	Algorithms    string // comma-separated; "" means DefaultJWTAlgorithms
	Leeway        time.Duration
}

// Enabled reports whether bearer tokens are configured at all.
func (c JWTConfig) Enabled() bool { return c.JWKSURL != "" || c.PublicKeyFile != "" }

// jwtVerifier verifies bearer JWTs and caches the verified ones until they
// expire, so a client sending the same token again costs a hash and a
// lookup.
type jwtVerifier struct {
	cfg     JWTConfig
	algs    []jwa.SignatureAlgorithm // pinned; the token's header must name one
	keys    func(context.Context) (jwk.Set, error)
	refetch *refetcher // nil for a key file
	seed    maphash.Seed
	cache   *otter.Cache[uint64, *tokenEntry]
}

type tokenEntry struct {
	token     string
	principal *userapi.Principal
	expires   time.Time
}

func newJWTVerifier(ctx context.Context, cfg JWTConfig) (*jwtVerifier, error) {
	if (cfg.JWKSURL == "") == (cfg.PublicKeyFile == "") {
		return nil, errors.New("set one of a JWKS URL and a public key file")
	}
	if cfg.Issuer == "" || cfg.Audience == "" {
		return nil, errors.New("bearer tokens need an issuer and an audience to check")
	}
	if cfg.Leeway <= 0 {
		cfg.Leeway = DefaultJWTLeeway
	}
	algs, err := parseAlgorithms(cfg.Algorithms)
	if err != nil {
		return nil, err
	}
	v := &jwtVerifier{cfg: cfg, algs: algs, seed: maphash.MakeSeed()}
	v.cache, err = otter.New(&otter.Options[uint64, *tokenEntry]{
		MaximumSize: maxCachedTokens,
		ExpiryCalculator: otter.ExpiryWritingFunc(func(e otter.Entry[uint64, *tokenEntry]) time.Duration {
			return time.Until(e.Value.expires)
		}),
	})
	if err != nil {
		return nil, err
	}
	if cfg.PublicKeyFile != "" {
		set, err := readKeyFile(cfg.PublicKeyFile)
		if err != nil {
			return nil, err
		}
		v.keys = func(context.Context) (jwk.Set, error) { return set, nil }
		return v, nil
	}
	jc, err := jwk.NewCache(ctx, httprc.NewClient())
	if err != nil {
		return nil, fmt.Errorf("jwks cache: %w", err)
	}
	// Not waiting for the first fetch: the service starts while the
	// provider is down, and tokens get 503 until the keys arrive.
	if err := jc.Register(ctx, cfg.JWKSURL, jwk.WithMinInterval(DefaultJWKSRefresh), jwk.WithWaitReady(false)); err != nil {
		return nil, fmt.Errorf("jwks %s: %w", cfg.JWKSURL, err)
	}
	v.keys = func(ctx context.Context) (jwk.Set, error) {
		set, err := jc.Lookup(ctx, cfg.JWKSURL)
		if err != nil {
			return nil, fmt.Errorf("%w: jwks %s: %w", userapi.ErrUnavailable, cfg.JWKSURL, err)
		}
		return set, nil
	}
	v.refetch = &refetcher{
		fetch: func(ctx context.Context) (jwk.Set, error) {
			set, err := jc.Refresh(ctx, cfg.JWKSURL)
			if err != nil {
				return nil, fmt.Errorf("%w: jwks %s: %w", userapi.ErrUnavailable, cfg.JWKSURL, err)
			}
			return set, nil
		},
		cached:   v.keys,
		interval: jwksRefetchInterval,
		retry:    jwksRefetchRetry,
		sem:      make(chan struct{}, 1),
	}
	return v, nil
}

// parseAlgorithms parses the pinned list. Symmetric algorithms and "none"
// are refused: the service verifies with public keys only.
func parseAlgorithms(list string) ([]jwa.SignatureAlgorithm, error) {
	if list == "" {
		list = DefaultJWTAlgorithms
	}
	var out []jwa.SignatureAlgorithm
	for name := range strings.SplitSeq(list, ",") {
		name = strings.TrimSpace(name)
		alg, ok := jwa.LookupSignatureAlgorithm(name)
		if !ok || name == "none" || strings.HasPrefix(name, "HS") {
			return nil, fmt.Errorf("jwt algorithm %q: want asymmetric ones such as RS256, PS256, ES256, EdDSA", name)
		}
		out = append(out, alg)
	}
	return out, nil
}

func readKeyFile(path string) (jwk.Set, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("jwt public key: %w", err)
	}
	key, err := jwk.ParseKey(pem, jwk.WithPEM(true))
	if err != nil {
		return nil, fmt.Errorf("jwt public key %s: %w", path, err)
	}
	if _, ok := key.(jwk.SymmetricKey); ok {
		return nil, fmt.Errorf("jwt public key %s: not an asymmetric public key", path)
	}
	set := jwk.NewSet()
	if err := set.AddKey(key); err != nil {
		return nil, fmt.Errorf("jwt public key %s: %w", path, err)
	}
	return set, nil
}

// authenticate returns the principal of a verified token: "jwt:<sub>" with
// the scopes of its "scope" (space-separated) or "scp" claim that this
// service knows. Every failure wraps ErrUnauthenticated, except keys that
// cannot be fetched (ErrUnavailable).
func (v *jwtVerifier) authenticate(ctx context.Context, token []byte, now time.Time) (*userapi.Principal, error) {
	h := maphash.Bytes(v.seed, token)
	if e, ok := v.cache.GetIfPresent(h); ok && e.token == string(token) && now.Before(e.expires) {
		return e.principal, nil
	}
	tok, err := jwt.Parse(token,
		jwt.WithKeyProvider(jws.KeyProviderFunc(func(ctx context.Context, sink jws.KeySink, sig *jws.Signature, _ *jws.Message) error {
			return v.fetchKeys(ctx, sink, sig)
		})),
		jwt.WithContext(ctx),
		jwt.WithValidate(true),
		jwt.WithClock(jwt.ClockFunc(func() time.Time { return now })),
		jwt.WithAcceptableSkew(v.cfg.Leeway),
		jwt.WithIssuer(v.cfg.Issuer),
		jwt.WithAudience(v.cfg.Audience),
		jwt.WithRequiredClaim("exp"),
		jwt.WithRequiredClaim("sub"),
	)
	if err != nil {
		if errors.Is(err, userapi.ErrUnavailable) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: bearer token: %w", userapi.ErrUnauthenticated, err)
	}
	sub, _ := tok.Subject()
	exp, _ := tok.Expiration()
	if sub == "" {
		return nil, fmt.Errorf("%w: bearer token has an empty sub", userapi.ErrUnauthenticated)
	}
	p := &userapi.Principal{ID: "jwt:" + sub, Scopes: tokenScopes(tok)}
	// Cached until exp exactly (not exp + leeway): a cached token is never
	// accepted longer than a fresh verification would accept it.
	v.cache.Set(h, &tokenEntry{token: string(token), principal: p, expires: exp})
	return p, nil
}

// fetchKeys offers the verifier the keys that may have signed sig: only
// for a pinned algorithm, only keys of its kid (when the token names one)
// whose type fits the algorithm.
func (v *jwtVerifier) fetchKeys(ctx context.Context, sink jws.KeySink, sig *jws.Signature) error {
	hdr := sig.ProtectedHeaders()
	alg, ok := hdr.Algorithm()
	if !ok || !v.pinned(alg) {
		return fmt.Errorf("algorithm %q is not accepted", alg.String())
	}
	set, err := v.keys(ctx)
	if err != nil {
		return err
	}
	kid, _ := hdr.KeyID()
	if offerKeys(sink, set, alg, kid) > 0 || kid == "" || v.refetch == nil {
		return nil
	}
	// A kid the set does not have: the provider may have rotated its key.
	set, err = v.refetch.keys(ctx)
	if err != nil {
		return err
	}
	offerKeys(sink, set, alg, kid)
	return nil
}

// refetcher fetches the JWKS out of its schedule, for a token whose kid the
// set lacks. One fetch runs at a time, and the requests that need one
// meanwhile wait for it and use its set. After a fetch that succeeded the
// next waits interval: a stream of made-up kids costs the provider one
// request per interval, and in the worst case (such a stream, or a token of
// a new key that comes before the provider publishes it) a rotation is
// followed an interval late. After a failure the next waits only retry,
// and the token gets ErrUnavailable (503), not a 401: its key could not be
// checked.
type refetcher struct {
	fetch    func(context.Context) (jwk.Set, error) // the provider's set, now
	cached   func(context.Context) (jwk.Set, error) // the set held
	interval time.Duration
	retry    time.Duration
	sem      chan struct{} // a token while a fetch runs (capacity 1)
	next     time.Time     // no fetch before; guarded by sem
	failed   error         // the last fetch's error, until next; guarded by sem
}

// jwksFetchTimeout bounds one out-of-schedule fetch. The fetch does not end
// with the request that started it: the requests waiting for it are served
// by its result.
const jwksFetchTimeout = 5 * time.Second

// keys returns the provider's set as fresh as the schedule above allows.
func (r *refetcher) keys(ctx context.Context) (jwk.Set, error) {
	select {
	case r.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: waiting for the jwks: %w", userapi.ErrUnavailable, ctx.Err())
	}
	defer func() { <-r.sem }()
	if time.Now().Before(r.next) {
		// Fetched a moment ago, perhaps while this request waited.
		if r.failed != nil {
			return nil, r.failed
		}
		return r.cached(ctx)
	}
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), jwksFetchTimeout)
	defer cancel()
	set, err := r.fetch(fctx)
	if err != nil {
		r.next, r.failed = time.Now().Add(r.retry), err
		return nil, err
	}
	r.next, r.failed = time.Now().Add(r.interval), nil
	return set, nil
}

// offerKeys offers the keys of set that may have made a signature with alg
// and kid, and returns how many it offered.
func offerKeys(sink jws.KeySink, set jwk.Set, alg jwa.SignatureAlgorithm, kid string) int {
	n := 0
	for i := range set.Len() {
		key, _ := set.Key(i)
		if id, ok := key.KeyID(); kid != "" && (!ok || id != kid) {
			continue
		}
		if ka, ok := key.Algorithm(); ok && ka.String() != alg.String() {
			continue
		}
		if !fits(alg, key.KeyType()) {
			continue
		}
		sink.Key(alg, key)
		n++
	}
	return n
}

func (v *jwtVerifier) pinned(alg jwa.SignatureAlgorithm) bool {
	for _, a := range v.algs {
		if a == alg {
			return true
		}
	}
	return false
}

// fits reports whether a key of type kty can verify alg.
func fits(alg jwa.SignatureAlgorithm, kty jwa.KeyType) bool {
	switch name := alg.String(); {
	case strings.HasPrefix(name, "RS"), strings.HasPrefix(name, "PS"):
		return kty == jwa.RSA()
	case strings.HasPrefix(name, "ES"):
		return kty == jwa.EC()
	case strings.HasPrefix(name, "EdDSA"):
		return kty == jwa.OKP()
	}
	return false
}

// tokenScopes reads the OAuth "scope" claim (a space-separated string) or
// the "scp" claim (a list or a string); names this service does not know
// ("openid", …) are ignored.
func tokenScopes(tok jwt.Token) userapi.Scope {
	var names []string
	var s string
	var list []any
	switch {
	case tok.Get("scope", &s) == nil:
		names = strings.Fields(s)
	case tok.Get("scp", &list) == nil:
		for _, x := range list {
			if n, ok := x.(string); ok {
				names = append(names, n)
			}
		}
	case tok.Get("scp", &s) == nil:
		names = strings.Fields(s)
	}
	var scopes userapi.Scope
	for _, n := range names {
		if sc, err := userapi.ParseScope(n); err == nil {
			scopes |= sc
		}
	}
	return scopes
}

func (v *jwtVerifier) close() { v.cache.StopAllGoroutines() }
