-- The users table and the idempotency-key snapshots of creates.
--
-- Constraint names are explicit because the store tells an email conflict from
-- an idempotency-key conflict by the name in the unique-violation error.

-- +goose Up
CREATE TABLE users (
    id         bigint GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME users_id_seq),
    email      text        NOT NULL,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version    bigint      NOT NULL,
    CONSTRAINT users_pkey PRIMARY KEY (id),
    CONSTRAINT users_email_key UNIQUE (email)
);

-- The first result of a create made with an Idempotency-Key. There is no
-- foreign key to users: a retry must get the first answer back even after the
-- user was changed or deleted.
CREATE TABLE idempotency_keys (
    key        text        NOT NULL,
    user_id    bigint      NOT NULL,
    email      text        NOT NULL,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL,
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (key)
);

-- +goose Down
DROP TABLE idempotency_keys;
DROP TABLE users;
