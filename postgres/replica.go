package postgres

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"userapi"
	"userapi/internal/redact"
)

// Read replicas (Options.Replicas). GetUsers (the cache's batched fills)
// and ListUsers may be served by a streaming replica; everything else (the
// writes, their idempotency lookups, GetUser, which backs the If-Match
// checks) stays on the primary. docs/stores.md gives the rules.
//
// A read needs a position: the replica must have replayed at least the
// commit of every write this store has acknowledged for the rows it reads,
// and at least the client's session token (userapi.Session.After):
//
//   - every write records the primary's WAL flush position right after its
//     commit, in the same round trip (writeRow). Synchronous commit means
//     the commit record is flushed when COMMIT returns, so that position is
//     at or past the commit;
//   - a write acknowledged less than the horizon (the lag bound) ago is
//     required per row: only reads of that id need its position. Older ones
//     are folded into one floor every read needs. Lists need the newest
//     position acknowledged;
//   - each replica's replay position is polled every ReplicaPoll, and a read
//     goes to a replica whose last known position has reached its need and
//     whose lag is within ReplicaMaxLag; with none, to the primary;
//   - the replica checks its replay position again in the read's own round
//     trip (a pipelined statement before the query, so before the query's
//     snapshot is taken), and a replica found behind sends the read to the
//     primary: the poll only chooses, it is not trusted.

// DefaultReplicaMaxLag bounds how far behind the primary a replica may be
// and still serve reads: well below the cache's tombstone lifetime (10 s;
// a fill older than half of it is dropped), so a replica never serves a row
// whose invalidation can have expired, and short enough that rows written
// elsewhere without a session token are at most this stale.
const DefaultReplicaMaxLag = time.Second

// DefaultReplicaPoll is how often each replica's replay position (and the
// primary's WAL position) is read: a few milliseconds, so that a replica
// that has caught up with a write is used again soon after; each poll is
// one trivial query on a connection of the poller's own.
const DefaultReplicaPoll = 5 * time.Millisecond

// The reasons a routable read went to the primary (metric label).
const (
	fallbackBehind  = "behind"   // no replica within the lag bound has replayed the read's need
	fallbackLagging = "lagging"  // every replica lags past the bound (or cannot be polled)
	fallbackFailed  = "failed"   // the replica's read failed
	fallbackAsked   = "asked"    // the caller asked for the primary (Session.Primary)
	fallbackNoToken = "no_token" // a list without a session token (see Store.ListUsers)
)

var fallbackReasons = []string{fallbackBehind, fallbackLagging, fallbackFailed, fallbackAsked, fallbackNoToken}

// replica is one streaming replica.
type replica struct {
	addr string // host:port, the metrics label
	pool *pgxpool.Pool
	poll *pgx.ConnConfig

	replay   atomic.Uint64 // the last replay position seen
	seen     atomic.Int64  // unix nanoseconds of the last successful poll
	lagBytes atomic.Int64
	lagNanos atomic.Int64
	reads    atomic.Uint64 // reads it served
}

// ack is one acknowledged write, for the per-row requirements.
type ack struct {
	id  int64
	pos userapi.Position
	at  time.Time
}

// sample is the primary's WAL position from first to last.
type sample struct {
	pos         userapi.Position
	first, last time.Time
}

// routing holds the replicas and what reads need of them.
type routing struct {
	replicas []*replica
	maxLag   time.Duration
	interval time.Duration
	// silent is how long a replica may go without answering its poll
	// and still be picked: a replica that hangs (accepts connections and
	// never answers) stops being picked after this, not after maxLag, so
	// only the reads picked before then wait for their timeout.
	silent  time.Duration
	primary *pgx.ConnConfig // for the position poller
	next    atomic.Uint32   // round robin

	mu      sync.Mutex
	recent  map[int64]userapi.Position // id → newest write acknowledged within the horizon
	acks    []ack                      // the same, in acknowledgment order
	settled userapi.Position           // the newest write acknowledged before the horizon
	newest  atomic.Uint64              // the newest write acknowledged

	smu     sync.Mutex
	samples []sample // primary positions, oldest first, one per change
	head    atomic.Uint64

	primaryReads atomic.Uint64
	fallbacks    [5]atomic.Uint64 // by fallbackReasons' index
	pollErrors   atomic.Uint64

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// openReplicas opens a pool per replica URL (connections are made on
// demand: a replica that is down at start is simply not used) and starts
// the pollers.
func openReplicas(urls []string, primary *pgx.ConnConfig, opts Options) (*routing, error) {
	rt := &routing{
		maxLag:   opts.ReplicaMaxLag,
		interval: opts.ReplicaPoll,
		silent:   min(opts.ReplicaMaxLag, max(20*opts.ReplicaPoll, 100*time.Millisecond)),
		primary:  primary,
		recent:   make(map[int64]userapi.Position),
	}
	for _, u := range urls {
		cfg, err := pgxpool.ParseConfig(u)
		if err != nil {
			rt.close()
			return nil, fmt.Errorf("replica %s: %w", redact.URL(u), err)
		}
		cc := cfg.ConnConfig
		if cc.ConnectTimeout == 0 {
			cc.ConnectTimeout = opts.QueryTimeout
		}
		if _, ok := cc.RuntimeParams["application_name"]; !ok {
			cc.RuntimeParams["application_name"] = "userapi"
		}
		// The replay check and the query are two statements of one
		// implicit transaction: under READ COMMITTED each takes its own
		// snapshot, the query's after the check. A server default of
		// REPEATABLE READ would take one snapshot before the check.
		cc.RuntimeParams["default_transaction_isolation"] = "read committed"
		// As many connections as the primary's pool: a replica takes the
		// same reads the primary would, at most as many at once.
		cfg.MaxConns = int32(opts.MaxConns)
		pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
		if err != nil {
			rt.close()
			return nil, fmt.Errorf("replica %s: %w", redact.URL(u), err)
		}
		r := &replica{addr: net.JoinHostPort(cc.Host, fmt.Sprint(cc.Port)), pool: pool, poll: cc.Copy()}
		r.lagNanos.Store(int64(time.Hour)) // unknown until polled
		rt.replicas = append(rt.replicas, r)
	}
	ctx, cancel := context.WithCancel(context.Background())
	rt.cancel = cancel
	rt.wg.Go(func() { rt.pollPrimary(ctx) })
	for _, r := range rt.replicas {
		rt.wg.Go(func() { rt.pollReplica(ctx, r) })
	}
	return rt, nil
}

func (rt *routing) close() {
	if rt.cancel != nil {
		rt.cancel()
		rt.wg.Wait()
	}
	for _, r := range rt.replicas {
		r.pool.Close()
	}
}

// acked records a write of id acknowledged at pos.
func (rt *routing) acked(id int64, pos userapi.Position) {
	for {
		n := rt.newest.Load()
		if uint64(pos) <= n || rt.newest.CompareAndSwap(n, uint64(pos)) {
			break
		}
	}
	now := time.Now()
	rt.mu.Lock()
	rt.expire(now)
	if pos > rt.recent[id] {
		rt.recent[id] = pos
	}
	rt.acks = append(rt.acks, ack{id: id, pos: pos, at: now})
	rt.mu.Unlock()
}

// expire folds the acknowledgments older than the horizon into settled.
// rt.mu is held.
func (rt *routing) expire(now time.Time) {
	n := 0
	for n < len(rt.acks) && now.Sub(rt.acks[n].at) > rt.maxLag {
		a := rt.acks[n]
		rt.settled = max(rt.settled, a.pos)
		if rt.recent[a.id] == a.pos {
			delete(rt.recent, a.id)
		}
		n++
	}
	// Reslicing, not copying: append reallocates once the front is used
	// up, and then copies only what is left.
	rt.acks = rt.acks[n:]
}

// needOf returns the position a read of ids must reflect: every write of
// them acknowledged here, and the session's token.
func (rt *routing) needOf(ids []int64, after userapi.Position) userapi.Position {
	rt.mu.Lock()
	rt.expire(time.Now())
	need := max(rt.settled, after)
	if len(rt.recent) > 0 {
		for _, id := range ids {
			need = max(need, rt.recent[id])
		}
	}
	rt.mu.Unlock()
	return need
}

// pick returns a replica that may serve a read needing need, or nil and
// why not.
func (rt *routing) pick(need userapi.Position) (*replica, string) {
	n := len(rt.replicas)
	start := int(rt.next.Add(1))
	now := time.Now().UnixNano()
	reason := fallbackLagging
	for i := range n {
		r := rt.replicas[(start+i)%n]
		if !rt.usable(r, now) {
			continue
		}
		if userapi.Position(r.replay.Load()) < need {
			reason = fallbackBehind
			continue
		}
		return r, ""
	}
	return nil, reason
}

// usable reports whether r may serve reads at now (unix nanoseconds): it
// answered its poll lately and is within the lag bound.
func (rt *routing) usable(r *replica, now int64) bool {
	return now-r.seen.Load() <= int64(rt.silent) && r.lagNanos.Load() <= int64(rt.maxLag)
}

func (rt *routing) fellBack(reason string) {
	for i, r := range fallbackReasons {
		if r == reason {
			rt.fallbacks[i].Add(1)
		}
	}
	rt.primaryReads.Add(1)
}

const (
	// replayQuery reads a replica's replay position as a number: NULL on a
	// server that is not in recovery (started as a primary, or promoted,
	// where the last replayed position stays put while its own writes go
	// on), which is then never used.
	replayQuery = `SELECT CASE WHEN pg_is_in_recovery() THEN (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint END`
	// positionQuery reads the primary's WAL flush position.
	positionQuery = `SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint`
)

// pollBackoff is the wait after a failed poll: a server that is down is
// not dialled every few milliseconds.
const pollBackoff = 250 * time.Millisecond

// pollPrimary samples the primary's WAL position, for the replicas' lag.
func (rt *routing) pollPrimary(ctx context.Context) {
	rt.pollLoop(ctx, rt.primary, positionQuery, func(pos int64, now time.Time) {
		p := userapi.Position(pos)
		rt.head.Store(uint64(p))
		rt.smu.Lock()
		if n := len(rt.samples); n > 0 && rt.samples[n-1].pos >= p {
			rt.samples[n-1].last = now
		} else {
			rt.samples = append(rt.samples, sample{pos: p, first: now, last: now})
		}
		// Keep a minute: a replica further behind reads as a minute.
		k := 0
		for k < len(rt.samples)-1 && now.Sub(rt.samples[k].last) > time.Minute {
			k++
		}
		rt.samples = rt.samples[k:]
		rt.smu.Unlock()
	})
}

// pollReplica follows r's replay position and lag.
func (rt *routing) pollReplica(ctx context.Context, r *replica) {
	rt.pollLoop(ctx, r.poll, replayQuery, func(pos int64, now time.Time) {
		p := userapi.Position(pos)
		r.replay.Store(uint64(p))
		r.seen.Store(now.UnixNano())
		r.lagBytes.Store(max(0, int64(rt.head.Load())-int64(p)))
		r.lagNanos.Store(int64(rt.lagOf(p, now)))
	})
}

// lagOf is how long ago the primary was last seen at or before pos: the
// replica has every commit until then, and may miss one made after. A
// replica at the primary's last sample is behind by that sample's age, so
// a primary no longer sampled (its poll failing) makes every replica
// lag more and more, never read as caught up; with no sample yet the lag
// is unknown, which no bound admits.
func (rt *routing) lagOf(pos userapi.Position, now time.Time) time.Duration {
	rt.smu.Lock()
	defer rt.smu.Unlock()
	// Samples ascend in position: find the first the replica lacks.
	i := sort.Search(len(rt.samples), func(i int) bool { return rt.samples[i].pos > pos })
	switch {
	case len(rt.samples) == 0:
		return lagUnknown
	case i == 0:
		return now.Sub(rt.samples[0].first)
	}
	return now.Sub(rt.samples[i-1].last)
}

// lagUnknown is the lag of a replica before the primary's first sample.
const lagUnknown = time.Duration(math.MaxInt64)

// floorAt is where the primary was at t: a replica that has not replayed
// this much is more than now−t behind. Read from the samples, so the bound
// holds for the server that answers a read, whatever the last poll of the
// replica said (a poll up to a bound old, or a pooler or load balancer
// that answers from another server). Before the first sample, or with no
// sample as old as t, it is the primary's oldest known position or, with
// none, beyond any replica's.
func (rt *routing) floorAt(t time.Time) userapi.Position {
	rt.smu.Lock()
	defer rt.smu.Unlock()
	if len(rt.samples) == 0 {
		return userapi.Position(math.MaxUint64)
	}
	// The last sample the primary had reached by t.
	i := sort.Search(len(rt.samples), func(i int) bool { return rt.samples[i].first.After(t) })
	if i == 0 {
		return rt.samples[0].pos
	}
	return rt.samples[i-1].pos
}

// pollLoop runs query on a connection of its own to cc every interval and
// hands the result to got, until ctx ends. A NULL result (a "replica" that
// is not in recovery) is not handed on.
func (rt *routing) pollLoop(ctx context.Context, cc *pgx.ConnConfig, query string, got func(int64, time.Time)) {
	var c *pgx.Conn
	defer func() {
		if c != nil {
			c.Close(context.Background())
		}
	}()
	t := time.NewTicker(rt.interval)
	defer t.Stop()
	for {
		err := func() error {
			qctx, cancel := context.WithTimeout(ctx, max(time.Second, rt.maxLag))
			defer cancel()
			if c == nil {
				var err error
				if c, err = pgx.ConnectConfig(qctx, cc); err != nil {
					return err
				}
			}
			var pos *int64
			if err := c.QueryRow(qctx, query, pgx.QueryExecModeSimpleProtocol).Scan(&pos); err != nil {
				c.Close(context.Background())
				c = nil
				return err
			}
			if pos == nil {
				return errors.New("not in recovery")
			}
			got(*pos, time.Now())
			return nil
		}()
		if err != nil && ctx.Err() == nil {
			rt.pollErrors.Add(1)
			select {
			case <-ctx.Done():
				return
			case <-time.After(pollBackoff):
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ReadsReplicas reports whether reads may be served by replicas
// (userapi.ReplicaReader).
func (s *Store) ReadsReplicas() bool { return s.rt != nil }

// routedUsers runs q (a read of users) on a replica that has replayed need,
// or on the primary.
func (s *Store) routedUsers(ctx context.Context, need userapi.Position, q string, args ...any) ([]*userapi.User, error) {
	rt := s.rt
	sess := userapi.SessionFrom(ctx)
	if sess != nil && sess.Primary {
		rt.fellBack(fallbackAsked)
		return s.primaryUsers(ctx, q, args...)
	}
	// What the primary had maxLag ago bounds every replica read, checked
	// by the read itself (replicaUsers), not only by the last poll.
	need = max(need, rt.floorAt(time.Now().Add(-rt.maxLag)))
	r, why := rt.pick(need)
	if r == nil {
		rt.fellBack(why)
		return s.primaryUsers(ctx, q, args...)
	}
	users, ok, err := s.replicaUsers(ctx, r, need, q, args...)
	switch {
	case err != nil && ctx.Err() != nil:
		return nil, err
	case err != nil:
		// Not picked again until its poll answers: a replica that
		// failed one read (down, or hung past the read's timeout) is
		// likely to fail the next.
		r.seen.Store(0)
		rt.fellBack(fallbackFailed)
		return s.primaryUsers(ctx, q, args...)
	case !ok:
		rt.fellBack(fallbackBehind)
		return s.primaryUsers(ctx, q, args...)
	}
	r.reads.Add(1)
	if sess != nil {
		sess.Replica = true
	}
	return users, nil
}

// primaryUsers runs q on the primary.
func (s *Store) primaryUsers(ctx context.Context, q string, args ...any) ([]*userapi.User, error) {
	var users []*userapi.User
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		rows, err := c.Query(ctx, q, args...)
		if err != nil {
			return err
		}
		users, err = collectUsers(rows)
		return err
	})
	return users, err
}

// replicaUsers runs q on r, after checking in the same round trip, and
// before the query's snapshot is taken, that r has replayed need. ok is
// false when it has not.
func (s *Store) replicaUsers(ctx context.Context, r *replica, need userapi.Position, q string, args ...any) (users []*userapi.User, ok bool, err error) {
	// Half the call's budget at most: the primary's read after a replica
	// that failed keeps the other half.
	ctx, cancel := s.callContext(ctx, min(s.queryTimeout/2, s.rt.maxLag))
	defer cancel()
	pc, err := r.pool.Acquire(ctx)
	if err != nil {
		return nil, false, err
	}
	defer pc.Release()
	var b pgx.Batch
	b.Queue(replayQuery)
	b.Queue(q, args...)
	br := pc.SendBatch(ctx, &b)
	defer br.Close()
	var replay *int64
	if err := br.QueryRow().Scan(&replay); err != nil {
		return nil, false, err
	}
	if replay == nil || userapi.Position(*replay) < need {
		return nil, false, br.Close()
	}
	for {
		old := r.replay.Load()
		if uint64(*replay) <= old || r.replay.CompareAndSwap(old, uint64(*replay)) {
			break
		}
	}
	rows, err := br.Query()
	if err != nil {
		return nil, false, err
	}
	if users, err = collectUsers(rows); err != nil {
		return nil, false, err
	}
	return users, true, br.Close()
}

// writeRow runs q, a write returning at most one row, and hands the row to
// scan (pgx.ErrNoRows when there is none). With replicas it also returns
// the position a read must reach to see the write (sendCommit). Without
// replicas it is the statement alone.
func (s *Store) writeRow(ctx context.Context, c *pgx.Conn, scan func(pgx.Row) error, q string, args ...any) (userapi.Position, error) {
	if s.rt == nil {
		return 0, scan(c.QueryRow(ctx, q, args...))
	}
	br, err := sendCommit(ctx, c, q, args...)
	if err != nil {
		return 0, err
	}
	defer br.Close()
	if err := scan(br.QueryRow()); err != nil {
		return 0, err
	}
	return s.commitPosition(br)
}

// writeExec is writeRow for a statement that returns no rows: it returns
// the rows affected.
func (s *Store) writeExec(ctx context.Context, c *pgx.Conn, q string, args ...any) (int64, userapi.Position, error) {
	if s.rt == nil {
		tag, err := c.Exec(ctx, q, args...)
		return tag.RowsAffected(), 0, err
	}
	br, err := sendCommit(ctx, c, q, args...)
	if err != nil {
		return 0, 0, err
	}
	defer br.Close()
	tag, err := br.Exec()
	if err != nil {
		return 0, 0, err
	}
	pos, err := s.commitPosition(br)
	return tag.RowsAffected(), pos, err
}

// sendCommit sends the statement q in a transaction of its own, and the
// query of the primary's flush position after its commit, in one pipeline
// (one round trip), and reads the BEGIN's result: the next results are q's,
// the COMMIT's and the position's (commitPosition). Synchronous commit
// means the commit record is flushed when COMMIT returns, so the position
// read after it is at or past the commit. The explicit BEGIN turns the
// pipeline's implicit transaction into a regular block that COMMIT ends; a
// COMMIT without it ends the implicit one too, but PostgreSQL logs a
// WARNING ("there is no transaction in progress") for it. When q fails the
// server skips the rest, and the block stays open, failed, until a
// ROLLBACK: Close sends it, so the connection goes back to the pool
// usable (the pool would otherwise close it).
func sendCommit(ctx context.Context, c *pgx.Conn, q string, args ...any) (pgx.BatchResults, error) {
	var b pgx.Batch
	b.Queue("BEGIN")
	b.Queue(q, args...)
	b.Queue("COMMIT")
	b.Queue(positionQuery)
	br := ownTx{c.SendBatch(ctx, &b), ctx, c}
	if _, err := br.Exec(); err != nil {
		br.Close()
		return nil, err
	}
	return br, nil
}

// ownTx is sendCommit's results: Close ends a block that q's failure left
// open.
type ownTx struct {
	pgx.BatchResults
	ctx context.Context
	c   *pgx.Conn
}

func (t ownTx) Close() error {
	err := t.BatchResults.Close()
	if pc := t.c.PgConn(); !pc.IsClosed() && !pc.IsBusy() && pc.TxStatus() != 'I' {
		if _, rerr := t.c.Exec(t.ctx, "ROLLBACK"); err == nil {
			err = rerr
		}
	}
	return err
}

// commitPosition reads the results of the COMMIT and the position query
// of writeRow's pipeline.
func (s *Store) commitPosition(br pgx.BatchResults) (userapi.Position, error) {
	if _, err := br.Exec(); err != nil {
		return 0, err
	}
	var pos int64
	if err := br.QueryRow().Scan(&pos); err != nil {
		return 0, fmt.Errorf("read commit position: %w", err)
	}
	return userapi.Position(pos), br.Close()
}

// acked records a write of id, committed at pos, as acknowledged: for the
// routing of later reads, and as the session's token. Without replicas it
// does nothing.
func (s *Store) acked(ctx context.Context, id int64, pos userapi.Position) {
	if s.rt == nil {
		return
	}
	s.rt.acked(id, pos)
	if sess := userapi.SessionFrom(ctx); sess != nil {
		sess.Wrote = max(sess.Wrote, pos)
	}
}

// committed reads the primary's position on c after a write of id that
// committed earlier (a replayed create), and records it as acked does.
func (s *Store) committed(ctx context.Context, c *pgx.Conn, id int64) error {
	if s.rt == nil {
		return nil
	}
	var pos int64
	if err := c.QueryRow(ctx, positionQuery).Scan(&pos); err != nil {
		return fmt.Errorf("read commit position: %w", err)
	}
	s.acked(ctx, id, userapi.Position(pos))
	return nil
}
