// Package storetest is the one conformance suite every userapi.Store must
// pass: the SQLite, PostgreSQL and MySQL stores, and the cache that decorates
// them. A store's test calls Run with a constructor that returns a fresh,
// empty store each time.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"userapi"
)

// NewStore returns a new, empty store, closed by the test's cleanup.
type NewStore func(t *testing.T) userapi.Store

// Run runs the whole suite against stores made by newStore.
func Run(t *testing.T, newStore NewStore) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s userapi.Store)
	}{
		{"CreateAndGet", testCreateAndGet},
		{"GetNotFound", testGetNotFound},
		{"DuplicateEmail", testDuplicateEmail},
		{"UpdateIncrementsVersion", testUpdateIncrementsVersion},
		{"UpdatePartial", testUpdatePartial},
		{"UpdateNotFound", testUpdateNotFound},
		{"UpdateDuplicateEmail", testUpdateDuplicateEmail},
		{"IfMatch", testIfMatch},
		{"Delete", testDelete},
		{"GetUsers", testGetUsers},
		{"ListKeyset", testListKeyset},
		{"ListByEmail", testListByEmail},
		{"IdempotencyKey", testIdempotencyKey},
		{"IdempotencyKeyConcurrent", testIdempotencyKeyConcurrent},
		{"ConcurrentUpdatesNoLostUpdate", testConcurrentUpdates},
		{"ConcurrentIfMatchOneWinner", testConcurrentIfMatch},
		{"Timestamps", testTimestamps},
		{"Ping", testPing},
	}
	canSeed := false
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStore(t)
			_, canSeed = s.(userapi.Seeder)
			tt.fn(t, s)
		})
	}
	// Bulk loading is optional (the cache does not offer it).
	if canSeed {
		t.Run("Seed", func(t *testing.T) { testSeed(t, newStore(t)) })
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// create makes a user or fails the test.
func create(t *testing.T, s userapi.Store, email, name string) *userapi.User {
	t.Helper()
	in := userapi.UserCreate{Email: email, Name: name}
	if err := in.Validate(); err != nil {
		t.Fatalf("Validate(%q, %q): %v", email, name, err)
	}
	u, replayed, err := s.CreateUser(ctx(t), in)
	if err != nil || replayed {
		t.Fatalf("CreateUser(%q) = %v, replayed=%v, %v", email, u, replayed, err)
	}
	return u
}

func ptr(s string) *string { return &s }

func testCreateAndGet(t *testing.T, s userapi.Store) {
	before := userapi.Now()
	u := create(t, s, "Ada@Example.com", "Ada Lovelace")
	if u.ID <= 0 || u.Version != 1 || u.Email != "ada@example.com" || u.Name != "Ada Lovelace" {
		t.Fatalf("CreateUser = %+v; want id > 0, version 1, lower-cased email", u)
	}
	if u.CreatedAt.Before(before) || !u.CreatedAt.Equal(u.UpdatedAt) {
		t.Errorf("CreateUser times = %v, %v; want created = updated ≥ %v", u.CreatedAt, u.UpdatedAt, before)
	}
	got, err := s.GetUser(ctx(t), u.ID)
	if err != nil {
		t.Fatalf("GetUser(%d): %v", u.ID, err)
	}
	if diff := cmp.Diff(u, got); diff != "" {
		t.Errorf("GetUser mismatch (-created +got):\n%s", diff)
	}
	u2 := create(t, s, "bob@example.com", "Bob")
	if u2.ID <= u.ID {
		t.Errorf("second id %d not above first %d", u2.ID, u.ID)
	}
}

func testGetNotFound(t *testing.T, s userapi.Store) {
	if _, err := s.GetUser(ctx(t), 987654321); !errors.Is(err, userapi.ErrNotFound) {
		t.Errorf("GetUser(absent) error = %v, want ErrNotFound", err)
	}
}

func testDuplicateEmail(t *testing.T, s userapi.Store) {
	create(t, s, "dup@example.com", "One")
	in := userapi.UserCreate{Email: "DUP@example.COM", Name: "Two"}
	if err := in.Validate(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.CreateUser(ctx(t), in); !errors.Is(err, userapi.ErrEmailTaken) {
		t.Errorf("CreateUser(duplicate, other case) error = %v, want ErrEmailTaken", err)
	}
	page, err := s.ListUsers(ctx(t), userapi.UserFilter{Limit: 10})
	if err != nil || len(page) != 1 {
		t.Errorf("after duplicate: ListUsers = %d users, %v; want 1", len(page), err)
	}
}

func testUpdateIncrementsVersion(t *testing.T, s userapi.Store) {
	u := create(t, s, "v@example.com", "V")
	time.Sleep(2 * time.Millisecond)
	for want := int64(2); want <= 4; want++ {
		got, err := s.UpdateUser(ctx(t), u.ID, userapi.UserUpdate{Email: ptr("v@example.com"), Name: ptr(fmt.Sprint("V", want))})
		if err != nil {
			t.Fatalf("UpdateUser: %v", err)
		}
		if got.Version != want || got.Name != fmt.Sprint("V", want) {
			t.Errorf("UpdateUser = version %d name %q; want %d", got.Version, got.Name, want)
		}
		if !got.CreatedAt.Equal(u.CreatedAt) || !got.UpdatedAt.After(u.CreatedAt) {
			t.Errorf("UpdateUser times = %v, %v; want created kept, updated later", got.CreatedAt, got.UpdatedAt)
		}
		read, err := s.GetUser(ctx(t), u.ID)
		if err != nil || read.Version != want {
			t.Errorf("GetUser after update = %+v, %v", read, err)
		}
	}
}

func testUpdatePartial(t *testing.T, s userapi.Store) {
	u := create(t, s, "p@example.com", "P")
	got, err := s.UpdateUser(ctx(t), u.ID, userapi.UserUpdate{Name: ptr("Q")})
	if err != nil || got.Email != "p@example.com" || got.Name != "Q" {
		t.Errorf("UpdateUser(name only) = %+v, %v", got, err)
	}
	got, err = s.UpdateUser(ctx(t), u.ID, userapi.UserUpdate{Email: ptr("q@example.com")})
	if err != nil || got.Email != "q@example.com" || got.Name != "Q" || got.Version != 3 {
		t.Errorf("UpdateUser(email only) = %+v, %v", got, err)
	}
}

func testUpdateNotFound(t *testing.T, s userapi.Store) {
	_, err := s.UpdateUser(ctx(t), 987654321, userapi.UserUpdate{Name: ptr("X")})
	if !errors.Is(err, userapi.ErrNotFound) {
		t.Errorf("UpdateUser(absent) error = %v, want ErrNotFound", err)
	}
	_, err = s.UpdateUser(ctx(t), 987654321, userapi.UserUpdate{Name: ptr("X"), IfVersion: 3})
	if !errors.Is(err, userapi.ErrNotFound) {
		t.Errorf("UpdateUser(absent, If-Match) error = %v, want ErrNotFound", err)
	}
}

func testUpdateDuplicateEmail(t *testing.T, s userapi.Store) {
	create(t, s, "a@example.com", "A")
	b := create(t, s, "b@example.com", "B")
	if _, err := s.UpdateUser(ctx(t), b.ID, userapi.UserUpdate{Email: ptr("a@example.com")}); !errors.Is(err, userapi.ErrEmailTaken) {
		t.Errorf("UpdateUser(taken email) error = %v, want ErrEmailTaken", err)
	}
	got, err := s.GetUser(ctx(t), b.ID)
	if err != nil || got.Email != "b@example.com" || got.Version != 1 {
		t.Errorf("after failed update: %+v, %v; want unchanged", got, err)
	}
}

func testIfMatch(t *testing.T, s userapi.Store) {
	u := create(t, s, "m@example.com", "M")
	if _, err := s.UpdateUser(ctx(t), u.ID, userapi.UserUpdate{Name: ptr("N"), IfVersion: 2}); !errors.Is(err, userapi.ErrVersionMismatch) {
		t.Errorf("UpdateUser(IfVersion 2 on v1) error = %v, want ErrVersionMismatch", err)
	}
	got, err := s.UpdateUser(ctx(t), u.ID, userapi.UserUpdate{Name: ptr("N"), IfVersion: 1})
	if err != nil || got.Version != 2 {
		t.Fatalf("UpdateUser(IfVersion 1) = %+v, %v", got, err)
	}
	if err := s.DeleteUser(ctx(t), u.ID, 1); !errors.Is(err, userapi.ErrVersionMismatch) {
		t.Errorf("DeleteUser(ifVersion 1 on v2) error = %v, want ErrVersionMismatch", err)
	}
	if err := s.DeleteUser(ctx(t), u.ID, 2); err != nil {
		t.Errorf("DeleteUser(ifVersion 2): %v", err)
	}
	if err := s.DeleteUser(ctx(t), u.ID, 2); !errors.Is(err, userapi.ErrNotFound) {
		t.Errorf("DeleteUser(deleted, ifVersion) error = %v, want ErrNotFound", err)
	}
}

func testDelete(t *testing.T, s userapi.Store) {
	u := create(t, s, "d@example.com", "D")
	if err := s.DeleteUser(ctx(t), u.ID, 0); err != nil {
		t.Fatalf("DeleteUser: %v", err)
	}
	if _, err := s.GetUser(ctx(t), u.ID); !errors.Is(err, userapi.ErrNotFound) {
		t.Errorf("GetUser(deleted) error = %v, want ErrNotFound", err)
	}
	if err := s.DeleteUser(ctx(t), u.ID, 0); !errors.Is(err, userapi.ErrNotFound) {
		t.Errorf("DeleteUser(deleted) error = %v, want ErrNotFound", err)
	}
	// The email is free again.
	create(t, s, "d@example.com", "D2")
}

func testGetUsers(t *testing.T, s userapi.Store) {
	var want []*userapi.User
	for i := range 5 {
		want = append(want, create(t, s, fmt.Sprintf("g%d@example.com", i), "G"))
	}
	ids := []int64{want[4].ID, 987654321, want[0].ID, want[2].ID, want[2].ID}
	got, err := s.GetUsers(ctx(t), ids)
	if err != nil {
		t.Fatalf("GetUsers: %v", err)
	}
	sort.Slice(got, func(i, j int) bool { return got[i].ID < got[j].ID })
	if diff := cmp.Diff([]*userapi.User{want[0], want[2], want[4]}, got); diff != "" {
		t.Errorf("GetUsers mismatch (-want +got):\n%s", diff)
	}
	if got, err := s.GetUsers(ctx(t), nil); err != nil || len(got) != 0 {
		t.Errorf("GetUsers(nil) = %v, %v; want none", got, err)
	}
	many := make([]int64, 0, 1500)
	for i := range 1500 {
		many = append(many, int64(i+1))
	}
	got, err = s.GetUsers(ctx(t), many)
	if err != nil || len(got) < 1 {
		t.Errorf("GetUsers(1500 ids) = %d users, %v", len(got), err)
	}
}

func testListKeyset(t *testing.T, s userapi.Store) {
	var ids []int64
	for i := range 7 {
		ids = append(ids, create(t, s, fmt.Sprintf("l%d@example.com", i), "L").ID)
	}
	var got []int64
	after := int64(0)
	for range 10 {
		page, err := s.ListUsers(ctx(t), userapi.UserFilter{AfterID: after, Limit: 3})
		if err != nil {
			t.Fatalf("ListUsers: %v", err)
		}
		if len(page) > 3 {
			t.Fatalf("ListUsers(limit 3) returned %d", len(page))
		}
		for _, u := range page {
			got = append(got, u.ID)
		}
		if len(page) < 3 {
			break
		}
		after = page[len(page)-1].ID
	}
	if diff := cmp.Diff(ids, got); diff != "" {
		t.Errorf("keyset walk mismatch (-created +listed):\n%s", diff)
	}
	page, err := s.ListUsers(ctx(t), userapi.UserFilter{AfterID: ids[6], Limit: 3})
	if err != nil || len(page) != 0 {
		t.Errorf("ListUsers(after last) = %d users, %v; want 0", len(page), err)
	}
}

func testListByEmail(t *testing.T, s userapi.Store) {
	create(t, s, "x@example.com", "X")
	y := create(t, s, "y@example.com", "Y")
	page, err := s.ListUsers(ctx(t), userapi.UserFilter{Email: "y@example.com", Limit: 50})
	if err != nil || len(page) != 1 || page[0].ID != y.ID {
		t.Errorf("ListUsers(email) = %v, %v; want just %d", page, err, y.ID)
	}
	page, err = s.ListUsers(ctx(t), userapi.UserFilter{Email: "y@example.com", AfterID: y.ID, Limit: 50})
	if err != nil || len(page) != 0 {
		t.Errorf("ListUsers(email, after it) = %v, %v; want none", page, err)
	}
}

func testIdempotencyKey(t *testing.T, s userapi.Store) {
	in := userapi.UserCreate{Email: "idem@example.com", Name: "Idem", IdempotencyKey: "key-1"}
	first, replayed, err := s.CreateUser(ctx(t), in)
	if err != nil || replayed {
		t.Fatalf("first CreateUser = %v, %v, %v", first, replayed, err)
	}
	again, replayed, err := s.CreateUser(ctx(t), in)
	if err != nil || !replayed {
		t.Fatalf("retry CreateUser = %v, replayed=%v, %v; want replay", again, replayed, err)
	}
	if diff := cmp.Diff(first, again); diff != "" {
		t.Errorf("replay differs from first result (-first +replay):\n%s", diff)
	}
	// The replay is the first response even after the user changed.
	if _, err := s.UpdateUser(ctx(t), first.ID, userapi.UserUpdate{Name: ptr("Changed")}); err != nil {
		t.Fatal(err)
	}
	again, replayed, err = s.CreateUser(ctx(t), in)
	if err != nil || !replayed || !cmp.Equal(first, again) {
		t.Errorf("retry after update = %+v, %v, %v; want first result", again, replayed, err)
	}
	other := in
	other.Name = "Someone else"
	if _, _, err := s.CreateUser(ctx(t), other); !errors.Is(err, userapi.ErrIdempotencyMismatch) {
		t.Errorf("same key, other body error = %v, want ErrIdempotencyMismatch", err)
	}
	// A new key with a taken email is a plain conflict.
	taken := in
	taken.IdempotencyKey = "key-2"
	if _, _, err := s.CreateUser(ctx(t), taken); !errors.Is(err, userapi.ErrEmailTaken) {
		t.Errorf("new key, taken email error = %v, want ErrEmailTaken", err)
	}
	page, err := s.ListUsers(ctx(t), userapi.UserFilter{Limit: 10})
	if err != nil || len(page) != 1 {
		t.Errorf("users after retries = %d, %v; want exactly 1", len(page), err)
	}
}

func testIdempotencyKeyConcurrent(t *testing.T, s userapi.Store) {
	in := userapi.UserCreate{Email: "race@example.com", Name: "Race", IdempotencyKey: "race-key"}
	const n = 8
	var wg sync.WaitGroup
	ids := make([]int64, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			u, _, err := s.CreateUser(ctx(t), in)
			errs[i] = err
			if err == nil {
				ids[i] = u.ID
			}
		})
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Errorf("concurrent create %d: %v", i, errs[i])
		} else if ids[i] != ids[0] {
			t.Errorf("concurrent create %d got id %d, want %d (one user)", i, ids[i], ids[0])
		}
	}
	page, err := s.ListUsers(ctx(t), userapi.UserFilter{Limit: 10})
	if err != nil || len(page) != 1 {
		t.Errorf("users after concurrent retries = %d, %v; want exactly 1", len(page), err)
	}
}

// testConcurrentUpdates has many goroutines update one row: every update
// must be applied exactly once, so the final version counts them all.
func testConcurrentUpdates(t *testing.T, s userapi.Store) {
	u := create(t, s, "c@example.com", "C")
	const workers, each = 8, 10
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := map[int64]bool{}
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				got, err := s.UpdateUser(ctx(t), u.ID, userapi.UserUpdate{Name: ptr(fmt.Sprintf("w%d-%d", w, i))})
				if err != nil {
					t.Errorf("UpdateUser: %v", err)
					return
				}
				mu.Lock()
				if seen[got.Version] {
					t.Errorf("version %d returned twice", got.Version)
				}
				seen[got.Version] = true
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	got, err := s.GetUser(ctx(t), u.ID)
	if err != nil {
		t.Fatalf("GetUser: %v", err)
	}
	if got.Version != 1+workers*each {
		t.Errorf("final version = %d; want %d", got.Version, 1+workers*each)
	}
}

// testConcurrentIfMatch has goroutines race to update from the same version:
// exactly one wins, the rest get ErrVersionMismatch.
func testConcurrentIfMatch(t *testing.T, s userapi.Store) {
	u := create(t, s, "race2@example.com", "R")
	const n = 8
	var wg sync.WaitGroup
	results := make([]error, n)
	for i := range n {
		wg.Go(func() {
			_, results[i] = s.UpdateUser(ctx(t), u.ID, userapi.UserUpdate{Name: ptr(fmt.Sprint("r", i)), IfVersion: 1})
		})
	}
	wg.Wait()
	wins := 0
	for _, err := range results {
		switch {
		case err == nil:
			wins++
		case !errors.Is(err, userapi.ErrVersionMismatch):
			t.Errorf("racing update error = %v, want nil or ErrVersionMismatch", err)
		}
	}
	if wins != 1 {
		t.Errorf("%d racing updates won, want exactly 1", wins)
	}
}

func testTimestamps(t *testing.T, s userapi.Store) {
	u := create(t, s, "t@example.com", "T")
	if u.CreatedAt.Location() != time.UTC || u.CreatedAt.Nanosecond()%1000 != 0 {
		t.Errorf("CreatedAt = %v; want UTC with microsecond precision", u.CreatedAt)
	}
	got, err := s.GetUser(ctx(t), u.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.CreatedAt.Location() != time.UTC || !got.CreatedAt.Equal(u.CreatedAt) {
		t.Errorf("read CreatedAt = %v (%v); want %v UTC", got.CreatedAt, got.CreatedAt.Location(), u.CreatedAt)
	}
	if got := string(got.AppendJSON(nil)); got != string(u.AppendJSON(nil)) {
		t.Errorf("JSON after round trip = %s, want %s", got, u.AppendJSON(nil))
	}
}

func testPing(t *testing.T, s userapi.Store) {
	if err := s.Ping(ctx(t)); err != nil {
		t.Errorf("Ping: %v", err)
	}
}

func testSeed(t *testing.T, s userapi.Store) {
	const n = 2500
	var last int
	err := s.(userapi.Seeder).SeedUsers(ctx(t), 1, n, func(done int) { last = done })
	if err != nil {
		t.Fatalf("SeedUsers: %v", err)
	}
	if last != n {
		t.Errorf("last progress = %d, want %d", last, n)
	}
	email, name := userapi.SeedUser(1234)
	page, err := s.ListUsers(ctx(t), userapi.UserFilter{Email: email, Limit: 2})
	if err != nil || len(page) != 1 || page[0].Name != name || page[0].Version != 1 {
		t.Fatalf("seeded user 1234 = %v, %v", page, err)
	}
	count := 0
	for after := int64(0); ; {
		page, err := s.ListUsers(ctx(t), userapi.UserFilter{AfterID: after, Limit: userapi.MaxLimit})
		if err != nil {
			t.Fatal(err)
		}
		count += len(page)
		if len(page) < userapi.MaxLimit {
			break
		}
		after = page[len(page)-1].ID
	}
	if count != n {
		t.Errorf("seeded %d users, want %d", count, n)
	}
	// Creates after a seed get fresh ids, above every seeded one.
	var maxID int64
	for after := int64(0); ; {
		page, err := s.ListUsers(ctx(t), userapi.UserFilter{AfterID: after, Limit: userapi.MaxLimit})
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		after = page[len(page)-1].ID
		maxID = after
	}
	u := create(t, s, "after-seed@example.com", "After")
	if u.ID <= maxID {
		t.Errorf("create after seed got id %d, want one above the seeded ids (max %d)", u.ID, maxID)
	}
}
