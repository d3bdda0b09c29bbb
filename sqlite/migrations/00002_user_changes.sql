-- Every change of users is recorded in user_changes, whoever makes it (this
-- process, another process on the same file, the sqlite3 shell), and every
-- update moves version and updated_at.
--
-- user_changes is the change stream of this store (sqlite/changes.go,
-- internal/changetable): one row per changed user, written by the triggers
-- below in the writer's own transaction. It holds only changes no follower
-- has applied yet: the leading process reads the oldest rows, invalidates the
-- cache, then deletes exactly those rows. A marker row (seq 0, user_id 0),
-- added by the leader, tells it the table was not emptied or re-created
-- behind its back.
--
-- Times are unix microseconds (UTC) as in users, at SQLite's clock precision
-- of a millisecond; julianday('now') rather than unixepoch('subsec'), which
-- SQLite before 3.42 (an older sqlite3 shell on the same file) lacks.

-- +goose Up
-- AUTOINCREMENT: sequence numbers are never reused, even after the newest
-- rows were deleted.
CREATE TABLE user_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    INTEGER NOT NULL,
    -- The row's version after the change; 0 for a delete.
    version    INTEGER NOT NULL,
    changed_at INTEGER NOT NULL
) STRICT;

-- An UPDATE that leaves version alone gets the next one, and the statement's
-- time as updated_at unless it set one (moved past the old value, as the
-- clock has only millisecond precision): otherwise the cache's version guard,
-- ETag/304 and If-Match would take the changed row for the old one. SQLite's
-- triggers cannot change NEW, so this one updates the row again; with
-- recursive_triggers off (the default) that update does not fire it again.
-- The service's own updates move both and are left as they are.
-- +goose StatementBegin
CREATE TRIGGER users_move_version AFTER UPDATE ON users FOR EACH ROW
WHEN NEW.version <= OLD.version
BEGIN
    UPDATE users
    SET
        version = OLD.version + 1,
        updated_at = CASE
            WHEN NEW.updated_at = OLD.updated_at
                THEN max(OLD.updated_at + 1, CAST(round((julianday('now') - 2440587.5) * 86400000) AS INTEGER) * 1000)
            ELSE NEW.updated_at
        END
    WHERE id = NEW.id;
END;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE TRIGGER users_changes_insert AFTER INSERT ON users FOR EACH ROW
BEGIN
    INSERT INTO user_changes (user_id, version, changed_at)
    VALUES (NEW.id, NEW.version, CAST(round((julianday('now') - 2440587.5) * 86400000) AS INTEGER) * 1000);
END;
-- +goose StatementEnd

-- An update whose version did not move is recorded by the update that
-- users_move_version makes. An UPDATE that changes a row's id deletes the
-- old id.
-- +goose StatementBegin
CREATE TRIGGER users_changes_update AFTER UPDATE ON users FOR EACH ROW
WHEN NEW.version > OLD.version OR NEW.id <> OLD.id
BEGIN
    INSERT INTO user_changes (user_id, version, changed_at)
    SELECT OLD.id, 0, CAST(round((julianday('now') - 2440587.5) * 86400000) AS INTEGER) * 1000
    WHERE NEW.id <> OLD.id;
    INSERT INTO user_changes (user_id, version, changed_at)
    VALUES (NEW.id, NEW.version, CAST(round((julianday('now') - 2440587.5) * 86400000) AS INTEGER) * 1000);
END;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE TRIGGER users_changes_delete AFTER DELETE ON users FOR EACH ROW
BEGIN
    INSERT INTO user_changes (user_id, version, changed_at)
    VALUES (OLD.id, 0, CAST(round((julianday('now') - 2440587.5) * 86400000) AS INTEGER) * 1000);
END;
-- +goose StatementEnd

-- +goose Down
DROP TRIGGER users_changes_delete;
DROP TRIGGER users_changes_update;
DROP TRIGGER users_changes_insert;
DROP TRIGGER users_move_version;
DROP TABLE user_changes;
