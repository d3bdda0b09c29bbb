-- Every update of a user moves its version and updated_at, whoever makes it.
--
-- The service's own updates set version = version + 1 and updated_at. A write
-- made outside the service (psql, a migration, another program) may not; then
-- the cache's version guard, ETag/304 and If-Match would all take the changed
-- row for the old one. This trigger gives such an update the next version and
-- the time of its statement.

-- +goose Up
-- +goose StatementBegin
CREATE FUNCTION users_move_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.version <= OLD.version THEN
        NEW.version := OLD.version + 1;
        IF NEW.updated_at = OLD.updated_at THEN
            NEW.updated_at := date_trunc('microseconds', statement_timestamp());
        END IF;
    END IF;
    RETURN NEW;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER users_move_version
    BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION users_move_version();

-- +goose Down
DROP TRIGGER users_move_version ON users;
DROP FUNCTION users_move_version();
