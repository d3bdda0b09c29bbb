package sqlite

import (
	"database/sql"
	"testing"

	"userapi/internal/testenv"
	"userapi/storetest"
)

func TestChangeTable(t *testing.T) {
	storetest.RunChangeTable(t, storetest.ChangeTable{
		// Two stores on one file stand for two processes: each has its own
		// connections, and flock excludes two followers in one process.
		NewStore: func(t *testing.T) (storetest.ChangeTableStore, storetest.ChangeTableStore) {
			s1, path := newStore(t, Options{})
			s2, err := Open(testenv.Context(t), "sqlite:"+path, Options{})
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			t.Cleanup(func() { s2.Close() })
			return s1, s2
		},
		DB: func(t *testing.T, s storetest.ChangeTableStore) *sql.DB {
			db, err := openWriter(s.(*Store).path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			return db
		},
		CreateUpdateTrigger: `
			CREATE TRIGGER users_changes_update AFTER UPDATE ON users FOR EACH ROW
			WHEN NEW.version > OLD.version
			BEGIN
				INSERT INTO user_changes (user_id, version, changed_at) VALUES (NEW.id, NEW.version, 0);
			END`,
	})
}
