package auth

import (
	"context"
	"errors"
	"testing"
	"time"

	"userapi"
	"userapi/internal/sqlitetest"
	"userapi/internal/testenv"
	"userapi/sqlite"
)

func newKeyStore(t *testing.T) *sqlite.Store {
	t.Helper()
	s, _ := sqlitetest.Open(t)
	return s
}

// TestLastUsedAndRevision checks that uses reach last_used_at in the
// background, and that a revoke made in the table directly (another
// instance, `userapi keys revoke`) is picked up by the revision check.
func TestLastUsedAndRevision(t *testing.T) {
	st := newKeyStore(t)
	k, err := NewKeys(testenv.Context(t), st, KeysConfig{RevisionInterval: 20 * time.Millisecond, TouchInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	key, row, err := k.Create(testenv.Context(t), userapi.KeyCreate{Name: "t", Scopes: userapi.ScopeUsersRead, RateLimit: 3, RateBurst: 6})
	if err != nil {
		t.Fatal(err)
	}
	p, err := k.Authenticate(testenv.Context(t), []byte(key), time.Now())
	if err != nil || p.ID != userapi.KeyPrincipalID(row.ID) || p.Scopes != userapi.ScopeUsersRead || p.RateLimit != 3 || p.RateBurst != 6 {
		t.Fatalf("Authenticate = %+v, %v", p, err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := st.GetKey(testenv.Context(t), row.ID)
		if err != nil {
			t.Fatal(err)
		}
		if !got.LastUsedAt.IsZero() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("last_used_at not written within 5 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := st.RevokeKey(testenv.Context(t), row.ID, userapi.Now()); err != nil {
		t.Fatal(err)
	}
	for {
		_, err := k.Authenticate(testenv.Context(t), []byte(key), time.Now())
		if errors.Is(err, userapi.ErrUnauthenticated) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a key revoked in the table still works: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// unavailableStore fails every call as an unreachable database does.
type unavailableStore struct{ userapi.KeyStore }

func (unavailableStore) GetKey(context.Context, int64) (*userapi.APIKey, error) {
	return nil, userapi.ErrUnavailable
}

func TestLookupUnavailableIs503NotUnauthenticated(t *testing.T) {
	st := newKeyStore(t)
	k, err := NewKeys(testenv.Context(t), unavailableStore{st}, KeysConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	_, err = k.Authenticate(testenv.Context(t), []byte(testenv.APIKey(5, "abcdefghijklmnopqrstuvwxyzABCDEF")), time.Now())
	if !errors.Is(err, userapi.ErrUnavailable) || errors.Is(err, userapi.ErrUnauthenticated) {
		t.Errorf("Authenticate with the database down = %v, want ErrUnavailable", err)
	}
}
