package mysql

import (
	"database/sql"
	"strconv"
	"testing"

	"userapi/internal/testenv"
	"userapi/storetest"
)

func TestChangeTable(t *testing.T) {
	storetest.RunChangeTable(t, storetest.ChangeTable{
		NewStore: func(t *testing.T) (storetest.ChangeTableStore, storetest.ChangeTableStore) {
			url := newDatabase(t)
			var s [2]*Store
			for i := range s {
				var err error
				if s[i], err = Open(testenv.Context(t), url, Options{Migrate: true}); err != nil {
					t.Fatalf("Open: %v", err)
				}
				t.Cleanup(func() { s[i].Close() })
			}
			return s[0], s[1]
		},
		DB: func(t *testing.T, s storetest.ChangeTableStore) *sql.DB {
			db, err := sql.Open("mysql", s.(*Store).cfg.FormatDSN())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			return db
		},
		CreateUpdateTrigger: `
			CREATE TRIGGER users_changes_update AFTER UPDATE ON users FOR EACH ROW
			INSERT INTO user_changes (user_id, version, changed_at) VALUES (NEW.id, NEW.version, UTC_TIMESTAMP(6))`,
		LateCommit: true,
		// The server frees the leader's lock when its connection ends.
		CutLeader: func(t *testing.T, s storetest.ChangeTableStore, db *sql.DB) {
			var holder int64
			if err := db.QueryRow(`SELECT IS_USED_LOCK(?)`, lockName(s.(*Store).cfg.DBName)).Scan(&holder); err != nil {
				t.Fatal(err)
			}
			if _, err := db.Exec(`KILL CONNECTION ` + strconv.FormatInt(holder, 10)); err != nil {
				t.Fatal(err)
			}
		},
	})
}
