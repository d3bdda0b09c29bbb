-- The users table and the idempotency keys of creates.
--
-- Timestamps are INTEGER unix microseconds in UTC: exact at the service's
-- precision, compact, and ordered like time.
--
-- STRICT makes SQLite enforce the declared column types.

-- +goose Up
-- AUTOINCREMENT: ids are never reused, even the largest after it is deleted.
-- A reused id would let an idempotent replay point at someone else's row and
-- let a cache mistake a new user (version 1) for a deleted one (version 1).
CREATE TABLE users (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    email      TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version    INTEGER NOT NULL
) STRICT;

-- Emails are stored lower-cased by the service; BINARY collation keeps the
-- uniqueness exact. A violation reads "UNIQUE constraint failed: users.email".
CREATE UNIQUE INDEX users_email_key ON users (email);

-- The first result of a create with a key. No foreign key to users: a replay
-- returns this snapshot even after the user was changed or deleted.
CREATE TABLE idempotency_keys (
    key        TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL,
    email      TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- +goose Down
DROP TABLE idempotency_keys;
DROP TABLE users;
