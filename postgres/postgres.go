// Package postgres is the PostgreSQL users store: userapi.Store on a pgx
// connection pool, with embedded goose migrations and a COPY-based seeder.
//
// Every query goes through pgx's per-connection statement cache (the default
// QueryExecModeCacheStatement), so a hot read is one Bind/Execute round trip on
// an already prepared statement. Driver errors are translated here, at the
// store boundary, into the userapi error vocabulary.
package postgres

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"userapi"
)

var (
	_ userapi.Store  = (*Store)(nil)
	_ userapi.Seeder = (*Store)(nil)

	_ userapi.ReplicaReader = (*Store)(nil)
)

//go:embed migrations/*.sql
var migrations embed.FS

// DefaultQueryTimeout bounds every call when Options.QueryTimeout is 0: long
// enough for a query that waited behind a loaded pool, short enough that a
// dead database turns into a 503 well before the HTTP request deadline.
const DefaultQueryTimeout = 2 * time.Second

// DefaultMaxConns is the pool size when Options.MaxConns is 0:
// 4×GOMAXPROCS, at least 4 (8 on the 2-core service machine). A point read
// on loopback spends most of its time in round trips and scheduling, not in
// PostgreSQL's CPU, so a few connections per core keep the server busy while
// the others wait on the network; many more only add context switches and
// per-backend memory on a database sharing the same cores. Several instances
// behind a load balancer (3×8) stay far below max_connections (100).
func DefaultMaxConns() int {
	return max(4, 4*runtime.GOMAXPROCS(0))
}

// Options configure a Store. Zero values select the defaults.
type Options struct {
	// MaxConns is the pool size; 0 means DefaultMaxConns(). It overrides
	// pool_max_conns in the URL.
	MaxConns int
	// MinConns is the number of connections the pool keeps open even when
	// idle (default 0: connections are opened on demand and kept for reuse).
	MinConns int
	// AcquireTimeout bounds the wait for a pooled connection, after which the
	// call fails with ErrUnavailable. By default (0) the wait shares the
	// call's QueryTimeout: a saturated pool then answers 503 within that
	// deadline, and the hot path arms a single timer per call. A shorter value
	// sheds load sooner at the cost of a second context and timer per call.
	AcquireTimeout time.Duration
	// QueryTimeout is the deadline of every call (including the wait for a
	// connection); 0 means DefaultQueryTimeout. It is also the connect
	// timeout unless the URL sets connect_timeout. SeedUsers is exempt.
	QueryTimeout time.Duration
	// NoPool opens a new connection for every call and closes it afterwards:
	// the "connection per request" baseline of the benchmark ladder, not a
	// mode for production.
	NoPool bool
	// Migrate applies pending migrations in Open instead of refusing a stale
	// schema.
	Migrate bool
	// ChangeSlot names the replication slot and the publication of the
	// change stream (FollowChanges); empty means "userapi_" and the
	// database's name. Instances that share a database share it.
	ChangeSlot string
	// DirectURL is the database server's own address when the URL given to
	// Open goes through a transaction-pooling proxy such as PgBouncer. The
	// two things such a proxy cannot carry use it: migrations, which hold a
	// session advisory lock, and the change stream's replication
	// connection. Empty means the URL itself. With a DirectURL, queries
	// use pgx's cache_describe mode (no named prepared statements, which a
	// transaction pooler cannot keep) unless the URL's
	// default_query_exec_mode chooses another.
	DirectURL string
	// Replicas are the URLs of streaming replicas of the database. With
	// any, GetUsers and ListUsers may be served by one that has replayed
	// every write they must reflect (see replica.go); writes, GetUser and
	// the idempotency lookups stay on the primary, and every write reads
	// its commit position (one more statement on its connection).
	Replicas []string
	// ReplicaMaxLag is how far behind the primary (in time) a replica may
	// be and still serve reads; 0 means DefaultReplicaMaxLag. Per-row
	// read-your-writes requirements are kept for this long too.
	ReplicaMaxLag time.Duration
	// ReplicaPoll is how often the replicas' replay positions are read;
	// 0 means DefaultReplicaPoll.
	ReplicaPoll time.Duration
}

// Store is the PostgreSQL users store. It is safe for concurrent use.
type Store struct {
	pool           *pgxpool.Pool   // nil in NoPool mode
	connConfig     *pgx.ConnConfig // NoPool mode: the config of every new connection
	acquireTimeout time.Duration
	queryTimeout   time.Duration
	schemaVersion  int64 // the newest embedded migration

	changeSlot string                 // Options.ChangeSlot
	direct     *pgconn.Config         // the server itself, for the change stream (Options.DirectURL)
	followed   atomic.Pointer[string] // the slot FollowChanges reads, for the lag metric

	rt *routing // nil without replicas
}

// Open connects to the database at url (postgres://user@host:5432/db?...).
// It fails with an error wrapping userapi.ErrStaleSchema when migrations are
// pending (unless opts.Migrate applies them first), and with one wrapping
// userapi.ErrUnavailable when the database cannot be reached.
func Open(ctx context.Context, url string, opts Options) (*Store, error) {
	if opts.MaxConns <= 0 {
		opts.MaxConns = DefaultMaxConns()
	}
	if opts.QueryTimeout <= 0 {
		opts.QueryTimeout = DefaultQueryTimeout
	}
	if opts.AcquireTimeout <= 0 || opts.AcquireTimeout > opts.QueryTimeout {
		opts.AcquireTimeout = opts.QueryTimeout
	}
	if len(opts.Replicas) > 0 && opts.NoPool {
		return nil, errors.New("open postgres: replicas need the connection pool")
	}
	if opts.ReplicaMaxLag <= 0 {
		opts.ReplicaMaxLag = DefaultReplicaMaxLag
	}
	if opts.ReplicaPoll <= 0 {
		opts.ReplicaPoll = DefaultReplicaPoll
	}
	if opts.MinConns > opts.MaxConns {
		return nil, fmt.Errorf("open postgres: MinConns %d is more than MaxConns %d", opts.MinConns, opts.MaxConns)
	}

	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("open postgres: %w", err)
	}
	cc := cfg.ConnConfig
	if cc.ConnectTimeout == 0 {
		cc.ConnectTimeout = opts.QueryTimeout
	}
	if _, ok := cc.RuntimeParams["application_name"]; !ok {
		cc.RuntimeParams["application_name"] = "userapi"
	}

	if opts.ChangeSlot != "" {
		if err := checkSlotName(opts.ChangeSlot); err != nil {
			return nil, fmt.Errorf("open postgres: %w", err)
		}
	}
	s := &Store{acquireTimeout: opts.AcquireTimeout, queryTimeout: opts.QueryTimeout, changeSlot: opts.ChangeSlot}
	s.direct = &cc.Config
	if opts.DirectURL != "" {
		dc, err := pgx.ParseConfig(opts.DirectURL)
		if err != nil {
			return nil, fmt.Errorf("open postgres: direct URL: %w", err)
		}
		s.direct = &dc.Config
		if _, chosen := cc.RuntimeParams["default_query_exec_mode"]; !chosen && !strings.Contains(url, "default_query_exec_mode") {
			// A transaction pooler hands each transaction to any server
			// connection, where a named prepared statement may not
			// exist: describe statements unnamed, once, and cache that.
			cc.DefaultQueryExecMode = pgx.QueryExecModeCacheDescribe
		}
		if opts.Migrate {
			// Through a transaction-pooling proxy the migration lock
			// could be taken on one server connection and released on
			// another: migrate on the server itself, then only check.
			if err := Migrate(ctx, opts.DirectURL); err != nil {
				return nil, fmt.Errorf("open postgres: %w", err)
			}
			opts.Migrate = false
		}
	}
	var db *sql.DB
	if opts.NoPool {
		// A connection used for one call never reuses a prepared
		// statement, so preparing would only add a round trip: send each
		// query as an unnamed statement (Parse/Bind/Execute in one trip).
		cc.DefaultQueryExecMode = pgx.QueryExecModeExec
		s.connConfig = cc
		db = stdlib.OpenDB(*cc)
	} else {
		cfg.MaxConns = int32(opts.MaxConns)
		cfg.MinConns = int32(opts.MinConns)
		s.pool, err = pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("open postgres: %w", translate(err))
		}
		db = stdlib.OpenDBFromPool(s.pool)
	}
	defer db.Close()

	s.schemaVersion, err = checkSchema(ctx, db, opts.Migrate)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("open postgres: %w", err)
	}
	if len(opts.Replicas) > 0 {
		// A write's position is read after its COMMIT returns; with
		// asynchronous commit that can be before the commit's record, and
		// a replica that has not replayed the write would qualify.
		var sc string
		if err := db.QueryRowContext(ctx, "SHOW synchronous_commit").Scan(&sc); err != nil {
			s.Close()
			return nil, fmt.Errorf("open postgres: %w", translate(err))
		}
		if sc == "off" {
			s.Close()
			return nil, errors.New("open postgres: read replicas need synchronous_commit other than off on the primary (a write's position is read after its commit)")
		}
		if s.rt, err = openReplicas(opts.Replicas, cc.Copy(), opts); err != nil {
			s.Close()
			return nil, fmt.Errorf("open postgres: %w", err)
		}
	}
	return s, nil
}

// Migrate applies the pending migrations to the database at url. Concurrent
// callers (instances starting together) are serialized by an advisory lock.
func Migrate(ctx context.Context, url string) error {
	cc, err := pgx.ParseConfig(url)
	if err != nil {
		return fmt.Errorf("migrate postgres: %w", err)
	}
	db := stdlib.OpenDB(*cc)
	defer db.Close()
	if _, err := checkSchema(ctx, db, true); err != nil {
		return fmt.Errorf("migrate postgres: %w", err)
	}
	return nil
}

// checkSchema applies the pending migrations when migrate is set, then
// returns the newest embedded migration version, or an error wrapping
// ErrStaleSchema when some are still pending.
func checkSchema(ctx context.Context, db *sql.DB, migrate bool) (int64, error) {
	locker, err := lock.NewPostgresSessionLocker()
	if err != nil {
		return 0, err
	}
	fsys, err := fs.Sub(migrations, "migrations")
	if err != nil {
		return 0, err
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, fsys, goose.WithSessionLocker(locker))
	if err != nil {
		return 0, err
	}
	if migrate {
		if _, err := p.Up(ctx); err != nil {
			return 0, fmt.Errorf("apply migrations: %w", translate(err))
		}
	}
	current, latest, err := p.GetVersions(ctx)
	if err != nil {
		return 0, fmt.Errorf("read schema version: %w", translate(err))
	}
	pending, err := p.HasPending(ctx)
	if err != nil {
		return 0, fmt.Errorf("read schema version: %w", translate(err))
	}
	if pending {
		return 0, fmt.Errorf("schema version %d, want %d (run `userapi migrate`): %w",
			current, latest, userapi.ErrStaleSchema)
	}
	return latest, nil
}

// Pool returns the connection pool, for benchmark tooling and diagnostics;
// nil in NoPool mode.
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Close closes the pool, waiting for acquired connections to be released.
func (s *Store) Close() error {
	if s.rt != nil {
		s.rt.close()
	}
	if s.pool != nil {
		s.pool.Close()
	}
	return nil
}

// Ping checks that the database answers and that its schema is at least the
// newest embedded migration. It fails with ErrUnavailable or ErrStaleSchema.
func (s *Store) Ping(ctx context.Context) error {
	const q = `
SELECT coalesce(max(version_id), 0)
FROM goose_db_version
WHERE is_applied`
	var v int64
	err := s.do(ctx, func(ctx context.Context, c *pgx.Conn) error {
		return c.QueryRow(ctx, q).Scan(&v)
	})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // undefined_table
		return fmt.Errorf("ping postgres: no migrations applied: %w", userapi.ErrStaleSchema)
	}
	if err != nil {
		return fmt.Errorf("ping postgres: %w", translate(err))
	}
	if v < s.schemaVersion {
		return fmt.Errorf("ping postgres: schema version %d, want %d: %w", v, s.schemaVersion, userapi.ErrStaleSchema)
	}
	return nil
}

// do runs f on a connection under the call deadline, then gives the
// connection back (or closes it in NoPool mode). f must be done with the
// connection when it returns: rows closed, no transaction open.
func (s *Store) do(ctx context.Context, f func(ctx context.Context, c *pgx.Conn) error) error {
	ctx, cancel := s.callContext(ctx, s.queryTimeout)
	defer cancel()
	c, pc, err := s.acquire(ctx)
	if err != nil {
		return err
	}
	defer s.release(ctx, c, pc)
	return f(ctx, c)
}

// callContext returns ctx with a deadline at most d away. It derives no new
// context when ctx already ends sooner, which saves the timer on a hot path
// whose caller set a tighter deadline.
func (s *Store) callContext(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) <= d {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}

// acquire returns a connection for one call: a pooled one (pc is then the
// pool's handle to release) waited for at most s.acquireTimeout, or in NoPool
// mode a new one.
func (s *Store) acquire(ctx context.Context) (c *pgx.Conn, pc *pgxpool.Conn, err error) {
	if s.pool == nil {
		c, err = pgx.ConnectConfig(ctx, s.connConfig)
		if err != nil {
			return nil, nil, fmt.Errorf("connect: %w", err)
		}
		return c, nil, nil
	}
	actx, cancel := ctx, func() {}
	if s.acquireTimeout < s.queryTimeout {
		actx, cancel = s.callContext(ctx, s.acquireTimeout)
	}
	pc, err = s.pool.Acquire(actx)
	cancel()
	if err != nil {
		return nil, nil, fmt.Errorf("acquire connection: %w", err)
	}
	return pc.Conn(), pc, nil
}

// release gives a connection from acquire back.
func (s *Store) release(ctx context.Context, c *pgx.Conn, pc *pgxpool.Conn) {
	if pc != nil {
		pc.Release()
		return
	}
	// Closing sends Terminate and closes the socket even when ctx is done.
	c.Close(ctx)
}

// translate wraps err with userapi.ErrUnavailable when it means the database
// cannot answer now (and a retry later may succeed); other errors are returned
// unchanged. The cause stays in the chain for logs.
func translate(err error) error {
	if err == nil || errors.Is(err, userapi.ErrUnavailable) || !unavailable(err) {
		return err
	}
	return fmt.Errorf("%w: %w", userapi.ErrUnavailable, err)
}

// unavailable reports whether err is a connection failure, a timeout, or the
// server refusing work: what a caller should see as a 503.
func unavailable(err error) bool {
	var connectErr *pgconn.ConnectError
	if errors.As(err, &connectErr) {
		return true // cannot connect, whatever the reason (refused, auth, no database)
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		if strings.HasPrefix(pgErr.Code, "08") { // connection exception
			return true
		}
		switch pgErr.Code {
		case "57P01", // admin_shutdown
			"57P02", // crash_shutdown
			"57P03", // cannot_connect_now (starting up, shutting down)
			"53300", // too_many_connections
			"57014": // query_canceled: statement_timeout or our cancel request
			return true
		}
		return false
	}
	var netErr net.Error
	return errors.Is(err, context.DeadlineExceeded) ||
		pgconn.Timeout(err) ||
		errors.As(err, &netErr) ||
		errors.Is(err, pgconn.ErrConnClosed) ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF)
}

// PoolSize reports the most connections the store uses at once (0 in
// NoPool mode, where it is unbounded); the cache sizes its concurrent
// batch loads by it.
func (s *Store) PoolSize() int {
	if s.pool == nil {
		return 0
	}
	return int(s.pool.Config().MaxConns)
}
