package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"
)

// tracked is a user as its one writer last had it acknowledged. Each user
// is written by exactly one worker, one request at a time, so the last
// acknowledged write is what the database must hold at the end.
type tracked struct {
	id      int64
	email   string
	name    string
	version int64
	deleted bool
	// key is the Idempotency-Key of the create, when it was made during
	// the load (and may have been retried).
	key string
}

// apiUser is the JSON of a user response.
type apiUser struct {
	ID      int64  `json:"id"`
	Email   string `json:"email"`
	Name    string `json:"name"`
	Version int64  `json:"version"`
}

// worker issues the mixed load for the users it owns.
type worker struct {
	n      int
	tag    string // unique per test run: emails never collide across runs
	base   string
	client *http.Client
	rng    *rand.Rand
	users  []*tracked
	seq    int

	// Outcome counts by method, and the first failures in detail.
	ok, failed map[string]int
	failures   []string
	// postRetries counts POST attempts that had to be repeated (with the
	// same Idempotency-Key) because the instance died under them.
	postRetries int
	// deleteReplays counts DELETEs answered 404 for a user this worker
	// had not deleted yet: nginx retried a DELETE whose first attempt had
	// already removed the user on an instance that was then killed.
	deleteReplays int
}

func newWorker(n int, tag, base string, client *http.Client) *worker {
	return &worker{
		n:      n,
		tag:    tag,
		base:   base,
		client: client,
		rng:    rand.New(rand.NewPCG(uint64(n), uint64(time.Now().UnixNano()))),
		ok:     map[string]int{},
		failed: map[string]int{},
	}
}

func (w *worker) fail(method, format string, args ...any) {
	w.failed[method]++
	if len(w.failures) < 10 {
		w.failures = append(w.failures, fmt.Sprintf("worker %d %s: ", w.n, method)+fmt.Sprintf(format, args...))
	}
}

// do sends one request and returns the status and body; status 0 means a
// transport error (err says which).
func (w *worker) do(ctx context.Context, method, path string, body []byte, hdr map[string]string) (int, []byte, error) {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, w.base+path, r)
	if err != nil {
		return 0, nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, err
	}
	return resp.StatusCode, b, nil
}

// create makes a user through the balancer with an Idempotency-Key,
// retrying with the same key and body while the answer is a transport
// error or a 502/503/504, as a client does when the instance handling its
// POST dies. It returns the acknowledged user, or an error for any other
// answer or when the retries run out.
func (w *worker) create(ctx context.Context) (*tracked, error) {
	w.seq++
	s := strconv.Itoa(w.n) + "-" + strconv.Itoa(w.seq)
	u := &tracked{
		email: "c" + s + "-" + w.tag + "@example.com",
		name:  "Created " + s,
		key:   w.tag + "-" + s,
	}
	body, _ := json.Marshal(map[string]string{"email": u.email, "name": u.name})
	var last string
	for attempt := range 40 {
		if attempt > 0 {
			w.postRetries++
			time.Sleep(50 * time.Millisecond)
		}
		// A retry must not be cut short by the end of the load.
		status, b, err := w.do(context.WithoutCancel(ctx), "POST", "/users", body, map[string]string{"Idempotency-Key": u.key})
		switch {
		case err != nil:
			last = err.Error()
			continue
		case status == 502 || status == 503 || status == 504:
			last = fmt.Sprintf("%d %s", status, b)
			continue
		case status != 201:
			return nil, fmt.Errorf("POST %s: %d %s", u.email, status, b)
		}
		var got apiUser
		if err := json.Unmarshal(b, &got); err != nil {
			return nil, fmt.Errorf("POST %s: %v: %s", u.email, err, b)
		}
		if got.Email != u.email || got.Name != u.name || got.Version != 1 || got.ID <= 0 {
			return nil, fmt.Errorf("POST %s: got %+v", u.email, got)
		}
		u.id, u.version = got.ID, got.Version
		return u, nil
	}
	return nil, fmt.Errorf("POST %s: still failing after retries: %s", u.email, last)
}

// step issues one request of the mix: 55% GET, 25% PUT, 5% DELETE and 15%
// POST.
func (w *worker) step(ctx context.Context) {
	live := w.live()
	r := w.rng.IntN(100)
	switch {
	case r < 55 && len(w.users) > 0:
		w.get(ctx, w.users[w.rng.IntN(len(w.users))])
	case r < 80 && len(live) > 0:
		w.put(ctx, live[w.rng.IntN(len(live))])
	case r < 85 && len(live) > 2:
		w.delete(ctx, live[w.rng.IntN(len(live))])
	default:
		u, err := w.create(ctx)
		if err != nil {
			w.fail("POST", "%v", err)
			return
		}
		w.ok["POST"]++
		w.users = append(w.users, u)
	}
}

func (w *worker) live() []*tracked {
	var live []*tracked
	for _, u := range w.users {
		if !u.deleted {
			live = append(live, u)
		}
	}
	return live
}

// get reads a user through the balancer. A live user must be found; a
// deleted one may still be served by another instance until its
// invalidation arrives, so 200 or 404 are both right for it.
func (w *worker) get(ctx context.Context, u *tracked) {
	status, b, err := w.do(ctx, "GET", "/users/"+strconv.FormatInt(u.id, 10), nil, nil)
	switch {
	case ctx.Err() != nil:
		return // the load ended mid-request: not the service's failure
	case err != nil:
		w.fail("GET", "/users/%d: %v", u.id, err)
	case status == 200:
		var got apiUser
		if err := json.Unmarshal(b, &got); err != nil || got.ID != u.id {
			w.fail("GET", "/users/%d: %v: %s", u.id, err, b)
			return
		}
		w.ok["GET"]++
	case status == 404 && u.deleted:
		w.ok["GET"]++
	default:
		w.fail("GET", "/users/%d (deleted %v): %d %s", u.id, u.deleted, status, b)
	}
}

// put replaces a user's name with a new one (no If-Match: a PUT nginx
// retries after its first attempt committed must still succeed).
func (w *worker) put(ctx context.Context, u *tracked) {
	w.seq++
	name := "Renamed " + strconv.Itoa(w.n) + "-" + strconv.Itoa(w.seq)
	body, _ := json.Marshal(map[string]string{"email": u.email, "name": name})
	status, b, err := w.do(ctx, "PUT", "/users/"+strconv.FormatInt(u.id, 10), body, nil)
	switch {
	case ctx.Err() != nil:
		// The outcome is unknown, so the user's expected state is too:
		// forget it rather than guess.
		w.forget(u)
	case err != nil:
		w.fail("PUT", "/users/%d: %v", u.id, err)
		w.forget(u)
	case status == 200:
		var got apiUser
		if err := json.Unmarshal(b, &got); err != nil || got.ID != u.id || got.Name != name || got.Version <= u.version {
			w.fail("PUT", "/users/%d: got %s (had version %d)", u.id, b, u.version)
			w.forget(u)
			return
		}
		u.name, u.version = name, got.Version
		w.ok["PUT"]++
	default:
		w.fail("PUT", "/users/%d: %d %s", u.id, status, b)
		w.forget(u)
	}
}

func (w *worker) delete(ctx context.Context, u *tracked) {
	status, b, err := w.do(ctx, "DELETE", "/users/"+strconv.FormatInt(u.id, 10), nil, nil)
	switch {
	case ctx.Err() != nil:
		w.forget(u)
	case err != nil:
		w.fail("DELETE", "/users/%d: %v", u.id, err)
		w.forget(u)
	case status == 204:
		u.deleted = true
		w.ok["DELETE"]++
	case status == 404:
		// Only this worker writes u and it has not deleted it, so the
		// user was removed by an earlier attempt of this same request.
		u.deleted = true
		w.deleteReplays++
		w.ok["DELETE"]++
	default:
		w.fail("DELETE", "/users/%d: %d %s", u.id, status, b)
		w.forget(u)
	}
}

// forget drops a user whose last write has an unknown outcome from the
// checks (a failure is reported separately).
func (w *worker) forget(u *tracked) {
	for i, x := range w.users {
		if x == u {
			w.users = append(w.users[:i], w.users[i+1:]...)
			return
		}
	}
}

// load is a set of workers sharing one client to the balancer.
type load struct {
	workers []*worker
}

// newLoad creates workers users per worker through the cluster's nginx
// (before any fault is injected) and returns the load ready to run.
func newLoad(t *testing.T, c *cluster, workers, usersEach int) *load {
	t.Helper()
	base := c.url
	client := c.newClient(workers)
	tag := randomHex(4)
	l := &load{}
	for n := range workers {
		w := newWorker(n, tag, base, client)
		for range usersEach {
			u, err := w.create(context.Background())
			if err != nil {
				t.Fatalf("seed users: %v", err)
			}
			w.users = append(w.users, u)
		}
		l.workers = append(l.workers, w)
	}
	return l
}

// run drives the load until ctx ends. pace spaces each worker's requests,
// which keeps the load bounded on a shared 2-core machine while keeping
// requests in flight at all times.
func (l *load) run(ctx context.Context, pace time.Duration) {
	var wg sync.WaitGroup
	for _, w := range l.workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				w.step(ctx)
				time.Sleep(pace)
			}
		})
	}
	wg.Wait()
}

// start runs the load in the background; the returned function stops it
// and waits for the workers.
func (l *load) start(pace time.Duration) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		l.run(ctx, pace)
		close(done)
	}()
	return func() {
		cancel()
		<-done
	}
}

// checkNoFailures fails the test for every failed request and logs the
// counts.
func (l *load) checkNoFailures(t *testing.T) {
	t.Helper()
	ok, failed := map[string]int{}, map[string]int{}
	postRetries, deleteReplays := 0, 0
	var failures []string
	for _, w := range l.workers {
		for m, n := range w.ok {
			ok[m] += n
		}
		for m, n := range w.failed {
			failed[m] += n
		}
		postRetries += w.postRetries
		deleteReplays += w.deleteReplays
		failures = append(failures, w.failures...)
	}
	t.Logf("requests ok %v, failed %v; POST attempts retried by the client: %d; DELETEs answered 404 after a retried first attempt: %d",
		ok, failed, postRetries, deleteReplays)
	for _, m := range []string{"GET", "PUT", "DELETE", "POST"} {
		if ok[m] == 0 {
			t.Errorf("no successful %s: the load did not exercise it", m)
		}
		if failed[m] > 0 {
			t.Errorf("%d failed %s requests", failed[m], m)
		}
	}
	for _, f := range failures {
		t.Error(f)
	}
}

// users returns every tracked user of every worker.
func (l *load) users() []*tracked {
	var all []*tracked
	for _, w := range l.workers {
		all = append(all, w.users...)
	}
	return all
}

// checkDatabase compares the database with every acknowledged write: each
// live user has its last acknowledged name (and at least that version),
// each deleted user is gone, each Idempotency-Key names the user its create
// returned, and there is no row the load does not know of (a duplicate
// from a retried create would be one).
func checkDatabase(t *testing.T, c *cluster, l *load) {
	t.Helper()
	ctx := context.Background()
	rows, err := c.dbUsers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := c.idempotencyKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	live := 0
	for _, u := range l.users() {
		if id, ok := keys[u.key]; !ok || id != u.id {
			t.Errorf("Idempotency-Key %s: stored user %d (present %v), create returned %d", u.key, id, ok, u.id)
		}
		row, ok := rows[u.id]
		switch {
		case u.deleted && ok:
			t.Errorf("user %d: deleted (acknowledged) but still in the database: %+v", u.id, row)
		case u.deleted:
		case !ok:
			t.Errorf("user %d: acknowledged %q version %d, missing from the database", u.id, u.name, u.version)
		case row.Email != u.email || row.Name != u.name || row.Version < u.version:
			t.Errorf("user %d: acknowledged %s %q version %d, database has %s %q version %d",
				u.id, u.email, u.name, u.version, row.Email, row.Name, row.Version)
		default:
			live++
		}
	}
	// Every create of the load carried a key, stored with its row in one
	// transaction: a row no key names would be a second user made by a
	// retried create.
	keyed := map[int64]bool{}
	for _, id := range keys {
		keyed[id] = true
	}
	for id, row := range rows {
		if !keyed[id] {
			t.Errorf("row %+v was made by no create's Idempotency-Key", row)
		}
	}
	t.Logf("database: %d rows, %d keys, %d live acknowledged users match", len(rows), len(keys), live)
}
