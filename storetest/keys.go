package storetest

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"userapi"
)

// NewKeyStore returns a new key store with an empty api_keys table, closed
// by the test's cleanup.
type NewKeyStore func(t *testing.T) userapi.KeyStore

// RunKeys runs the api key suite against stores made by newStore.
func RunKeys(t *testing.T, newStore NewKeyStore) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s userapi.KeyStore)
	}{
		{"CreateAndGet", testKeyCreateAndGet},
		{"NullableFields", testKeyNullableFields},
		{"GetNotFound", testKeyGetNotFound},
		{"List", testKeyList},
		{"Revoke", testKeyRevoke},
		{"Touch", testKeyTouch},
		{"Revision", testKeyRevision},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.fn(t, newStore(t)) })
	}
}

func hash(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

func createKey(t *testing.T, s userapi.KeyStore, k userapi.APIKey) *userapi.APIKey {
	t.Helper()
	got, err := s.CreateKey(ctx(t), k)
	if err != nil {
		t.Fatalf("CreateKey(%q): %v", k.Name, err)
	}
	return got
}

func testKeyCreateAndGet(t *testing.T, s userapi.KeyStore) {
	before := userapi.Now()
	expires := userapi.Now().Add(48 * time.Hour)
	in := userapi.APIKey{
		Name:      "deploy bot ✓",
		Scopes:    userapi.ScopeUsersRead | userapi.ScopeAdmin,
		Hash:      hash(0xab),
		ExpiresAt: expires,
		RateLimit: 12.5,
		RateBurst: 40,
	}
	k := createKey(t, s, in)
	if k.ID <= 0 || k.CreatedAt.Before(before) || k.CreatedAt.Location() != time.UTC {
		t.Fatalf("CreateKey = id %d created %v; want id > 0, created ≥ %v in UTC", k.ID, k.CreatedAt, before)
	}
	got, err := s.GetKey(ctx(t), k.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := in
	want.ID, want.CreatedAt = k.ID, k.CreatedAt
	if !keysEqual(got, &want) || !keysEqual(k, &want) {
		t.Errorf("GetKey = %+v\ncreated = %+v\nwant      %+v", got, k, want)
	}
	k2 := createKey(t, s, userapi.APIKey{Name: "two", Scopes: userapi.ScopeUsersRead, Hash: hash(2)})
	if k2.ID <= k.ID {
		t.Errorf("second key id %d not above first %d", k2.ID, k.ID)
	}
}

func keysEqual(a, b *userapi.APIKey) bool {
	return a.ID == b.ID && a.Name == b.Name && a.Scopes == b.Scopes && bytes.Equal(a.Hash, b.Hash) &&
		a.CreatedAt.Equal(b.CreatedAt) && a.LastUsedAt.Equal(b.LastUsedAt) && a.ExpiresAt.Equal(b.ExpiresAt) &&
		a.RevokedAt.Equal(b.RevokedAt) && a.RateLimit == b.RateLimit && a.RateBurst == b.RateBurst
}

func testKeyNullableFields(t *testing.T, s userapi.KeyStore) {
	k := createKey(t, s, userapi.APIKey{Name: "plain", Scopes: userapi.ScopeUsersWrite, Hash: hash(1)})
	got, err := s.GetKey(ctx(t), k.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !got.LastUsedAt.IsZero() || !got.ExpiresAt.IsZero() || !got.RevokedAt.IsZero() || got.RateLimit != 0 || got.RateBurst != 0 {
		t.Errorf("GetKey = %+v; want no last use, expiry, revocation or rate limit", got)
	}
	if !got.Usable(time.Now()) {
		t.Errorf("a fresh key without expiry is not usable")
	}
}

func testKeyGetNotFound(t *testing.T, s userapi.KeyStore) {
	if _, err := s.GetKey(ctx(t), 987654321); !errors.Is(err, userapi.ErrKeyNotFound) {
		t.Errorf("GetKey(absent) error = %v, want ErrKeyNotFound", err)
	}
	if _, err := s.RevokeKey(ctx(t), 987654321, userapi.Now()); !errors.Is(err, userapi.ErrKeyNotFound) {
		t.Errorf("RevokeKey(absent) error = %v, want ErrKeyNotFound", err)
	}
}

func testKeyList(t *testing.T, s userapi.KeyStore) {
	keys, err := s.ListKeys(ctx(t))
	if err != nil || len(keys) != 0 {
		t.Fatalf("ListKeys(empty) = %d keys, %v", len(keys), err)
	}
	var ids []int64
	for i := range 3 {
		ids = append(ids, createKey(t, s, userapi.APIKey{Name: "k", Scopes: userapi.ScopeAll, Hash: hash(byte(i))}).ID)
	}
	if _, err := s.RevokeKey(ctx(t), ids[1], userapi.Now()); err != nil {
		t.Fatal(err)
	}
	keys, err = s.ListKeys(ctx(t))
	if err != nil || len(keys) != 3 {
		t.Fatalf("ListKeys = %d keys, %v; want 3, the revoked one included", len(keys), err)
	}
	for i, k := range keys {
		if k.ID != ids[i] {
			t.Errorf("ListKeys[%d].ID = %d, want %d (id order)", i, k.ID, ids[i])
		}
	}
	if keys[1].RevokedAt.IsZero() {
		t.Errorf("the revoked key is listed without its revocation")
	}
}

func testKeyRevoke(t *testing.T, s userapi.KeyStore) {
	k := createKey(t, s, userapi.APIKey{Name: "r", Scopes: userapi.ScopeUsersRead, Hash: hash(3)})
	first := userapi.Now()
	got, err := s.RevokeKey(ctx(t), k.ID, first)
	if err != nil || !got.RevokedAt.Equal(first) {
		t.Fatalf("RevokeKey = %+v, %v; want revoked at %v", got, err, first)
	}
	if got.Usable(time.Now()) {
		t.Errorf("a revoked key is usable")
	}
	again, err := s.RevokeKey(ctx(t), k.ID, first.Add(time.Hour))
	if err != nil || !again.RevokedAt.Equal(first) {
		t.Errorf("second RevokeKey = %v, %v; want the first revocation time %v kept", again.RevokedAt, err, first)
	}
}

func testKeyTouch(t *testing.T, s userapi.KeyStore) {
	a := createKey(t, s, userapi.APIKey{Name: "a", Scopes: userapi.ScopeUsersRead, Hash: hash(4)})
	b := createKey(t, s, userapi.APIKey{Name: "b", Scopes: userapi.ScopeUsersRead, Hash: hash(5)})
	t1 := userapi.Now().Truncate(time.Second)
	t2 := t1.Add(5 * time.Second)
	touch := func(uses ...userapi.KeyUse) {
		t.Helper()
		if err := s.TouchKeys(ctx(t), uses); err != nil {
			t.Fatalf("TouchKeys: %v", err)
		}
	}
	touch(userapi.KeyUse{ID: a.ID, At: t2}, userapi.KeyUse{ID: b.ID, At: t1}, userapi.KeyUse{ID: 987654321, At: t1})
	touch(userapi.KeyUse{ID: a.ID, At: t1}) // older: must not move it back
	for _, tc := range []struct {
		id   int64
		want time.Time
	}{{a.ID, t2}, {b.ID, t1}} {
		got, err := s.GetKey(ctx(t), tc.id)
		if err != nil {
			t.Fatal(err)
		}
		if !got.LastUsedAt.Equal(tc.want) {
			t.Errorf("key %d last used %v, want %v", tc.id, got.LastUsedAt, tc.want)
		}
	}
}

func testKeyRevision(t *testing.T, s userapi.KeyStore) {
	rev := func() userapi.KeysRevision {
		t.Helper()
		r, err := s.KeysRevision(ctx(t))
		if err != nil {
			t.Fatalf("KeysRevision: %v", err)
		}
		return r
	}
	r0 := rev()
	k := createKey(t, s, userapi.APIKey{Name: "x", Scopes: userapi.ScopeUsersRead, Hash: hash(6)})
	r1 := rev()
	if r1 == r0 {
		t.Errorf("revision %+v unchanged by a create", r1)
	}
	if err := s.TouchKeys(ctx(t), []userapi.KeyUse{{ID: k.ID, At: userapi.Now()}}); err != nil {
		t.Fatal(err)
	}
	if r := rev(); r != r1 {
		t.Errorf("revision moved on a last-use write (%+v → %+v): every instance would drop its keys every few seconds", r1, r)
	}
	if _, err := s.RevokeKey(ctx(t), k.ID, userapi.Now()); err != nil {
		t.Fatal(err)
	}
	r2 := rev()
	if r2 == r1 {
		t.Errorf("revision %+v unchanged by a revoke", r2)
	}
	if _, err := s.RevokeKey(ctx(t), k.ID, userapi.Now()); err != nil {
		t.Fatal(err)
	}
	if r := rev(); r != r2 {
		t.Errorf("revision moved on a repeated revoke: %+v → %+v", r2, r)
	}
}
