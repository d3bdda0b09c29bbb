-- API keys (docs/security.md). Only the SHA-256 of a key's secret is stored;
-- the key itself is shown once, when it is created.
--
-- NULL last_used_at, expires_at, revoked_at mean never used, never expires,
-- not revoked. rate_limit (requests per second) and rate_burst NULL mean the
-- configured default. DATETIME(6) in UTC, like the users table.

-- +goose Up
-- AUTO_INCREMENT ids are not reused by InnoDB after a delete (MariaDB keeps
-- the counter across restarts): an id is part of a key, and a revoked key's
-- id must never name a new key.
CREATE TABLE api_keys (
    id BIGINT NOT NULL AUTO_INCREMENT,
    name VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- space-separated: 'users:read users:write admin'
    scopes VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    secret_hash BINARY(32) NOT NULL,
    created_at DATETIME(6) NOT NULL,
    last_used_at DATETIME(6) NULL,
    expires_at DATETIME(6) NULL,
    revoked_at DATETIME(6) NULL,
    rate_limit DOUBLE NULL,
    rate_burst INT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

-- +goose Down
DROP TABLE api_keys;
