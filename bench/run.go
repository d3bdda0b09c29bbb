package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"userapi/internal/pace"

	"github.com/valyala/fasthttp"
)

// outcome is how one request ended.
type outcome uint8

const (
	outOK        outcome = iota // the expected status
	outConflict                 // 412 on an update: another writer won the race, expected under concurrency
	outHTTPError                // any other status
	outTimeout                  // no answer within Config.Timeout
	outConnError                // connection refused, reset or closed
	outOtherError
)

// recordsLatency reports whether the request's waiting time goes into the
// latency histograms: every answered request and every timeout (the waiting
// is the point), but not a refused or reset connection, whose near-zero time
// would flatter the percentiles.
func (o outcome) recordsLatency() bool { return o != outConnError && o != outOtherError }

func (o outcome) isError() bool { return o >= outHTTPError }

// sample is one finished request. Times are nanoseconds since the start of
// the run; start is the intended send time in the open loop (and the actual
// one in the closed loop), so done-start is the latency a user would see.
type sample struct {
	start  int64
	sent   int64
	done   int64
	status uint16
	op     Op
	out    outcome
}

// sender owns one keep-alive connection, its request and response (reused
// for every request, so the loop allocates nothing), and the buffer of
// samples the collector drains once a second.
//
// It speaks HTTP/1.1 through fasthttp's Request.Write and
// Response.ReadLimitBody on a connection of its own rather than through
// fasthttp.HostClient. A sender is the only user of its connection, so the
// client's pool, its lock, its buffer pools and its two clock reads per
// request buy nothing here, and on the 2-core machine they cost about 0.7 µs
// of the generator's ~6 µs of CPU per request (measured with getrusage
// against bench/cmd/fixedserver) — CPU taken from the server under test.
type sender struct {
	id   int
	req  fasthttp.Request
	resp fasthttp.Response
	pick *picker
	wl   *Workload

	addr    string
	host    []byte // Host header
	tlsConf *tls.Config
	dialer  *net.Dialer
	br      *bufio.Reader
	bw      *bufio.Writer

	prefix  []byte   // path prefix of the base URL, pre-built once
	headers []Header // Config.Headers
	uri     []byte   // scratch for the request URI
	body    []byte   // scratch for request bodies
	curID   int64    // id of the read in flight, to remember its ETag
	etagID  int64    // id whose ETag is held for the next update; 0 = none
	etag    []byte
	cursor  []byte // next_cursor of the last list page; empty = first page
	seq     uint64 // numbers created emails and patched names
	runTag  string
	// needETag is set when the mix has updates: only then do reads keep ETags.
	needETag bool

	// The timeout watchdog's view of the sender (see expire).
	inflight atomic.Int64 // send time of the request in flight + 1, 0 when idle
	expired  atomic.Bool
	wmu      sync.Mutex
	conn     net.Conn // written by the sender under wmu; nil when not connected

	// pacer waits for intended send times; open loop only.
	pacer *pace.Pacer

	mu  sync.Mutex
	buf []sample // guarded by mu; swapped out by the collector
}

// maxResponseBody bounds a response body: a list page of 1000 users is about
// 150 KiB, anything far above is a misbehaving server, not a result.
const maxResponseBody = 16 << 20

// userAgent names the generator in server logs.
const userAgent = "userapi-bench"

// Content types of the bodies sent. PATCH is a JSON merge patch (RFC 7396).
const (
	contentTypeJSON       = "application/json"
	contentTypeMergePatch = "application/merge-patch+json"
)

// prepare fills s.req for op and returns the operation actually prepared: an
// update with no ETag in hand becomes the read that fetches one, so updates
// always carry If-Match from an earlier read, like a real read-modify-write.
func (s *sender) prepare(op Op) Op {
	req := &s.req
	req.Reset()
	if op == OpUpdate && s.etagID == 0 {
		op = OpRead
	}
	req.Header.SetHostBytes(s.host)
	req.Header.SetUserAgent(userAgent)
	for _, h := range s.headers {
		req.Header.Set(h.Name, h.Value)
	}
	s.uri = append(s.uri[:0], s.prefix...)
	switch op {
	case OpRead:
		s.curID = s.pick.id()
		s.uri = append(s.uri, "/users/"...)
		s.uri = strconv.AppendInt(s.uri, s.curID, 10)
	case OpList:
		s.uri = append(s.uri, "/users?limit="...)
		s.uri = strconv.AppendInt(s.uri, int64(s.wl.ListLimit), 10)
		if len(s.cursor) > 0 {
			s.uri = append(s.uri, "&cursor="...)
			s.uri = fasthttp.AppendQuotedArg(s.uri, s.cursor)
		}
	case OpUpdate:
		s.seq++
		s.uri = append(s.uri, "/users/"...)
		s.uri = strconv.AppendInt(s.uri, s.etagID, 10)
		req.Header.SetMethod(fasthttp.MethodPatch)
		req.Header.SetContentType(contentTypeMergePatch)
		req.Header.SetBytesV("If-Match", s.etag)
		s.body = append(s.body[:0], `{"name":"Bench `...)
		s.body = strconv.AppendInt(s.body, int64(s.id), 10)
		s.body = append(s.body, '.')
		s.body = strconv.AppendUint(s.body, s.seq, 10)
		s.body = append(s.body, `"}`...)
		req.SetBodyRaw(s.body)
	case OpCreate:
		s.seq++
		s.uri = append(s.uri, "/users"...)
		req.Header.SetMethod(fasthttp.MethodPost)
		req.Header.SetContentType(contentTypeJSON)
		s.body = append(s.body[:0], `{"email":"bench-`...)
		s.body = append(s.body, s.runTag...)
		s.body = append(s.body, '-')
		s.body = strconv.AppendInt(s.body, int64(s.id), 10)
		s.body = append(s.body, '-')
		s.body = strconv.AppendUint(s.body, s.seq, 10)
		s.body = append(s.body, `@example.com","name":"Bench user"}`...)
		req.SetBodyRaw(s.body)
	}
	req.SetRequestURIBytes(s.uri)
	return op
}

// expected reports the outcome of a status for op.
func expected(op Op, status int) outcome {
	switch {
	case op == OpCreate && status == fasthttp.StatusCreated:
		return outOK
	case op != OpCreate && status == fasthttp.StatusOK:
		return outOK
	case op == OpUpdate && status == fasthttp.StatusPreconditionFailed:
		return outConflict
	}
	return outHTTPError
}

// observe keeps what later requests need from a response: a read's ETag for
// the next update, a list page's cursor for the next page.
func (s *sender) observe(op Op, status int) {
	switch op {
	case OpRead:
		if s.needETag && status == fasthttp.StatusOK {
			s.etag = append(s.etag[:0], s.resp.Header.Peek(fasthttp.HeaderETag)...)
			s.etagID = 0
			if len(s.etag) > 0 {
				s.etagID = s.curID
			}
		}
	case OpList:
		s.cursor = s.cursor[:0]
		if status == fasthttp.StatusOK {
			s.cursor = nextCursor(s.cursor, s.resp.Body())
		}
	case OpUpdate:
		s.etagID = 0 // one update per read: the next one reads again
	}
}

// nextCursor appends the "next_cursor" string of a list page to dst, or
// nothing when it is null or absent (the walk starts over from the first
// page). The cursor is opaque; a JSON escape in it is taken literally, as
// cursors are URL-safe tokens.
func nextCursor(dst, body []byte) []byte {
	key := []byte(`"next_cursor"`)
	i := bytes.LastIndex(body, key)
	if i < 0 {
		return dst
	}
	rest := bytes.TrimLeft(body[i+len(key):], " \t\r\n")
	if len(rest) == 0 || rest[0] != ':' {
		return dst
	}
	rest = bytes.TrimLeft(rest[1:], " \t\r\n")
	if len(rest) == 0 || rest[0] != '"' {
		return dst // null
	}
	end := bytes.IndexByte(rest[1:], '"')
	if end < 0 {
		return dst
	}
	return append(dst, rest[1:1+end]...)
}

// classify maps a transport error to an outcome.
func classify(err error) outcome {
	var ne net.Error
	switch {
	case errors.Is(err, fasthttp.ErrTimeout), errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return outTimeout
	case errors.Is(err, fasthttp.ErrConnectionClosed), errors.Is(err, fasthttp.ErrDialTimeout),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return outConnError
	}
	var oe *net.OpError
	if errors.As(err, &oe) {
		return outConnError
	}
	return outOtherError
}

// do sends one request and returns its sample. start is the time the
// latency counts from (intended or actual send time), sent the actual send
// time; both are ns since t0.
func (s *sender) do(op Op, start, sent int64, t0 time.Time) sample {
	op = s.prepare(op)
	s.inflight.Store(sent + 1)
	err := s.roundTrip()
	done := int64(time.Since(t0))
	s.inflight.Store(0)
	expired := s.expired.Load() && s.settleExpiry(err == nil)
	smp := sample{start: start, sent: sent, done: done, op: op}
	if err != nil {
		smp.out = classify(err)
		if expired {
			smp.out = outTimeout
		}
		if op == OpList {
			s.cursor = s.cursor[:0]
		}
		return smp
	}
	status := s.resp.StatusCode()
	smp.status = uint16(status)
	smp.out = expected(op, status)
	s.observe(op, status)
	return smp
}

// roundTrip writes s.req and reads s.resp on the sender's connection,
// dialing it first if needed. After any error, and after a response that
// closes the connection, the connection is dropped and the next request
// dials again. Nothing is retried: a failure is a measured error.
func (s *sender) roundTrip() error {
	if s.conn == nil {
		if err := s.connect(); err != nil {
			return err
		}
	}
	err := s.req.Write(s.bw)
	if err == nil {
		err = s.bw.Flush()
	}
	if err == nil {
		err = s.resp.ReadLimitBody(s.br, maxResponseBody)
	}
	if err != nil || s.resp.ConnectionClose() {
		s.disconnect()
	}
	return err
}

func (s *sender) connect() error {
	c, err := s.dialer.Dial("tcp", s.addr)
	if err != nil {
		return err
	}
	if s.tlsConf != nil {
		c = tls.Client(c, s.tlsConf)
	}
	s.br.Reset(c)
	s.bw.Reset(c)
	s.wmu.Lock()
	s.conn = c
	s.wmu.Unlock()
	return nil
}

func (s *sender) disconnect() {
	s.wmu.Lock()
	c := s.conn
	s.conn = nil
	s.wmu.Unlock()
	if c != nil {
		_ = c.Close()
	}
}

// Request timeouts are enforced by a watchdog rather than by a deadline on
// every read and write: per-request deadlines cost two clock reads and two
// runtime timer updates per request, a measurable share of the generator's
// CPU, which on a shared machine is taken from the server under test.
// The watchdog (run.watch, every watchPeriod) finds a request in flight for
// longer than the timeout and sets a deadline in the past on its connection,
// which fails the blocked read or write at once; the sender then drops the
// connection and the next request dials a new one.
//
// wmu orders the watchdog's expiry against the sender's check after the
// request, so a request that completed just before the expiry clears the
// stale deadline instead of leaving it to fail the next request.

// watchPeriod is the watchdog's resolution: timeouts fire up to this much
// late, which is noise against timeouts of seconds.
const watchPeriod = 100 * time.Millisecond

// expire fails the request in flight if it started before cutoff (ns since
// t0); with force it fails any request in flight (the run is stopping).
func (s *sender) expire(cutoff int64, force bool) {
	since := s.inflight.Load()
	if since == 0 || (!force && since-1 >= cutoff) {
		return
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.expired.Store(true)
	if s.inflight.Load() != since || s.conn == nil {
		s.expired.Store(false) // it finished meanwhile
		return
	}
	_ = s.conn.SetDeadline(time.Unix(1, 0)) // long past: fails the blocked call now
}

// settleExpiry runs after a request when the watchdog may have expired it.
// It reports whether it did; if the request succeeded anyway the
// connection's deadline is cleared so it stays usable.
func (s *sender) settleExpiry(ok bool) bool {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if !s.expired.Load() {
		return false
	}
	s.expired.Store(false)
	if ok && s.conn != nil {
		_ = s.conn.SetDeadline(time.Time{})
	}
	return true
}

func (s *sender) record(smp sample) {
	s.mu.Lock()
	s.buf = append(s.buf, smp)
	s.mu.Unlock()
}

// drain returns the samples collected so far and gives the sender spare (an
// emptied buffer) to fill next, so neither side allocates in steady state.
func (s *sender) drain(spare []sample) []sample {
	s.mu.Lock()
	full := s.buf
	s.buf = spare[:0]
	s.mu.Unlock()
	return full
}

// run is the shared state of one benchmark run.
type run struct {
	cfg  Config
	t0   time.Time
	warm int64 // end of the warm-up, ns since t0
	end  int64 // no request is started (closed) or scheduled (open) at or after it

	// Open loop: request k is intended at t0 + k*interval.
	interval  float64
	maxTicket int64 // tickets beyond it are not scheduled (count bound)
	hardStop  int64 // senders give up on late tickets after it
	ticket    atomic.Int64

	measured atomic.Int64 // closed loop with --requests: measured requests started
	stop     atomic.Bool  // set when ctx is done
}

// connErrorPause slows a closed-loop sender down after a refused or reset
// connection, so a server that is down is not hammered with connects in a
// tight loop (the errors are still counted).
const connErrorPause = 10 * time.Millisecond

func (r *run) closedLoop(s *sender) {
	for !r.stop.Load() {
		now := int64(time.Since(r.t0))
		if now >= r.end {
			return
		}
		if now >= r.warm && r.cfg.Requests > 0 && r.measured.Add(1) > r.cfg.Requests {
			return
		}
		smp := s.do(s.pick.op(), now, now, r.t0)
		if r.stop.Load() && smp.out != outOK {
			return // aborted by the stop, not a result
		}
		s.record(smp)
		if smp.out == outConnError {
			time.Sleep(connErrorPause)
		}
	}
}

// openLoop sends the tickets of the schedule this sender draws, each at its
// intended time. A sender draws a ticket only when it is free, so a ticket
// waits for a connection only when all are busy, and that queueing counts as
// latency. An early sender waits on its pacer, which wakes it within tens of
// microseconds of the intended time (see pace.go); the difference between
// the actual send and the intended time is kept as the schedule lag.
func (r *run) openLoop(s *sender) {
	for !r.stop.Load() {
		k := r.ticket.Add(1) - 1
		if k >= r.maxTicket {
			return
		}
		intended := int64(float64(k) * r.interval)
		if intended >= r.end {
			return
		}
		if int64(time.Since(r.t0)) >= r.hardStop {
			return // the rest of the schedule is reported as unsent
		}
		if !s.pacer.WaitUntil(r.t0, intended) {
			return // stopped
		}
		smp := s.do(s.pick.op(), intended, int64(time.Since(r.t0)), r.t0)
		if r.stop.Load() && smp.out != outOK {
			return // aborted by the stop, not a result
		}
		s.record(smp)
	}
}

// newSenders builds cfg.Connections senders; they connect on first use.
func newSenders(cfg *Config) ([]*sender, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("bench: parse URL: %w", err)
	}
	addr := u.Host
	if u.Port() == "" {
		port := "80"
		if u.Scheme == "https" {
			port = "443"
		}
		addr = net.JoinHostPort(u.Hostname(), port)
	}
	runTag := strconv.FormatUint(rand.Uint64(), 36)

	// Connects are bounded by the request timeout; keep-alive probes are
	// off, as a connection idle long enough to need one is already timed
	// out by the watchdog.
	dialer := &net.Dialer{Timeout: cfg.Timeout, KeepAlive: -1}
	var tlsConf *tls.Config
	if u.Scheme == "https" {
		tlsConf = &tls.Config{ServerName: u.Hostname()}
	}
	prefix := strings.TrimRight(u.EscapedPath(), "/")
	senders := make([]*sender, cfg.Connections)
	for i := range senders {
		senders[i] = &sender{
			id:       i,
			pick:     newPicker(&cfg.Workload, cfg.Seed, uint64(i)),
			wl:       &cfg.Workload,
			addr:     addr,
			host:     []byte(u.Host),
			tlsConf:  tlsConf,
			dialer:   dialer,
			br:       bufio.NewReaderSize(nil, 8<<10),
			bw:       bufio.NewWriterSize(nil, 4<<10),
			prefix:   []byte(prefix),
			headers:  cfg.Headers,
			runTag:   runTag,
			needETag: cfg.Workload.Mix[OpUpdate] > 0,
		}
	}
	return senders, nil
}

// Run sends the load cfg describes and returns the results. Progress lines go
// to progress once a second (nil for none). It returns when the bound is
// reached or ctx is done; in the latter case the partial results are returned
// with Canceled set.
func Run(ctx context.Context, cfg Config, progress io.Writer) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	if cfg.Seed == 0 {
		// 53 bits: the seed is printed in the JSON, where larger integers
		// lose precision in JavaScript and other float64 readers.
		cfg.Seed = rand.Uint64()>>11 | 1
	}
	senders, err := newSenders(&cfg)
	if err != nil {
		return nil, err
	}

	r := &run{cfg: cfg, warm: int64(cfg.Warmup), end: math.MaxInt64, maxTicket: math.MaxInt64}
	if cfg.Duration > 0 {
		r.end = int64(cfg.Warmup + cfg.Duration)
	}
	if cfg.Mode() == OpenLoop {
		r.interval = float64(time.Second) / cfg.Rate
		warmTickets := int64(math.Ceil(float64(r.warm) / r.interval))
		if cfg.Requests > 0 {
			r.maxTicket = warmTickets + cfg.Requests
		}
		last := r.end
		if cfg.Requests > 0 {
			last = min(last, int64(float64(r.maxTicket)*r.interval))
		}
		// Late tickets are still sent (that is the queueing being
		// measured) until one timeout past the end of the schedule.
		r.hardStop = last + int64(cfg.Timeout)
	}

	if cfg.Mode() == OpenLoop {
		for _, s := range senders {
			if s.pacer, err = pace.New(); err != nil {
				closePacers(senders)
				return nil, fmt.Errorf("bench: %w", err)
			}
		}
		defer closePacers(senders)
	}

	col := newCollector(&cfg, progress)
	spares := make([][]sample, len(senders))

	r.t0 = time.Now()
	col.startedAt = r.t0
	var wg sync.WaitGroup
	for _, s := range senders {
		wg.Go(func() {
			if cfg.Mode() == OpenLoop {
				r.openLoop(s)
			} else {
				r.closedLoop(s)
			}
		})
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()

	drainAll := func() {
		for i, s := range senders {
			full := s.drain(spares[i])
			for _, smp := range full {
				col.add(smp)
			}
			spares[i] = full
		}
	}
	ticker := time.NewTicker(time.Second)
	watch := time.NewTicker(watchPeriod)
	canceled := false
loop:
	for {
		select {
		case <-ticker.C:
			drainAll()
			col.tick(int64(time.Since(r.t0)), false)
		case <-watch.C:
			cutoff := int64(time.Since(r.t0) - cfg.Timeout)
			for _, s := range senders {
				s.expire(cutoff, false)
			}
		case <-ctx.Done():
			canceled = true
			r.stop.Store(true)
			for _, s := range senders {
				if s.pacer != nil {
					s.pacer.Stop()
				}
			}
			// Fail what is in flight, and keep doing so for requests a
			// sender started just before it saw the stop.
			for {
				for _, s := range senders {
					s.expire(0, true)
				}
				select {
				case <-finished:
					break loop
				case <-watch.C:
				}
			}
		case <-finished:
			break loop
		}
	}
	ticker.Stop()
	watch.Stop()
	drainAll()
	col.tick(int64(time.Since(r.t0)), true)
	for _, s := range senders {
		s.disconnect()
	}

	res := col.result()
	res.Canceled = canceled
	if cfg.Mode() == OpenLoop && !canceled {
		res.Unsent = r.scheduledMeasured() - res.Total.Requests
		if res.Unsent < 0 {
			res.Unsent = 0
		}
		if res.Unsent > 0 {
			res.Total.Errors += res.Unsent
			res.Total.ErrorsByKind["unsent"] = res.Unsent
		}
	}
	return res, nil
}

func closePacers(senders []*sender) {
	for _, s := range senders {
		if s.pacer != nil {
			_ = s.pacer.Close()
		}
	}
}

// scheduledMeasured is the number of open-loop tickets intended at or after
// the warm-up and before the end.
func (r *run) scheduledMeasured() int64 {
	first := int64(math.Ceil(float64(r.warm) / r.interval))
	last := r.maxTicket // exclusive
	if r.end != math.MaxInt64 {
		last = min(last, int64(math.Ceil(float64(r.end)/r.interval)))
	}
	return max(0, last-first)
}
