package auth

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/maypok86/otter/v2"
	"golang.org/x/sync/singleflight"

	"userapi"
)

// Defaults of KeysConfig.
const (
	// DefaultRevisionInterval is how often an instance asks the database
	// whether any key was revoked. A revoke elsewhere takes effect here
	// within this interval plus one query (measured in docs/security.md),
	// inside SPEC.md's one second; the query reads a few hundred rows of
	// api_keys at most, four times a second per instance.
	DefaultRevisionInterval = 250 * time.Millisecond

	// DefaultKeyTTL is how long a verified key is trusted from memory
	// without reading its row again. It bounds the effect of a missed
	// revision check (database unreachable from this instance only) and
	// picks up other edits of the row.
	DefaultKeyTTL = time.Minute

	// DefaultTouchInterval is how often last_used_at is written: one
	// batched statement for every key used since the last write, never on
	// a request's path.
	DefaultTouchInterval = 10 * time.Second

	// maxCachedKeys bounds the cache of verified (and unknown) key ids,
	// so a flood of well-formed keys with made-up ids cannot grow memory.
	maxCachedKeys = 100_000
)

// KeysConfig configures Keys. The zero value uses the defaults.
type KeysConfig struct {
	RevisionInterval time.Duration
	KeyTTL           time.Duration
	TouchInterval    time.Duration
	Logger           *slog.Logger
}

// Keys verifies API keys against a userapi.KeyStore and manages them. It
// keeps verified keys in memory so that a request costs a SHA-256 of the
// secret, a cache lookup and a constant-time compare; revocations anywhere
// reach it through a periodic check of the table's revision.
type Keys struct {
	store userapi.KeyStore
	cfg   KeysConfig
	log   *slog.Logger

	cache *otter.Cache[int64, *keyEntry]
	loads singleflight.Group
	// gen counts flushes of the cache; a load that started before one does
	// not install its (possibly stale) row.
	gen atomic.Uint64
	rev userapi.KeysRevision // owned by the revision loop

	stop chan struct{}
	done sync.WaitGroup
}

// keyEntry is a verified key (or, with principal nil, an id with no key).
type keyEntry struct {
	loaded    time.Time // when the row was read; older than KeyTTL is a miss
	principal *userapi.Principal
	hash      [32]byte
	expires   time.Time // zero: never
	revoked   bool
	// lastUsed is the unix second of the latest use seen here, written at
	// most once a second per key; flushed is what was last written out.
	lastUsed atomic.Int64
	flushed  atomic.Int64
}

// NewKeys starts the revision and last-used loops over store; Close stops
// them. It reads the table's revision once; when it cannot (a slow or
// briefly unreachable database), it starts anyway and the revision loop
// keeps trying, which costs nothing: there is no verified key to flush yet.
func NewKeys(ctx context.Context, store userapi.KeyStore, cfg KeysConfig) (*Keys, error) {
	if cfg.RevisionInterval <= 0 {
		cfg.RevisionInterval = DefaultRevisionInterval
	}
	if cfg.KeyTTL <= 0 {
		cfg.KeyTTL = DefaultKeyTTL
	}
	if cfg.TouchInterval <= 0 {
		cfg.TouchInterval = DefaultTouchInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	// No ExpiryCalculator: otter would read the clock on every Get. An
	// entry's age is checked against the request's own time instead.
	c, err := otter.New(&otter.Options[int64, *keyEntry]{MaximumSize: maxCachedKeys})
	if err != nil {
		return nil, fmt.Errorf("key cache: %w", err)
	}
	k := &Keys{store: store, cfg: cfg, log: cfg.Logger, cache: c, stop: make(chan struct{})}
	if k.rev, err = store.KeysRevision(ctx); err != nil {
		cfg.Logger.Warn("cannot read the api keys revision yet; the check retries", "err", err)
	}
	k.done.Add(2)
	go k.revisionLoop()
	go k.touchLoop()
	return k, nil
}

// Close stops the loops and writes the last uses out.
func (k *Keys) Close() {
	close(k.stop)
	k.done.Wait()
	k.cache.StopAllGoroutines()
}

// Authenticate returns the principal of key, or an error wrapping
// userapi.ErrUnauthenticated when key is malformed, unknown, revoked,
// expired or has the wrong secret (all alike to the caller), or
// userapi.ErrUnavailable when the row cannot be read now. A key verified
// before costs no allocation.
func (k *Keys) Authenticate(ctx context.Context, key []byte, now time.Time) (*userapi.Principal, error) {
	id, secret, ok := parseKey(key)
	if !ok {
		return nil, errMalformedKey
	}
	sum := hashSecret(secret)
	e, ok := k.cache.GetIfPresent(id)
	if !ok || now.Sub(e.loaded) > k.cfg.KeyTTL {
		var err error
		if e, err = k.load(ctx, id); err != nil {
			return nil, err
		}
	}
	// The compare runs on every path that found a row, in constant time,
	// so timing tells nothing about how much of a secret matched.
	if e.principal == nil || subtle.ConstantTimeCompare(sum[:], e.hash[:]) != 1 {
		return nil, errWrongKey
	}
	if e.revoked || !e.expires.IsZero() && !now.Before(e.expires) {
		return nil, errUnusableKey
	}
	if s := now.Unix(); e.lastUsed.Load() < s {
		e.lastUsed.Store(s)
	}
	return e.principal, nil
}

var (
	errMalformedKey = fmt.Errorf("%w: not a well-formed api key", userapi.ErrUnauthenticated)
	errWrongKey     = fmt.Errorf("%w: unknown api key", userapi.ErrUnauthenticated)
	errUnusableKey  = fmt.Errorf("%w: api key revoked or expired", userapi.ErrUnauthenticated)
)

// load reads key id's row, once for all concurrent requests for it, and
// caches it unless the cache was flushed meanwhile.
func (k *Keys) load(ctx context.Context, id int64) (*keyEntry, error) {
	v, err, _ := k.loads.Do(strconv.FormatInt(id, 10), func() (any, error) {
		gen := k.gen.Load()
		loaded := time.Now()
		row, err := k.store.GetKey(ctx, id)
		e := &keyEntry{}
		switch {
		case errors.Is(err, userapi.ErrKeyNotFound):
		case err != nil:
			return nil, fmt.Errorf("read api key %d: %w", id, err)
		default:
			e = newEntry(row)
		}
		e.loaded = loaded
		k.cache.Set(id, e)
		if k.gen.Load() != gen {
			k.cache.Invalidate(id) // flushed while reading: the row may predate a revoke
		}
		return e, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*keyEntry), nil
}

func newEntry(row *userapi.APIKey) *keyEntry {
	e := &keyEntry{
		principal: &userapi.Principal{
			ID:        userapi.KeyPrincipalID(row.ID),
			Scopes:    row.Scopes,
			RateLimit: row.RateLimit,
			RateBurst: row.RateBurst,
		},
		expires: row.ExpiresAt,
		revoked: !row.RevokedAt.IsZero(),
	}
	copy(e.hash[:], row.Hash)
	if !row.LastUsedAt.IsZero() {
		e.lastUsed.Store(row.LastUsedAt.Unix())
		e.flushed.Store(row.LastUsedAt.Unix())
	}
	return e
}

// flush forgets every verified key: the next request with each reads its
// row again.
func (k *Keys) flush() {
	k.writeUses(context.Background())
	k.gen.Add(1)
	k.cache.InvalidateAll()
}

// revisionLoop flushes the cache whenever the table's revision changes.
// While the database cannot be read, cached keys stay trusted for at most
// their TTL; no revoke can commit meanwhile unless only this instance has
// lost the database.
func (k *Keys) revisionLoop() {
	defer k.done.Done()
	t := time.NewTicker(k.cfg.RevisionInterval)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-k.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), k.cfg.RevisionInterval*4)
		rev, err := k.store.KeysRevision(ctx)
		cancel()
		if err != nil {
			if !failing {
				k.log.Warn("cannot check api keys for revocations; verified keys stay trusted up to their cache TTL",
					"ttl", k.cfg.KeyTTL, "err", err)
			}
			failing = true
			continue
		}
		if failing {
			k.log.Info("api key revocation checks work again")
			failing = false
		}
		if rev != k.rev {
			k.rev = rev
			k.flush()
		}
	}
}

// touchLoop writes last_used_at every TouchInterval, and once more at Close.
func (k *Keys) touchLoop() {
	defer k.done.Done()
	t := time.NewTicker(k.cfg.TouchInterval)
	defer t.Stop()
	for {
		select {
		case <-k.stop:
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			k.writeUses(ctx)
			cancel()
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), k.cfg.TouchInterval)
			k.writeUses(ctx)
			cancel()
		}
	}
}

// writeUses writes the uses seen since the last write in one batch.
func (k *Keys) writeUses(ctx context.Context) {
	var uses []userapi.KeyUse
	var entries []*keyEntry
	for id, e := range k.cache.All() {
		if used := e.lastUsed.Load(); e.principal != nil && used > e.flushed.Load() {
			uses = append(uses, userapi.KeyUse{ID: id, At: time.Unix(used, 0).UTC()})
			entries = append(entries, e)
		}
	}
	if len(uses) == 0 {
		return
	}
	if err := k.store.TouchKeys(ctx, uses); err != nil {
		k.log.Warn("cannot write api keys' last use", "keys", len(uses), "err", err)
		return
	}
	for i, e := range entries {
		e.flushed.Store(uses[i].At.Unix())
	}
}

// Create stores a new key and returns it with its secret form, which is
// shown once and never stored. It fails with a *userapi.ValidationError
// for invalid input.
func (k *Keys) Create(ctx context.Context, in userapi.KeyCreate) (string, *userapi.APIKey, error) {
	secret, row, err := CreateKey(ctx, k.store, in)
	if err != nil {
		return "", nil, err
	}
	// A request may have cached the id as unknown just before.
	k.gen.Add(1)
	k.cache.Invalidate(row.ID)
	return secret, row, nil
}

// CreateKey stores a new key in store (for `userapi keys create`, without
// a running Keys) and returns its secret form.
func CreateKey(ctx context.Context, store userapi.KeyStore, in userapi.KeyCreate) (string, *userapi.APIKey, error) {
	if err := in.Validate(userapi.Now()); err != nil {
		return "", nil, err
	}
	secret := newSecret()
	sum := hashSecret(secret)
	row, err := store.CreateKey(ctx, userapi.APIKey{
		Name:      in.Name,
		Scopes:    in.Scopes,
		Hash:      sum[:],
		ExpiresAt: in.ExpiresAt,
		RateLimit: in.RateLimit,
		RateBurst: in.RateBurst,
	})
	if err != nil {
		return "", nil, fmt.Errorf("create api key: %w", err)
	}
	return formatKey(row.ID, secret), row, nil
}

// List returns every key, revoked ones too.
func (k *Keys) List(ctx context.Context) ([]*userapi.APIKey, error) {
	return k.store.ListKeys(ctx)
}

// Revoke revokes key id at once on this instance, and on the others at
// their next revision check. It fails with ErrKeyNotFound.
func (k *Keys) Revoke(ctx context.Context, id int64) (*userapi.APIKey, error) {
	row, err := k.store.RevokeKey(ctx, id, userapi.Now())
	if err != nil {
		return nil, err
	}
	k.gen.Add(1)
	k.cache.Invalidate(id)
	return row, nil
}
