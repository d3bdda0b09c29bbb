package cache

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"userapi"
	"userapi/internal/panics"
)

// loader turns misses of the local tier into reads: concurrent misses of
// one id share one call (coalescing), and calls queued while the workers are
// busy are answered together, by one Redis round trip and one
// store.GetUsers for what Redis does not hold (batching).
//
// There is no batching delay: a worker that is free takes the first queued
// call at once, yields so that handlers already runnable can queue theirs,
// and adds the calls that are then waiting, so an idle system loads a miss
// immediately, and under load a batch is whatever queued while the previous
// loads ran. A second load runs beside a first only with a batch worth it
// (minParallel), or when the first has run for maxGatherWait, which keeps
// the database busy during the other's round trip without splitting the
// batches into small ones. The in-flight table plays the role of
// x/sync/singleflight, but is also the batch queue's index, so a waiting
// caller costs no goroutine of its own.
type loader struct {
	loaderDeps
	maxBatch int

	mu       sync.Mutex
	inflight map[int64]*call

	queue  chan *call
	taking sync.Mutex    // held by the one worker forming a batch (see take)
	busy   atomic.Int32  // loads running
	freed  chan struct{} // a token after each load (capacity 1, never blocks)
	// gatherWait bounds how long a batch under minParallel waits for a
	// running load to finish (see take).
	gatherWait time.Duration
	done       chan struct{} // closed by stop
	workers    sync.WaitGroup
}

// call is one id's load, shared by every caller that asked for the id while
// it was in flight.
type call struct {
	id   int64
	done chan struct{} // closed when the result is set

	user *userapi.User // result: the row, or
	enc  userapi.Encoded
	err  error // ErrNotFound, or the load's error

	// With replicas only. need is the highest session position of the
	// callers (set under loader.mu until taken); taken is set, under
	// loader.mu, when a worker has taken the call into a batch, after which
	// a caller needing more does not join it. guard is the tombstone or
	// intent the batch's Redis lookup found for the id; checked is set when
	// that lookup answered for the id (not skipped, not failed).
	need    userapi.Position
	taken   bool
	guard   *entry
	checked bool
}

// queueLen bounds the calls waiting for a worker. Calls beyond it wait in
// load (bounded by their context) rather than grow memory without limit.
const queueLen = 16384

// loaderDeps are what a loader is handed by the cache it serves: it knows
// how to coalesce and batch misses, and leaves answering a batch to
// resolve.
type loaderDeps struct {
	ctx       context.Context // ends at Close: the workers' lifetime
	log       *slog.Logger
	admit     func(context.Context) (func(), error) // Config.Admit; nil admits every load
	coalesced prometheus.Counter                    // callers that joined a load in flight
	// resolve answers a batch (Store.resolve): it sets every call's
	// result, hands the calls it can answer before the database to early,
	// and returns; the loader wakes the callers of the rest.
	resolve func(batch []*call, buf *batchBuf, early func(answered, rest []*call))
	// replicas: the store may answer from a replica (cache/replica.go),
	// so calls carry their callers' session positions and are marked when
	// taken into a batch.
	replicas bool
}

// batchBuf is a worker's scratch space, reused for every batch it runs.
type batchBuf struct {
	hits, rest []*call
	ids        []int64
}

func newLoader(deps loaderDeps, workers, maxBatch int) *loader {
	l := &loader{
		loaderDeps: deps,
		maxBatch:   maxBatch,
		inflight:   make(map[int64]*call),
		queue:      make(chan *call, queueLen),
		freed:      make(chan struct{}, 1),
		gatherWait: maxGatherWait,
		done:       make(chan struct{}),
	}
	for range workers {
		l.workers.Go(panics.Loop(deps.ctx, deps.log, "cache_loader", l.work))
	}
	return l
}

// load returns the finished call for id, joining one in flight if there is
// one. It fails only when Config.Admit refuses the read, with ctx's end
// (wrapped as ErrUnavailable, since the database did not answer in time) or
// after stop; the load's own outcome is in the call.
func (l *loader) load(ctx context.Context, id int64) (*call, error) {
	if admit := l.admit; admit != nil {
		done, err := admit(ctx)
		if err != nil {
			return nil, fmt.Errorf("get user %d: %w", id, err)
		}
		defer done()
	}
	var need userapi.Position
	if l.replicas {
		if sess := userapi.SessionFrom(ctx); sess != nil {
			need = sess.After
		}
	}
	l.mu.Lock()
	c, joined := l.inflight[id]
	if joined && need > c.need {
		if c.taken {
			// Its read may already be under way on a replica that has
			// not replayed what this caller needs.
			joined = false
		} else {
			c.need = need
		}
	}
	if !joined {
		c = &call{id: id, done: make(chan struct{}), need: need}
		l.inflight[id] = c
	}
	l.mu.Unlock()
	if joined {
		l.coalesced.Inc()
	} else {
		select {
		case l.queue <- c:
			// Closed meanwhile: the workers may have drained the queue
			// before c arrived, so drain it here rather than leave c
			// waiting out its deadline with its id held in inflight.
			select {
			case <-l.done:
				l.drain()
			default:
			}
		case <-l.done:
			l.finish([]*call{c}, errClosed)
		case <-ctx.Done():
			// Others may have joined c: they get the same error, which
			// is as true for them (the database is overloaded).
			l.finish([]*call{c}, fmt.Errorf("%w: load queue full: %w", userapi.ErrUnavailable, ctx.Err()))
		}
	}
	select {
	case <-c.done:
		return c, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("get user %d: %w: %w", id, userapi.ErrUnavailable, ctx.Err())
	}
}

var errClosed = fmt.Errorf("%w: cache closed", userapi.ErrUnavailable)

// forget detaches id's call in flight, if any, so that a read that starts
// after a write does not join a load that may have read the row before it.
// The detached call still completes for the callers it has.
func (l *loader) forget(id int64) {
	l.mu.Lock()
	delete(l.inflight, id)
	l.mu.Unlock()
}

// minParallel is the fewest ids a load starts with while another load is
// running. A multi-key query costs the database and this process much the
// same for 1 id as for 16, so a second load in parallel pays off only for a
// batch of some size; smaller ones wait for the running load to finish, as
// they would with one loader.
const minParallel = 16

// maxGatherWait is the longest a batch under minParallel waits for a running
// load. Loads take well under a millisecond when the database is healthy; a
// stalled one (a lock wait, a slow connection) must not hold up the misses
// behind it for the whole load timeout.
const maxGatherWait = 5 * time.Millisecond

// work takes batches (see take) and has each answered (resolve).
func (l *loader) work() {
	batch := make([]*call, 0, l.maxBatch)
	buf := &batchBuf{
		hits: make([]*call, 0, l.maxBatch),
		rest: make([]*call, 0, l.maxBatch),
		ids:  make([]int64, 0, l.maxBatch),
	}
	for {
		batch = l.take(batch[:0])
		if batch == nil {
			return
		}
		l.run(batch, buf)
	}
}

// run has one batch answered and wakes its callers: those resolve answered
// early at once, the rest when it returns. A panic on the way (in the
// store, in encoding, in a fill) is recovered as the error of every call
// not yet answered, so they are answered at once and the worker goes on
// with the next batch.
func (l *loader) run(batch []*call, buf *batchBuf) {
	pending := batch // the calls not yet answered
	var panicked error
	defer func() {
		if panicked != nil {
			setResults(pending, nil, panicked)
		}
		l.busy.Add(-1)
		select {
		case l.freed <- struct{}{}:
		default: // a token is already there
		}
		l.complete(pending)
	}()
	defer panics.Recover(l.log, "cache_loader", &panicked)
	l.resolve(batch, buf, func(answered, rest []*call) {
		pending = rest
		l.complete(answered)
	})
}

// take returns the next batch, appended to batch, and counts its load as
// running: the first queued call, then the calls already waiting, up to
// maxBatch. While another load runs and the batch is under minParallel, it
// goes on gathering until the batch reaches it, no load runs, or
// gatherWait has passed. It returns nil after stop.
//
// One worker forms a batch at a time, so workers waiting for a running load
// do not split the queue between them, and a worker whose load just
// finished does not overtake the one already gathering. With nothing
// running, a batch goes at once: there is no timer on the idle path.
func (l *loader) take(batch []*call) []*call {
	l.taking.Lock()
	defer l.taking.Unlock()
	select {
	case c := <-l.queue:
		batch = append(batch, c)
	case <-l.done:
		l.drain()
		return nil
	}
	// Let the handlers that are already runnable queue their misses first:
	// without this, the first miss after a batch completes goes alone, and
	// the rest wait a whole query for the next batch. Idle, nothing else
	// is runnable and this returns at once.
	runtime.Gosched()
fill:
	for len(batch) < l.maxBatch {
		select {
		case c := <-l.queue:
			batch = append(batch, c)
		default:
			break fill
		}
	}
	if len(batch) < min(minParallel, l.maxBatch) && l.busy.Load() > 0 {
		wait := time.NewTimer(l.gatherWait)
		defer wait.Stop()
	gather:
		for len(batch) < min(minParallel, l.maxBatch) && l.busy.Load() > 0 {
			select {
			case c := <-l.queue:
				batch = append(batch, c)
			case <-l.freed: // a load finished (or an old token): check again
			case <-wait.C:
				break gather
			case <-l.done:
				l.finish(batch, errClosed)
				l.drain()
				return nil
			}
		}
	}
	if l.replicas {
		l.mu.Lock()
		for _, c := range batch {
			c.taken = true
		}
		l.mu.Unlock()
	}
	l.busy.Add(1)
	return batch
}

// finish ends calls with err.
func (l *loader) finish(batch []*call, err error) {
	setResults(batch, nil, err)
	l.complete(batch)
}

// setResults sets each call's result from users (ids not among them are
// absent) or err, and returns the results for filling the tiers.
func setResults(batch []*call, users []*userapi.User, err error) []loaded {
	var rows []loaded
	if err == nil {
		byID := make(map[int64]*userapi.User, len(users))
		for _, u := range users {
			byID[u.ID] = u
		}
		rows = make([]loaded, 0, len(batch))
		for _, c := range batch {
			if u, ok := byID[c.id]; ok {
				c.user, c.enc = u, u.Encode()
				rows = append(rows, loaded{id: c.id, enc: &c.enc})
			} else {
				c.err = userapi.ErrNotFound
				rows = append(rows, loaded{id: c.id})
			}
		}
	} else {
		for _, c := range batch {
			c.err = err
		}
	}
	return rows
}

// complete removes the calls from the in-flight table and wakes their
// callers.
func (l *loader) complete(batch []*call) {
	l.mu.Lock()
	for _, c := range batch {
		if l.inflight[c.id] == c {
			delete(l.inflight, c.id)
		}
	}
	l.mu.Unlock()
	for _, c := range batch {
		close(c.done)
	}
}

// drain fails the calls still queued at stop.
func (l *loader) drain() {
	for {
		select {
		case c := <-l.queue:
			l.finish([]*call{c}, errClosed)
		default:
			return
		}
	}
}

// stop ends the workers; calls still queued fail with an ErrUnavailable.
func (l *loader) stop() {
	close(l.done)
	l.workers.Wait()
}
