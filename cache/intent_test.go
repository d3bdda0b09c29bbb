package cache

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"userapi/internal/testenv"

	"userapi"
)

// crashingStore commits an update or delete and then never returns, as a
// writer killed between its commit and its invalidation would: nothing
// after the commit runs until the test ends. Its write starts only once
// proceed is closed.
type crashingStore struct {
	userapi.Store
	proceed, committed, hang chan struct{}
}

func newCrashingStore(s userapi.Store) *crashingStore {
	return &crashingStore{Store: s, proceed: make(chan struct{}), committed: make(chan struct{}), hang: make(chan struct{})}
}

func (c *crashingStore) UpdateUser(ctx context.Context, id int64, upd userapi.UserUpdate) (*userapi.User, error) {
	<-c.proceed
	u, err := c.Store.UpdateUser(ctx, id, upd)
	close(c.committed)
	<-c.hang
	return u, err
}

func (c *crashingStore) DeleteUser(ctx context.Context, id int64, ifVersion int64) error {
	<-c.proceed
	err := c.Store.DeleteUser(ctx, id, ifVersion)
	close(c.committed)
	<-c.hang
	return err
}

// redisEntry is Redis's entry for id as c reads it, nil when there is none.
func redisEntry(t *testing.T, c *Store, id int64) *entry {
	t.Helper()
	e, err := c.redis.getWithin(testenv.Context(t), id, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// show describes e for a test message.
func show(e *entry) string {
	if e == nil {
		return "nothing"
	}
	return fmt.Sprintf("kind %d version %d", e.kind, e.version)
}

// localEntry is c's live local entry for id, nil when there is none.
func localEntry(c *Store, id int64) *entry {
	if e, ok := c.local.get(id); ok && (e.kind.guards() || e.epoch == c.state.Load()) {
		return e
	}
	return nil
}

// TestCrashedWriterLeavesNothingStale: instance A commits a write and dies
// before its invalidation (here it hangs, which B cannot tell apart).
// Before the write went to the database, A's intent reached Redis and B's
// local tier, so from the commit on B never serves the old version: not
// while the intent holds, and not after it has expired, when B caches the
// new version again.
func TestCrashedWriterLeavesNothingStale(t *testing.T) {
	for _, op := range []string{"update", "delete"} {
		t.Run(op, func(t *testing.T) {
			url := needRedis(t)
			db := newSQLite(t)
			u := mustCreate(t, db, "crash-"+op+"@example.com")
			cfg := fastTiered(url, testPrefix())
			cfg.TombstoneTTL = 300 * time.Millisecond
			crash := newCrashingStore(db)
			a := newCache(t, crash, cfg)
			b := newCache(t, db, cfg)
			// Registered after the caches, so it runs before their Close.
			t.Cleanup(func() { close(crash.hang) })
			testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
			if v := version(t, b, u.ID); v != 1 {
				t.Fatalf("B reads version %d, want 1", v)
			}
			// The read answered from B's local tier; Redis is filled
			// just after.
			testenv.WaitFor(t, time.Second, "Redis holds version 1 before the write", func() bool {
				e := redisEntry(t, b, u.ID)
				return e != nil && e.kind == kindValue
			})

			want := int64(2) // the version B must read from the commit on; 0: absent
			if op == "delete" {
				want = 0
			}
			go func() {
				if op == "update" {
					name := "Renamed"
					a.UpdateUser(context.Background(), u.ID, userapi.UserUpdate{Name: &name})
				} else {
					a.DeleteUser(context.Background(), u.ID, 0)
				}
			}()
			// The intent is published before the write starts; its notice
			// reaches B within the channel's delivery time, which is not
			// what this test measures (TestNoticeDeliveryLatency does).
			testenv.WaitFor(t, time.Second, "B received the intent", func() bool { return value(b.m.intentsReceived) > 0 })
			if e := redisEntry(t, b, u.ID); e == nil || e.kind != kindIntent || e.version != 1 {
				t.Fatalf("Redis holds %s during the write, want an intent carrying version 1", show(e))
			}
			close(crash.proceed)
			<-crash.committed

			end := time.Now().Add(3 * cfg.TombstoneTTL) // well past the intent's expiry
			reads := 0
			for time.Now().Before(end) {
				if v := version(t, b, u.ID); v != want {
					t.Fatalf("B read version %d after the commit (read %d), want %d", v, reads, want)
				}
				reads++
				time.Sleep(time.Millisecond)
			}
			checkTiers(t, b, db, u.ID)
			if op == "update" {
				// Caching resumed: the intent expired, and B's reads
				// filled both tiers with the new version.
				if e := localEntry(b, u.ID); e == nil || e.kind != kindValue || e.version != 2 {
					t.Errorf("B's local tier holds %s after the intent expired, want version 2", show(e))
				}
				testenv.WaitFor(t, time.Second, "Redis holds version 2 after the intent expired", func() bool {
					e := redisEntry(t, b, u.ID)
					return e != nil && e.kind == kindValue && e.version == 2
				})
			}
		})
	}
}

// TestRefusedWriteReleasesIntent: a write the database refuses (a stale
// If-Match) changed nothing, so its end resolves the intent at once: both
// tiers cache the unchanged user again without waiting for the intent to
// expire.
func TestRefusedWriteReleasesIntent(t *testing.T) {
	url := needRedis(t)
	db := newSQLite(t)
	u := mustCreate(t, db, "refused@example.com")
	cfg := fastTiered(url, testPrefix())
	cfg.TombstoneTTL = time.Minute // longer than the test: only the release can end the intent
	a := newCache(t, db, cfg)
	b := newCache(t, db, cfg)
	testenv.WaitFor(t, 5*time.Second, "instances healthy", func() bool { return healthy(a) && healthy(b) })
	version(t, b, u.ID)
	testenv.WaitFor(t, time.Second, "Redis filled", func() bool { return redisEntry(t, b, u.ID) != nil })

	name := "Never"
	_, err := a.UpdateUser(testenv.Context(t), u.ID, userapi.UserUpdate{Name: &name, IfVersion: 7})
	if !errors.Is(err, userapi.ErrVersionMismatch) {
		t.Fatalf("UpdateUser with a stale version: %v, want ErrVersionMismatch", err)
	}
	if err := a.DeleteUser(testenv.Context(t), u.ID, 7); !errors.Is(err, userapi.ErrVersionMismatch) {
		t.Fatalf("DeleteUser with a stale version: %v, want ErrVersionMismatch", err)
	}
	testenv.WaitFor(t, time.Second, "B received both releases", func() bool { return value(b.m.invReceived) >= 2 })
	if e := redisEntry(t, b, u.ID); e == nil || e.kind != kindTombstone || e.version != 1 {
		t.Errorf("Redis holds %s after the refused writes, want the tombstone of version 1", show(e))
	}
	if v := version(t, b, u.ID); v != 1 {
		t.Fatalf("B reads version %d, want 1", v)
	}
	if e := localEntry(b, u.ID); e == nil || e.kind != kindValue || e.version != 1 {
		t.Errorf("B's local tier holds %s after a read, want version 1 cached again", show(e))
	}
	testenv.WaitFor(t, time.Second, "Redis caches version 1 again after a read", func() bool {
		e := redisEntry(t, b, u.ID)
		return e != nil && e.kind == kindValue && e.version == 1
	})
	if got := value(a.m.intentsSent); got != 2 {
		t.Errorf("intents sent = %v, want 2", got)
	}
}

// TestIntentAdmit: the local tier's rules around an intent.
func TestIntentAdmit(t *testing.T) {
	l, err := newLocalTier(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	var state epoch
	state.Store(1)
	val := func(v int64) *entry {
		return &entry{kind: kindValue, version: v, json: []byte("{}"), epoch: 1, ttl: time.Minute}
	}
	const id = 1
	l.fill(id, val(3), &state)
	l.intent(id, time.Minute)
	for _, e := range []*entry{val(3), val(4), {kind: kindAbsent, epoch: 1, ttl: time.Minute}} {
		if r := l.fill(id, e, &state); r != fillStale {
			t.Errorf("fill of %+v over an intent = %v, want stale", e, r)
		}
	}
	l.tombstone(id, releaseVersion, time.Minute)
	if e, _ := l.get(id); e.kind != kindTombstone || e.version != 3 {
		t.Fatalf("a release over an intent left %s, want the tombstone of version 3", show(e))
	}
	if r := l.fill(id, val(3), &state); r != fillInstalled {
		t.Errorf("fill of version 3 after the release = %v, want installed", r)
	}
	l.tombstone(id, releaseVersion, time.Minute)
	if e, _ := l.get(id); e.kind != kindValue {
		t.Errorf("a release without an intent replaced the value with %s", show(e))
	}
	l.intent(id, time.Minute)
	l.tombstone(id, 5, time.Minute)
	if e, _ := l.get(id); e.kind != kindTombstone || e.version != 5 {
		t.Errorf("the write's tombstone over an intent left %s, want version 5", show(e))
	}
	l.intent(id, time.Minute)
	l.tombstone(id, 2, time.Minute) // a write older than what the intent carries
	if e, _ := l.get(id); e.kind != kindTombstone || e.version != 5 {
		t.Errorf("an older tombstone over an intent left %s, want version 5 kept", show(e))
	}
}
