package mysql

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/go-sql-driver/mysql"

	"userapi"
)

// Server error numbers the store reacts to.
const (
	erDupEntry         = 1062 // unique key violation; the message names the key
	erLockWaitTimeout  = 1205 // innodb_lock_wait_timeout passed; the statement was rolled back
	erLockDeadlock     = 1213 // chosen as a deadlock victim; the transaction was rolled back
	erConCount         = 1040 // too many connections
	erServerShutdown   = 1053 // server shutdown in progress
	erTooManyUserConns = 1203 // max_user_connections
	erUserLimitReached = 1226 // a per-account resource limit
	erOptionPrevents   = 1290 // e.g. --read-only during a failover
	erReadOnlyMode     = 1836 // read-only mode
	erConnectionKilled = 1927 // MariaDB: the connection was killed
)

// Unique key names, as duplicate-entry errors report them.
const (
	emailKey          = "users_email_key" // users.email
	idempotencyKeyKey = "PRIMARY"         // idempotency_keys.idempotency_key
)

// translate marks errors that mean the database cannot serve now with
// userapi.ErrUnavailable, keeping the cause in the chain for logs. Other
// errors, domain errors included, are returned as they are.
func translate(err error) error {
	if err == nil || errors.Is(err, userapi.ErrUnavailable) || !unavailable(err) {
		return err
	}
	return fmt.Errorf("%w: %w", userapi.ErrUnavailable, err)
}

// unavailable reports connection failures, timeouts and server states
// that a later retry may get past. A canceled context is the caller's
// choice, not an outage, and is left alone.
func unavailable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, mysql.ErrInvalidConn) ||
		errors.Is(err, sql.ErrConnDone) {
		return true
	}
	var netErr net.Error // refused, reset, i/o timeout, DNS failure
	if errors.As(err, &netErr) {
		return true
	}
	var myErr *mysql.MySQLError
	if errors.As(err, &myErr) {
		switch myErr.Number {
		case erConCount, erServerShutdown, erTooManyUserConns, erUserLimitReached,
			erOptionPrevents, erReadOnlyMode, erConnectionKilled,
			// Only left over once inTx has used up its attempts.
			erLockWaitTimeout, erLockDeadlock:
			return true
		}
	}
	return false
}

// isRetryable reports errors after which InnoDB has undone the work, so the
// whole transaction may run again.
func isRetryable(err error) bool {
	var myErr *mysql.MySQLError
	return errors.As(err, &myErr) &&
		(myErr.Number == erLockDeadlock || myErr.Number == erLockWaitTimeout)
}

// violatedKey returns the name of the unique key a duplicate-entry error
// names, "" for other errors. MariaDB says "Duplicate entry 'v' for key
// 'users_email_key'", MySQL 8 "… for key 'users.users_email_key'".
func violatedKey(err error) string {
	var myErr *mysql.MySQLError
	if !errors.As(err, &myErr) || myErr.Number != erDupEntry {
		return ""
	}
	const marker = " for key '"
	i := strings.LastIndex(myErr.Message, marker)
	if i < 0 {
		return ""
	}
	key := strings.TrimSuffix(myErr.Message[i+len(marker):], "'")
	if j := strings.LastIndexByte(key, '.'); j >= 0 {
		key = key[j+1:]
	}
	return key
}
