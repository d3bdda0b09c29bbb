-- API keys (docs/security.md). Only the SHA-256 of a key's secret is stored;
-- the key itself is shown once, when it is created.
--
-- Timestamps are INTEGER unix microseconds in UTC like the users table's;
-- NULL means never used, never expires, not revoked. rate_limit (requests per
-- second) and rate_burst NULL mean the configured default.

-- +goose Up
-- AUTOINCREMENT: an id is part of a key, and a revoked key's id must never
-- name a new key.
CREATE TABLE api_keys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL,
    scopes       TEXT    NOT NULL, -- space-separated: "users:read users:write admin"
    secret_hash  BLOB    NOT NULL CHECK (length(secret_hash) = 32),
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    expires_at   INTEGER,
    revoked_at   INTEGER,
    rate_limit   REAL,
    rate_burst   INTEGER
) STRICT;

-- +goose Down
DROP TABLE api_keys;
