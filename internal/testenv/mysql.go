package testenv

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// MySQLEnv names the variable with the MySQL/MariaDB server's URL
// (mysql://user:pass@host:3306/db).
const MySQLEnv = "USERAPI_TEST_MYSQL_URL"

// MySQLDatabase creates an empty database on the server at
// $USERAPI_TEST_MYSQL_URL, dropped at cleanup, and returns its URL and a
// connection pool of its own to it (a writer outside the service, as the
// mysql shell would be). It skips the test when the variable is unset and
// fails it when the server is unreachable.
func MySQLDatabase(tb testing.TB) (string, *sql.DB) {
	tb.Helper()
	base := os.Getenv(MySQLEnv)
	if base == "" {
		tb.Skipf("%s is not set; set it (e.g. mysql://root@127.0.0.1:3306/test) to run the MySQL tests", MySQLEnv)
	}
	u, err := url.Parse(base)
	if err != nil {
		tb.Fatalf("%s: %v", MySQLEnv, err)
	}
	cfg := mysql.NewConfig()
	cfg.User = u.User.Username()
	cfg.Passwd, _ = u.User.Password()
	cfg.Net, cfg.Addr = "tcp", u.Host
	adminDSN := cfg.FormatDSN()
	admin, err := sql.Open("mysql", adminDSN)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b := make([]byte, 8)
	rand.Read(b)
	name := "userapi_test_" + hex.EncodeToString(b)
	if _, err := admin.ExecContext(ctx, "CREATE DATABASE "+name); err != nil {
		admin.Close()
		tb.Fatalf("%s=%s is set but the server is unreachable: %v", MySQLEnv, base, err)
	}
	cfg.DBName = name
	db, err := sql.Open("mysql", cfg.FormatDSN())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		db.Close()
		if _, err := admin.Exec("DROP DATABASE IF EXISTS " + name); err != nil {
			tb.Errorf("drop test database: %v", err)
		}
		admin.Close()
	})
	u.Path = "/" + name
	return u.String(), db
}
