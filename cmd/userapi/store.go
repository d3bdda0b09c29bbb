package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"userapi"
	"userapi/internal/redact"
	"userapi/mysql"
	"userapi/postgres"
	"userapi/sqlite"
)

// backend names the database behind a URL by its scheme.
func backend(dbURL string) (string, error) {
	scheme, _, ok := strings.Cut(dbURL, ":")
	if !ok {
		return "", fmt.Errorf("%w: --db %q is not a URL (postgres://…, mysql://…, sqlite:PATH)", errUsage, redact.URL(dbURL))
	}
	switch scheme {
	case "postgres", "postgresql":
		return "postgres", nil
	case "mysql":
		return "mysql", nil
	case "sqlite", "sqlite3", "file":
		return "sqlite", nil
	}
	return "", fmt.Errorf("%w: --db scheme %q is not postgres, mysql or sqlite", errUsage, scheme)
}

// openStore opens the store behind c.DB. migrate applies pending migrations
// first; SQLite, the zero-configuration default, always does.
func openStore(ctx context.Context, c *config, migrate bool) (userapi.Store, error) {
	kind, err := backend(c.DB)
	if err != nil {
		return nil, err
	}
	if len(c.Replicas) > 0 && kind != "postgres" {
		return nil, fmt.Errorf("%w: --db-replica needs a PostgreSQL --db", errUsage)
	}
	switch kind {
	case "postgres":
		return postgres.Open(ctx, c.DB, postgres.Options{
			MaxConns:      c.PoolSize,
			QueryTimeout:  c.DBTimeout,
			NoPool:        !c.DBPool,
			Migrate:       migrate,
			ChangeSlot:    c.ChangeSlot,
			DirectURL:     c.DBDirect,
			Replicas:      c.Replicas,
			ReplicaMaxLag: c.MaxLag,
		})
	case "mysql":
		return mysql.Open(ctx, c.DB, mysql.Options{
			MaxConns:     c.PoolSize,
			QueryTimeout: c.DBTimeout,
			NoPool:       !c.DBPool,
			Migrate:      migrate,
		})
	default:
		return sqlite.Open(ctx, c.DB, sqlite.Options{
			MaxConns:     c.PoolSize,
			QueryTimeout: c.DBTimeout,
			Migrate:      true,
		})
	}
}

// openStoreWaiting retries openStore while the database is unreachable, for
// up to c.DBWait, so instances started before their database come up.
func openStoreWaiting(ctx context.Context, c *config, migrate bool, log *slog.Logger) (userapi.Store, error) {
	deadline := time.Now().Add(c.DBWait)
	delay := 100 * time.Millisecond
	for {
		s, err := openStore(ctx, c, migrate)
		if err == nil || !errors.Is(err, userapi.ErrUnavailable) || time.Now().After(deadline) {
			return s, err
		}
		log.Warn("database unreachable, retrying", "err", err, "in", delay)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 2*time.Second)
	}
}

func migrate(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	var c config
	fs := newFlagSet("migrate", stderr)
	c.dbFlags(fs)
	if err := parseArgs(fs, args, getenv); err != nil {
		return err
	}
	s, err := openStore(ctx, &c, true)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	fmt.Fprintf(stderr, "migrated %s\n", redact.URL(c.DB))
	return s.Close()
}

func seed(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	var c config
	fs := newFlagSet("seed", stderr)
	c.dbFlags(fs)
	users := fs.Int("users", 1_000_000, "how many users to load")
	first := fs.Int("first", 1, "number of the first generated user (user<N>@example.com)")
	if err := parseArgs(fs, args, getenv); err != nil {
		return err
	}
	if *users < 1 || *first < 1 {
		return fmt.Errorf("%w: --users and --first must be positive", errUsage)
	}
	// A bulk load runs long statements (COPY of 100k rows); ten minutes bounds
	// a stuck one without cutting a real one short.
	c.DBTimeout = 10 * time.Minute
	s, err := openStore(ctx, &c, true)
	if err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	defer s.Close()
	seeder, ok := s.(userapi.Seeder)
	if !ok {
		return fmt.Errorf("seed: the %T store cannot bulk-load", s)
	}
	start := time.Now()
	last := time.Now()
	err = seeder.SeedUsers(ctx, *first, *users, func(done int) {
		if time.Since(last) >= time.Second || done == *users {
			last = time.Now()
			el := time.Since(start).Seconds()
			fmt.Fprintf(stderr, "seeded %d/%d users (%.0f/s)\n", done, *users, float64(done)/el)
		}
	})
	if err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	fmt.Fprintf(stderr, "seeded %d users in %s\n", *users, time.Since(start).Round(time.Millisecond))
	return nil
}

// changeFeed returns the store's change stream as c.ChangeStream asks: nil
// when it is off, or when it is auto and the database cannot stream (then
// the reason and its fix are logged); an error when it is on and cannot.
func changeFeed(ctx context.Context, c *config, s userapi.Store, mode string, log *slog.Logger) (userapi.ChangeFeed, error) {
	switch c.ChangeStream {
	case "off":
		return nil, nil
	case "auto", "on":
	default:
		return nil, fmt.Errorf("%w: --change-stream %q is not auto, on or off", errUsage, c.ChangeStream)
	}
	if mode == "off" {
		return nil, nil // nothing cached, nothing to invalidate
	}
	feed, ok := s.(userapi.ChangeFeed)
	var err error
	if !ok {
		err = fmt.Errorf("the %s store has no change stream", kindOf(c))
	} else if ch, ok := s.(interface{ CheckChangeFeed(context.Context) error }); ok {
		err = ch.CheckChangeFeed(ctx)
	}
	switch {
	case err == nil:
		log.Info("change stream on: writes made outside the service invalidate the cache", "db", kindOf(c), "via", feedKind[kindOf(c)])
		return feed, nil
	case c.ChangeStream == "on":
		return nil, fmt.Errorf("--change-stream on: %w", err)
	}
	log.Warn("change stream off: writes made outside the service reach the cache only when entries expire (--cache-ttl)", "reason", err)
	return nil, nil
}

// feedKind says how each store streams its changes.
var feedKind = map[string]string{
	"postgres": "logical replication",
	"mysql":    "the user_changes table (triggers)",
	"sqlite":   "the user_changes table (triggers)",
}

func kindOf(c *config) string {
	k, _ := backend(c.DB)
	return k
}
