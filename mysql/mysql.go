// Package mysql is the MySQL/MariaDB users store: a database/sql pool over
// github.com/go-sql-driver/mysql, the schema as embedded goose migrations,
// and userapi.Store and userapi.Seeder in plain SQL. Driver errors are
// translated here into the domain errors of package userapi.
package mysql

import (
	"cmp"
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"userapi"
)

var (
	_ userapi.Store  = (*Store)(nil)
	_ userapi.Seeder = (*Store)(nil)
)

//go:embed migrations/*.sql
var migrations embed.FS

// Defaults of Options.
const (
	// DefaultMaxConns is the pool size. MariaDB runs one thread per
	// connection and a few-core server gains nothing from many more
	// statements in flight than it has cores (they queue inside it instead
	// of in the pool, where waits are measured). 16 keeps a small server
	// busy while requests block on I/O, and three instances behind the load
	// balancer (48) stay well under the default max_connections of 151.
	DefaultMaxConns = 16

	// DefaultQueryTimeout bounds every store call, including the wait for
	// a pooled connection: long enough for a loaded pool, short enough that
	// a dead database becomes a 503 before the HTTP request deadline.
	DefaultQueryTimeout = 2 * time.Second

	// DefaultDialTimeout bounds connecting to the server. A reachable
	// server accepts in milliseconds; an unreachable one should become
	// ErrUnavailable well within the query timeout.
	DefaultDialTimeout = 2 * time.Second
)

const (
	// ioTimeout is the driver's read and write timeout, a backstop for a
	// server that stops answering on a call with no deadline (migrations,
	// seeding). It must exceed the longest single statement we run: a
	// 2,000-row insert or a schema change takes far less. Override it with
	// readTimeout=/writeTimeout= in the URL.
	ioTimeout = 30 * time.Second

	// connMaxLifetime retires connections so the pool follows a failover or
	// a DNS change and per-session server memory does not grow forever; far
	// below MariaDB's default wait_timeout (8h). The driver also checks a
	// connection's liveness before reusing it.
	connMaxLifetime = 30 * time.Minute

	// connMaxIdleTime closes connections left idle after a burst, so
	// several instances do not pin server threads they no longer need.
	connMaxIdleTime = 5 * time.Minute

	// maxTxAttempts bounds retries of a transaction that InnoDB chose as a
	// deadlock victim (1213) or whose lock wait timed out (1205): such a
	// transaction was rolled back and is safe to run again, but a hot row
	// must not make a call spin; after the last attempt it is
	// ErrUnavailable.
	maxTxAttempts = 3
)

// Options configure Open. Zero values mean the defaults above.
type Options struct {
	// MaxConns bounds open connections (SetMaxOpenConns). Calls beyond it
	// wait for a free connection until their deadline (QueryTimeout).
	MaxConns int

	// NoPool keeps no idle connection, so every call dials a new one and
	// closes it afterwards: the "connection per request" baseline of the
	// benchmark ladder, not a mode for production. MaxConns still bounds
	// connections open at once.
	NoPool bool

	// QueryTimeout is the deadline of every store call (DefaultQueryTimeout).
	QueryTimeout time.Duration

	// DialTimeout bounds connecting to the server (DefaultDialTimeout);
	// timeout= in the URL wins.
	DialTimeout time.Duration

	// Migrate applies pending migrations before Open checks the schema.
	Migrate bool
}

func (o Options) withDefaults() Options {
	if o.MaxConns <= 0 {
		o.MaxConns = DefaultMaxConns
	}
	if o.QueryTimeout <= 0 {
		o.QueryTimeout = DefaultQueryTimeout
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = DefaultDialTimeout
	}
	return o
}

// Store is the MySQL/MariaDB userapi.Store. It is safe for concurrent use.
type Store struct {
	db      *sql.DB
	schema  *goose.Provider // reports pending migrations
	timeout time.Duration
	stmts   sync.Map    // SQL text → kept *sql.Stmt (stmt.go)
	txKept  atomic.Bool // every one of txStatements is in stmts

	cfg           *mysql.Config // the change stream's connection is made from it
	changeBacklog atomic.Int64  // rows of user_changes the change stream has not applied
}

// Open connects to the database at url (mysql://user:pass@host:3306/db?params)
// and returns a store. It fails with an error wrapping userapi.ErrUnavailable
// when the server cannot be reached, and with one wrapping
// userapi.ErrStaleSchema when migrations are pending (after applying them
// first when opts.Migrate is set).
func Open(ctx context.Context, url string, opts Options) (*Store, error) {
	opts = opts.withDefaults()
	cfg, err := config(url, opts)
	if err != nil {
		return nil, fmt.Errorf("open mysql: %w", err)
	}
	if opts.Migrate {
		if err := migrate(ctx, cfg, opts.QueryTimeout); err != nil {
			return nil, fmt.Errorf("open mysql: %w", err)
		}
	}

	db, err := sql.Open("mysql", cfg.FormatDSN())
	if err != nil {
		return nil, fmt.Errorf("open mysql: %w", err)
	}
	db.SetMaxOpenConns(opts.MaxConns)
	// Keep every connection between calls: database/sql's default of 2
	// idle would close and re-dial connections under load.
	idle := opts.MaxConns
	if opts.NoPool {
		idle = 0
	}
	db.SetMaxIdleConns(idle)
	db.SetConnMaxLifetime(connMaxLifetime)
	db.SetConnMaxIdleTime(connMaxIdleTime)

	schema, err := newProvider(db)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open mysql: %w", err)
	}
	s := &Store{db: db, schema: schema, timeout: opts.QueryTimeout, cfg: cfg}
	if err := s.Ping(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open mysql: %w", err)
	}
	return s, nil
}

// Migrate applies the pending migrations to the database at url. Concurrent
// callers (several instances starting at once) take turns through goose's
// lock table, as MySQL cannot run schema changes inside a transaction.
func Migrate(ctx context.Context, url string) error {
	opts := Options{}.withDefaults()
	cfg, err := config(url, opts)
	if err != nil {
		return fmt.Errorf("migrate mysql: %w", err)
	}
	if err := migrate(ctx, cfg, opts.QueryTimeout); err != nil {
		return fmt.Errorf("migrate mysql: %w", err)
	}
	return nil
}

// migrate applies the migrations through a pool of its own: the lock
// needs a second connection while goose holds the first, whatever the
// store's pool size. Reaching the server is bounded by pingTimeout;
// applying the migrations only by ctx, as a schema change may take long.
func migrate(ctx context.Context, cfg *mysql.Config, pingTimeout time.Duration) error {
	db, err := sql.Open("mysql", cfg.FormatDSN())
	if err != nil {
		return err
	}
	defer db.Close()
	pingCtx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	if err := db.PingContext(pingCtx); err != nil {
		return translate(err)
	}
	// Another instance's migration finishes in well under two minutes;
	// polling every second lets waiting instances start right after it.
	locker, err := lock.NewMySQLTableLocker(lock.WithTableLockTimeout(time.Second, 120))
	if err != nil {
		return err
	}
	p, err := newProvider(db, goose.WithLocker(locker))
	if err != nil {
		return err
	}
	if _, err := p.Up(ctx); err != nil {
		return translate(err)
	}
	return nil
}

func newProvider(db *sql.DB, opts ...goose.ProviderOption) (*goose.Provider, error) {
	fsys, err := fs.Sub(migrations, "migrations")
	if err != nil {
		return nil, err
	}
	opts = append(opts, goose.WithDisableGlobalRegistry(true))
	return goose.NewProvider(goose.DialectMySQL, db, fsys, opts...)
}

// config turns the URL form mysql://user:pass@host:3306/db?params into
// the driver's configuration. The query parameters are the driver's own DSN
// parameters (tls=, timeout=, readTimeout=, …) and are parsed by the driver;
// parseTime, loc and interpolateParams are always set as the store needs
// them.
func config(rawURL string, opts Options) (*mysql.Config, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, errors.New("invalid database URL") // err would echo the password
	}
	if u.Scheme != "mysql" {
		return nil, fmt.Errorf("database URL scheme %q, want mysql", u.Scheme)
	}
	dbName := strings.TrimPrefix(u.Path, "/")
	if dbName == "" || strings.Contains(dbName, "/") {
		return nil, errors.New("database URL needs a database name: mysql://user:pass@host:3306/db")
	}

	cfg, err := mysql.ParseDSN("/?" + u.RawQuery)
	if err != nil {
		return nil, fmt.Errorf("database URL parameters: %w", err)
	}
	cfg.User = u.User.Username()
	cfg.Passwd, _ = u.User.Password()
	cfg.Net = "tcp"
	cfg.Addr = u.Host
	if u.Port() == "" {
		cfg.Addr = net.JoinHostPort(cmp.Or(u.Hostname(), "127.0.0.1"), "3306")
	}
	cfg.DBName = dbName

	// Scan DATETIME columns into time.Time, in UTC: the service stores UTC
	// and the driver sends time.Time arguments converted to loc.
	cfg.ParseTime = true
	cfg.Loc = time.UTC
	// Placeholders go to the server as prepared-statement parameters, never
	// spliced into the SQL text by the client: values cannot change the
	// statement, whatever the connection's character set (client-side
	// escaping is unsafe with some multi-byte charsets), and they travel in
	// the binary protocol. Statements are kept prepared (stmt.go), so the
	// prepare costs a round trip only the first time a statement runs on a
	// connection.
	cfg.InterpolateParams = false
	if cfg.Timeout == 0 {
		cfg.Timeout = opts.DialTimeout
	}
	if cfg.ReadTimeout == 0 {
		cfg.ReadTimeout = ioTimeout
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = ioTimeout
	}
	if cfg.Params == nil {
		cfg.Params = map[string]string{}
	}
	// A statement waiting for a row lock past the call's deadline is
	// pointless, and the server keeps waiting (holding the transaction's
	// other locks) after the client gave up: the default is 50 seconds.
	// Sent once per new connection.
	if _, ok := cfg.Params["innodb_lock_wait_timeout"]; !ok {
		secs := int(math.Ceil(opts.QueryTimeout.Seconds()))
		cfg.Params["innodb_lock_wait_timeout"] = strconv.Itoa(max(secs, 1))
	}
	return cfg, nil
}

// Ping reports whether the database is reachable (ErrUnavailable) and its
// schema current (ErrStaleSchema).
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	if err := s.db.PingContext(ctx); err != nil {
		return fmt.Errorf("ping: %w", translate(err))
	}
	pending, err := s.schema.HasPending(ctx)
	if err != nil {
		return fmt.Errorf("check schema: %w", translate(err))
	}
	if pending {
		return fmt.Errorf("migrations pending: %w", userapi.ErrStaleSchema)
	}
	return nil
}

// Close closes the pool, then the kept statements; calls in flight finish
// first.
func (s *Store) Close() error {
	err := s.db.Close()
	s.closeStatements()
	return err
}

// inTx runs fn in a transaction and commits it, running it again (up to
// maxTxAttempts in all) when InnoDB rolled it back for a deadlock or a lock
// wait timeout. fn must not have effects outside the transaction.
func (s *Store) inTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	for attempt := 1; ; attempt++ {
		err := s.tryTx(ctx, fn)
		if !isRetryable(err) || attempt == maxTxAttempts {
			return err
		}
		// A short, growing pause lets the transaction that won the
		// deadlock finish before this one takes its locks again.
		select {
		case <-time.After(time.Duration(attempt) * 5 * time.Millisecond):
		case <-ctx.Done():
			return err
		}
	}
}

func (s *Store) tryTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	if !s.txKept.Load() {
		s.keepTxStatements(ctx)
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}

// PoolSize reports the most connections the store uses at once; the cache
// sizes its concurrent batch loads by it.
func (s *Store) PoolSize() int { return s.db.Stats().MaxOpenConnections }
