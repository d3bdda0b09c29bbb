// Package sqlite is the users store on an embedded SQLite database file, the
// zero-configuration default of the service. It uses the pure-Go
// github.com/ncruces/go-sqlite3 driver in WAL mode with one writer connection
// and a pool of read-only connections, and applies its embedded goose
// migrations (migrations/*.sql).
package sqlite

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ncruces/go-sqlite3"
	sqlitedriver "github.com/ncruces/go-sqlite3/driver"
	"github.com/pressly/goose/v3"

	"userapi"
)

var (
	_ userapi.Store  = (*Store)(nil)
	_ userapi.Seeder = (*Store)(nil)
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// DefaultQueryTimeout bounds every call when Options.QueryTimeout is zero:
// long enough for a queue of writers on the one write connection (each commit
// costs an fsync), short enough that a stuck database becomes a 503 before
// the HTTP request deadline.
const DefaultQueryTimeout = 2 * time.Second

// busyTimeout is how long SQLite retries when another process (a second
// instance on the same file, `userapi seed`, a backup) holds the write lock.
// Inside this process writers never meet SQLITE_BUSY: they queue for the one
// write connection. The per-call context deadline (QueryTimeout) normally
// ends a wait first, so this only bounds calls with longer deadlines, such as
// migrations and seeding. After it SQLite reports SQLITE_BUSY, which the
// store reports as ErrUnavailable.
const busyTimeout = 5 * time.Second

// Options configure a Store. The zero value is usable.
type Options struct {
	// MaxConns is the size of the read-only connection pool; 0 means
	// 2×GOMAXPROCS. A read is CPU work inside the Go translation of SQLite
	// (no network round trip to wait on), so connections beyond the CPU
	// count buy little; twice the count covers readers stalled on disk I/O
	// or descheduled while holding a connection. Each connection has its own
	// page cache (about 2 MiB), so the number also bounds memory. Writes
	// always use one connection: SQLite allows one writer at a time, and
	// queueing in database/sql is cheaper than SQLITE_BUSY retries.
	MaxConns int

	// QueryTimeout is the deadline applied to every call, including the wait
	// for a free connection (database/sql waits on the context); 0 means
	// DefaultQueryTimeout. It does not apply to SeedUsers, which the caller
	// bounds.
	QueryTimeout time.Duration

	// Migrate applies pending migrations at Open. The server sets it so a
	// fresh machine needs no separate `userapi migrate`. Without it, Open
	// fails with ErrStaleSchema when migrations are pending.
	Migrate bool
}

// Store is the SQLite users store. It is safe for concurrent use.
type Store struct {
	writer  *sql.DB // one connection; every write transaction is BEGIN IMMEDIATE
	reader  *sql.DB // read-only connections
	timeout time.Duration

	schemaVersion int64 // the newest embedded migration
	maxVars       int   // SQLite's limit on bound parameters per statement

	getUser *sql.Stmt // on reader; the hot path, prepared once per connection

	path          string       // the database file; the change stream's lock file is beside it
	changeBacklog atomic.Int64 // rows of user_changes the change stream has not applied
}

// Open opens (creating the file and its directory if needed) the database
// named by url, "sqlite:PATH" or "sqlite://PATH". It fails with an error
// wrapping userapi.ErrStaleSchema when migrations are pending and
// opts.Migrate is false.
func Open(ctx context.Context, url string, opts Options) (*Store, error) {
	path, err := parseURL(url)
	if err != nil {
		return nil, fmt.Errorf("open sqlite: %w", err)
	}
	if opts.MaxConns <= 0 {
		opts.MaxConns = 2 * runtime.GOMAXPROCS(0)
	}
	if opts.QueryTimeout <= 0 {
		opts.QueryTimeout = DefaultQueryTimeout
	}
	s := &Store{timeout: opts.QueryTimeout, path: path}
	if err := s.open(ctx, path, opts); err != nil {
		s.Close()
		return nil, fmt.Errorf("open sqlite %s: %w", path, err)
	}
	return s, nil
}

func (s *Store) open(ctx context.Context, path string, opts Options) error {
	var err error
	if s.writer, err = openWriter(path); err != nil {
		return err
	}
	// Connect the writer first: it creates the file and switches it to WAL
	// mode, which the read-only connections cannot do.
	if err := s.writer.PingContext(ctx); err != nil {
		return translate(ctx, err)
	}
	provider, err := newProvider(s.writer)
	if err != nil {
		return err
	}
	sources := provider.ListSources()
	s.schemaVersion = sources[len(sources)-1].Version
	if opts.Migrate {
		if err := up(ctx, provider); err != nil {
			return fmt.Errorf("migrate: %w", translate(ctx, err))
		}
	}

	s.reader = openReader(path, opts.MaxConns)
	if err := s.checkSchema(ctx); err != nil {
		return err
	}
	if s.maxVars, err = variableLimit(ctx, s.reader); err != nil {
		return translate(ctx, err)
	}
	if s.getUser, err = s.reader.PrepareContext(ctx, getUserSQL); err != nil {
		return translate(ctx, err)
	}
	return nil
}

// Migrate applies the pending migrations to the database named by url,
// creating the file if needed. It does not lock against another process
// migrating the same file at the same moment, but retries when it loses
// such a race.
func Migrate(ctx context.Context, url string) error {
	path, err := parseURL(url)
	if err != nil {
		return fmt.Errorf("migrate sqlite: %w", err)
	}
	db, err := openWriter(path)
	if err != nil {
		return fmt.Errorf("migrate sqlite %s: %w", path, err)
	}
	defer db.Close()
	provider, err := newProvider(db)
	if err != nil {
		return fmt.Errorf("migrate sqlite %s: %w", path, err)
	}
	if err := up(ctx, provider); err != nil {
		return fmt.Errorf("migrate sqlite %s: %w", path, translate(ctx, err))
	}
	return nil
}

// up applies the pending migrations. goose has no lock for SQLite, so
// processes migrating one new file at the same moment (instances started
// together) collide: the loser fails on the busy lock or on a table the
// winner has just created. A later attempt finds the work done, so up
// retries a few times before giving up.
func up(ctx context.Context, provider *goose.Provider) error {
	var err error
	for range 4 {
		if _, err = provider.Up(ctx); err == nil || ctx.Err() != nil {
			break
		}
	}
	return err
}

func newProvider(db *sql.DB) (*goose.Provider, error) {
	fsys, err := fs.Sub(migrationFiles, "migrations")
	if err != nil {
		return nil, err
	}
	return goose.NewProvider(goose.DialectSQLite3, db, fsys,
		goose.WithDisableGlobalRegistry(true),
		goose.WithLogger(goose.NopLogger()))
}

// parseURL returns the file path of "sqlite:PATH" or "sqlite://PATH". The
// schemes "sqlite3" and "file", which the command line also routes here,
// are accepted as aliases. Parameters are refused rather than taken as part
// of a file name: the store sets its own pragmas.
func parseURL(url string) (string, error) {
	path, ok := "", false
	for _, scheme := range []string{"sqlite", "sqlite3", "file"} {
		if path, ok = strings.CutPrefix(url, scheme+"://"); ok {
			break
		}
		if path, ok = strings.CutPrefix(url, scheme+":"); ok {
			break
		}
	}
	switch {
	case !ok:
		return "", errors.New(`database URL must be "sqlite:PATH"`)
	case path == "" || path == ":memory:":
		return "", errors.New(`database URL must name a file: "sqlite:PATH"`)
	case strings.ContainsAny(path, "?#"):
		return "", errors.New("sqlite database URL takes no parameters")
	}
	return path, nil
}

// dsn returns the driver's file: URI for path. SQLite URIs need only '%',
// '?' and '#' escaped in the path.
func dsn(path string) string {
	path = strings.NewReplacer("%", "%25", "?", "%3f", "#", "%23").Replace(path)
	// BEGIN IMMEDIATE takes the write lock at the start of a transaction,
	// so a transaction that reads and then writes cannot fail with
	// SQLITE_BUSY halfway through (the driver's default; stated here so it
	// does not change silently).
	return "file:" + path + "?_txlock=immediate"
}

func openWriter(path string) (*sql.DB, error) {
	if dir := filepath.Dir(path); dir != "." {
		// 0750: the file holds users' email addresses.
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, err
		}
	}
	db, err := sqlitedriver.Open(dsn(path), initWriter)
	if err != nil {
		return nil, err
	}
	// One writer: SQLite serializes writers anyway; a second connection
	// would only trade a queue in database/sql for SQLITE_BUSY retries.
	// Kept open forever: opening a connection is costly (a new SQLite
	// instance and a schema parse).
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	db.SetConnMaxLifetime(0)
	db.SetConnMaxIdleTime(0)
	return db, nil
}

func initWriter(c *sqlite3.Conn) error {
	if err := c.BusyTimeout(busyTimeout); err != nil {
		return err
	}
	// journal_mode=WAL: readers never block the writer nor the writer them.
	//
	// synchronous=FULL: an acknowledged write must survive power loss, not
	// only a crash of this process. In WAL mode NORMAL skips the fsync of
	// the WAL at commit, so the last commits before a power cut can vanish
	// after they were acknowledged; FULL syncs the WAL on every commit. Its
	// cost is one fsync per write transaction, which the single writer pays
	// in turn; reads are unaffected.
	//
	// journal_size_limit: truncate the WAL to 64 MiB after a checkpoint
	// instead of keeping its largest size on disk forever.
	//
	// foreign_keys: SQLite leaves them off by default; on, so any future
	// foreign key is enforced.
	return c.Exec(`
		PRAGMA journal_mode = WAL;
		PRAGMA synchronous = FULL;
		PRAGMA journal_size_limit = 67108864;
		PRAGMA foreign_keys = ON;
	`)
}

func openReader(path string, maxConns int) *sql.DB {
	db, _ := sqlitedriver.Open(dsn(path), initReader) // fails only on a bad DSN, which openWriter already accepted
	db.SetMaxOpenConns(maxConns)
	// As many idle as open: a closed connection costs a reopen and the
	// statements prepared on it.
	db.SetMaxIdleConns(maxConns)
	db.SetConnMaxLifetime(0)
	db.SetConnMaxIdleTime(0)
	return db
}

func initReader(c *sqlite3.Conn) error {
	if err := c.BusyTimeout(busyTimeout); err != nil {
		return err
	}
	// query_only: these connections can never write, whatever the SQL; the
	// driver then starts their transactions DEFERRED (no write lock).
	return c.Exec(`
		PRAGMA query_only = ON;
		PRAGMA foreign_keys = ON;
	`)
}

// variableLimit returns the connection's limit on bound parameters per
// statement (SQLITE_MAX_VARIABLE_NUMBER).
func variableLimit(ctx context.Context, db *sql.DB) (int, error) {
	conn, err := db.Conn(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	var n int
	err = conn.Raw(func(dc any) error {
		n = dc.(sqlitedriver.Conn).Raw().Limit(sqlite3.LIMIT_VARIABLE_NUMBER, -1)
		return nil
	})
	return n, err
}

// checkSchema fails with ErrStaleSchema unless every embedded migration is
// applied. A database migrated by newer code is accepted.
func (s *Store) checkSchema(ctx context.Context) error {
	var v sql.NullInt64
	err := s.reader.QueryRowContext(ctx, `
		SELECT max(version_id)
		FROM goose_db_version
	`).Scan(&v)
	if err != nil && strings.Contains(err.Error(), "no such table") {
		return fmt.Errorf("%w: no migrations applied", userapi.ErrStaleSchema)
	}
	if err != nil {
		return fmt.Errorf("read schema version: %w", translate(ctx, err))
	}
	if v.Int64 < s.schemaVersion {
		return fmt.Errorf("%w: version %d, want %d", userapi.ErrStaleSchema, v.Int64, s.schemaVersion)
	}
	return nil
}

// Ping reports whether the database answers and its schema is current: an
// error wrapping ErrUnavailable or ErrStaleSchema otherwise.
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	if err := s.checkSchema(ctx); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	return nil
}

// Close closes both connection pools.
func (s *Store) Close() error {
	var errs []error
	if s.getUser != nil {
		errs = append(errs, s.getUser.Close())
	}
	if s.reader != nil {
		errs = append(errs, s.reader.Close())
	}
	if s.writer != nil {
		errs = append(errs, s.writer.Close())
	}
	return errors.Join(errs...)
}

// withTimeout applies the store's per-call deadline.
func (s *Store) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.timeout)
}

// translate marks err as ErrUnavailable when it means the database cannot
// answer now: busy past the busy timeout, interrupted by the deadline, an
// I/O failure, a full disk, a file that cannot be opened or written. The
// driver error stays in the chain for logs; the HTTP layer shows only the
// domain error's text.
func translate(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		err = fmt.Errorf("%w (%w)", err, cerr)
	}
	switch {
	case errors.Is(err, sqlite3.BUSY),
		errors.Is(err, sqlite3.LOCKED),
		errors.Is(err, sqlite3.INTERRUPT),
		errors.Is(err, sqlite3.IOERR),
		errors.Is(err, sqlite3.FULL),
		errors.Is(err, sqlite3.CANTOPEN),
		errors.Is(err, sqlite3.READONLY),
		errors.Is(err, context.DeadlineExceeded),
		errors.Is(err, context.Canceled),
		errors.Is(err, sql.ErrConnDone):
		return fmt.Errorf("%w: %w", userapi.ErrUnavailable, err)
	}
	return err
}

// emailKey is the unique index on users.email, as a violation names it.
const emailKey = "users.email"

// violatedKey returns the unique index a UNIQUE or PRIMARY KEY violation
// names, as SQLite names it at the end of the message ("UNIQUE constraint
// failed: users.email" names "users.email"), "" for other errors.
func violatedKey(err error) string {
	if !errors.Is(err, sqlite3.CONSTRAINT_UNIQUE) && !errors.Is(err, sqlite3.CONSTRAINT_PRIMARYKEY) {
		return ""
	}
	msg := err.Error()
	const marker = "constraint failed: "
	i := strings.LastIndex(msg, marker)
	if i < 0 {
		return ""
	}
	return msg[i+len(marker):]
}

// PoolSize reports the most reader connections the store uses at once;
// the cache sizes its concurrent batch loads by it.
func (s *Store) PoolSize() int { return s.reader.Stats().MaxOpenConnections }
