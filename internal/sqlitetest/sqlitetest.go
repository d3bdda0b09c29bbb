// Package sqlitetest opens SQLite stores for the tests of other packages
// (the sqlite package's own tests open theirs, since this one imports it).
package sqlitetest

import (
	"path/filepath"
	"testing"

	"userapi/internal/testenv"
	"userapi/sqlite"
)

// Open opens a migrated SQLite store on a new file in tb's temporary
// directory, closed at cleanup, and returns it with the file's path (for
// a second connection, as another process would open it).
func Open(tb testing.TB) (*sqlite.Store, string) {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "users.db")
	s, err := sqlite.Open(testenv.Context(tb), "sqlite:"+path, sqlite.Options{Migrate: true})
	if err != nil {
		tb.Fatalf("sqlite.Open %s: %v", path, err)
	}
	tb.Cleanup(func() { s.Close() })
	return s, path
}
