-- Every change of users is recorded in user_changes, whoever makes it, and
-- every update moves version and updated_at.
--
-- user_changes is the change stream of this store (mysql/changes.go,
-- internal/changetable): one row per changed user, written by the triggers
-- below in the writer's own transaction, so it commits or rolls back with the
-- change. It holds only changes no follower has applied yet: the leading
-- instance reads the oldest rows, invalidates the cache, then deletes exactly
-- those rows. A marker row (seq 0, user_id 0), added by the leader, tells it
-- the table was not emptied or re-created behind its back.
--
-- Creating triggers needs the TRIGGER privilege, and SUPER too when binary
-- logging is on and log_bin_trust_function_creators is off.

-- +goose Up
CREATE TABLE user_changes (
    seq BIGINT NOT NULL AUTO_INCREMENT,
    user_id BIGINT NOT NULL,
    -- The row's version after the change; 0 for a delete.
    version BIGINT NOT NULL,
    -- When the statement ran (UTC), not when it committed: MariaDB has no
    -- commit time to give. The follower's lag is measured from it.
    changed_at DATETIME(6) NOT NULL,
    PRIMARY KEY (seq)
) ENGINE = InnoDB;

-- An UPDATE that leaves version alone (psql, a migration, another program)
-- gets the next one, and the statement's time as updated_at unless it set
-- one: otherwise the cache's version guard, ETag/304 and If-Match would take
-- the changed row for the old one. The service's own updates move both and
-- are left as they are.
-- +goose StatementBegin
CREATE TRIGGER users_move_version BEFORE UPDATE ON users FOR EACH ROW
BEGIN
    IF NEW.version <= OLD.version THEN
        SET NEW.version = OLD.version + 1;
        IF NEW.updated_at = OLD.updated_at THEN
            SET NEW.updated_at = UTC_TIMESTAMP(6);
        END IF;
    END IF;
END
-- +goose StatementEnd

CREATE TRIGGER users_changes_insert AFTER INSERT ON users FOR EACH ROW
    INSERT INTO user_changes (user_id, version, changed_at)
    VALUES (NEW.id, NEW.version, UTC_TIMESTAMP(6));

-- An UPDATE that changes a row's id deletes the old id.
-- +goose StatementBegin
CREATE TRIGGER users_changes_update AFTER UPDATE ON users FOR EACH ROW
BEGIN
    IF NEW.id <> OLD.id THEN
        INSERT INTO user_changes (user_id, version, changed_at)
        VALUES (OLD.id, 0, UTC_TIMESTAMP(6));
    END IF;
    INSERT INTO user_changes (user_id, version, changed_at)
    VALUES (NEW.id, NEW.version, UTC_TIMESTAMP(6));
END
-- +goose StatementEnd

CREATE TRIGGER users_changes_delete AFTER DELETE ON users FOR EACH ROW
    INSERT INTO user_changes (user_id, version, changed_at)
    VALUES (OLD.id, 0, UTC_TIMESTAMP(6));

-- +goose Down
DROP TRIGGER users_changes_delete;
DROP TRIGGER users_changes_update;
DROP TRIGGER users_changes_insert;
DROP TRIGGER users_move_version;
DROP TABLE user_changes;
