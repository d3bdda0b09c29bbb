-- The users table and the idempotency key snapshots of creates.
--
-- InnoDB for transactions and row locks (SELECT ... FOR UPDATE); utf8mb4 so
-- every Unicode character, 4-byte ones included, is stored as given.
-- DATETIME(6) rather than TIMESTAMP: microsecond precision, no conversion by
-- the session time zone and no 2038 limit; the service writes UTC.

-- +goose Up
CREATE TABLE users (
    id BIGINT NOT NULL AUTO_INCREMENT,
    -- Stored lower-cased; utf8mb4_bin makes uniqueness and lookups compare
    -- exact bytes. 254 bytes at most, so at most 254 characters.
    email VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- VARCHAR counts characters, not bytes: 200 characters of up to 4 bytes.
    name VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (id),
    -- The store tells this key from the idempotency key by its name in
    -- duplicate-entry errors.
    UNIQUE KEY users_email_key (email)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

-- The first result of a create with an Idempotency-Key, kept even if the user
-- is later changed or deleted, so a retry returns the same response.
CREATE TABLE idempotency_keys (
    -- Opaque bytes compared exactly: VARBINARY has no character set to
    -- reject a byte sequence and, unlike the PAD SPACE utf8mb4_bin
    -- collation, does not treat "k" and "k " as the same key.
    idempotency_key VARBINARY(255) NOT NULL,
    user_id BIGINT NOT NULL,
    email VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    name VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at DATETIME(6) NOT NULL,
    PRIMARY KEY (idempotency_key)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

-- +goose Down
DROP TABLE idempotency_keys;
DROP TABLE users;
