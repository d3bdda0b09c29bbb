-- API keys (docs/security.md). Only the SHA-256 of a key's secret is stored;
-- the key itself is shown once, when it is created.
--
-- NULL last_used_at, expires_at, revoked_at mean never used, never expires,
-- not revoked. rate_limit (requests per second) and rate_burst NULL mean the
-- configured default.

-- +goose Up
-- An identity, never reused: an id is part of a key, and a revoked key's id
-- must never name a new key.
CREATE TABLE api_keys (
    id           bigint GENERATED ALWAYS AS IDENTITY,
    name         text             NOT NULL,
    scopes       text             NOT NULL, -- space-separated: 'users:read users:write admin'
    secret_hash  bytea            NOT NULL,
    created_at   timestamptz      NOT NULL,
    last_used_at timestamptz,
    expires_at   timestamptz,
    revoked_at   timestamptz,
    rate_limit   double precision,
    rate_burst   integer,
    CONSTRAINT api_keys_pkey PRIMARY KEY (id),
    CONSTRAINT api_keys_secret_hash_length CHECK (octet_length(secret_hash) = 32)
);

-- +goose Down
DROP TABLE api_keys;
