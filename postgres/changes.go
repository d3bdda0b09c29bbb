package postgres

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"userapi"
)

var _ userapi.ChangeFeed = (*Store)(nil)

// The change stream is logical replication of the users table with the
// built-in pgoutput plugin: a publication of users' id and version, and one
// permanent slot that keeps every committed change until a follower has
// applied it. docs/stores.md describes it.

// ErrLogicalOff is wrapped by FollowChanges when the server's wal_level is
// not logical: the stream cannot run until an operator changes it.
var ErrLogicalOff = errors.New("wal_level is not logical")

// leaseRetry is how often a follower asks for the slot while another one
// reads it. The slot's own exclusivity is the lead: PostgreSQL lets one
// walsender use a slot at a time, and frees it as soon as the leader's
// connection ends, so a standby takes over within this interval of a
// crash the server notices (a closed socket); a leader cut off silently is
// noticed by the server after wal_sender_timeout (60 s by default).
const leaseRetry = 250 * time.Millisecond

// statusInterval is how often the follower reports its position when idle.
// The server's wal_sender_timeout (60 s) ends a silent follower; this is
// far below it, and rare enough to cost nothing.
const statusInterval = 5 * time.Second

// slotName is the slot and publication the store's change stream uses.
func (s *Store) slotName(ctx context.Context) (string, error) {
	if s.changeSlot != "" {
		return s.changeSlot, nil // checked by Open
	}
	var db string
	if err := s.pool.QueryRow(ctx, `SELECT current_database()`).Scan(&db); err != nil {
		return "", fmt.Errorf("change stream: %w", translate(err))
	}
	return defaultSlot(db), nil
}

var notSlotChar = regexp.MustCompile(`[^a-z0-9_]`)

// checkSlotName applies PostgreSQL's rule for slot names. The name is also
// the publication's, and is written into SQL (quoted where it is an
// identifier), so nothing else may pass.
func checkSlotName(n string) error {
	if n == "" || notSlotChar.MatchString(n) || len(n) > 63 {
		return fmt.Errorf("change stream: slot name %q: use 1 to 63 lower-case letters, digits and underscores", n)
	}
	return nil
}

// defaultSlot is "userapi_" and the database's name in the characters a
// slot name may have, at most 63 bytes: slots belong to the whole server,
// so two databases on one server get two slots.
func defaultSlot(db string) string {
	n := "userapi_" + notSlotChar.ReplaceAllString(strings.ToLower(db), "_")
	return n[:min(len(n), 63)]
}

// FollowChanges implements userapi.ChangeFeed with logical replication. It
// creates the publication and the slot when they are missing (a new slot
// calls missed: what happened before it is unknown) and fails with an
// error wrapping ErrLogicalOff when wal_level is not logical.
func (s *Store) FollowChanges(ctx context.Context, apply func(context.Context, []userapi.Change) error, missed func(context.Context) error) error {
	if err := s.CheckChangeFeed(ctx); err != nil {
		return err
	}
	slot, err := s.slotName(ctx)
	if err != nil {
		return err
	}
	if err := s.ensurePublication(ctx, slot); err != nil {
		return err
	}
	s.followed.Store(&slot)
	for {
		err := s.followOnce(ctx, slot, apply, missed)
		if !errors.Is(err, errSlotBusy) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(leaseRetry):
		}
	}
}

// CheckChangeFeed reports whether FollowChanges can run: an error wrapping
// ErrLogicalOff, with the fix in its text, when wal_level is not logical.
func (s *Store) CheckChangeFeed(ctx context.Context) error {
	if s.pool == nil {
		return errors.New("change stream: needs the pool (NoPool is a benchmark mode)")
	}
	var level string
	if err := s.pool.QueryRow(ctx, `SHOW wal_level`).Scan(&level); err != nil {
		return fmt.Errorf("change stream: %w", translate(err))
	}
	if level != "logical" {
		return fmt.Errorf("change stream: the server's wal_level is %q: set wal_level = logical in postgresql.conf and restart PostgreSQL: %w", level, ErrLogicalOff)
	}
	return nil
}

var errSlotBusy = errors.New("slot in use by another follower")

func (s *Store) ensurePublication(ctx context.Context, name string) error {
	var n int
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM pg_publication WHERE pubname = $1`, name).Scan(&n); err != nil {
		return fmt.Errorf("change stream: %w", translate(err))
	}
	if n > 0 {
		return nil
	}
	// id and version are all an invalidation needs; id is the replica
	// identity, so a delete carries it too.
	_, err := s.pool.Exec(ctx, `CREATE PUBLICATION `+pgx.Identifier{name}.Sanitize()+` FOR TABLE users (id, version)`)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "42710" { // duplicate_object: another instance won
		return nil
	}
	if err != nil {
		return fmt.Errorf("change stream: create publication: %w", translate(err))
	}
	return nil
}

// followOnce connects for replication, makes sure the slot exists and
// streams from it until ctx ends or something fails.
func (s *Store) followOnce(ctx context.Context, slot string, apply func(context.Context, []userapi.Change) error, missed func(context.Context) error) error {
	cfg := s.direct.Copy() // a proxy in front of the pool cannot carry replication
	cfg.RuntimeParams["replication"] = "database"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("change stream: connect: %w", translate(err))
	}
	defer conn.Close(context.WithoutCancel(ctx))

	found, err := s.usableSlot(ctx, conn, slot)
	if err != nil {
		return err
	}
	if !found {
		_, err := pglogrepl.CreateReplicationSlot(ctx, conn, slot, "pgoutput",
			pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "NOEXPORT_SNAPSHOT"})
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "42710" { // another instance created it
			return errSlotBusy
		}
		if err != nil {
			return fmt.Errorf("change stream: create slot %s: %w", slot, err)
		}
		// Changes committed while there was no slot were seen by no one.
		if err := missed(ctx); err != nil {
			return fmt.Errorf("change stream: new slot: %w", err)
		}
	}
	err = pglogrepl.StartReplication(ctx, conn, slot, 0, pglogrepl.StartReplicationOptions{
		Mode:       pglogrepl.LogicalReplication,
		PluginArgs: []string{"proto_version '1'", "publication_names '\"" + slot + "\"'"},
	})
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "55006" { // object_in_use: another follower leads
		return errSlotBusy
	}
	if err != nil {
		return fmt.Errorf("change stream: start replication: %w", err)
	}
	return s.stream(ctx, conn, apply, missed)
}

// usableSlot reports whether the slot exists and can be read, and
// errSlotBusy when another follower reads it. A slot the server has
// invalidated (wal_status lost: it fell further behind than
// max_slot_wal_keep_size allows, and the WAL it needed is gone) can never
// be read again: it is dropped, so that the caller creates a new one and
// the changes it lost count as missed.
func (s *Store) usableSlot(ctx context.Context, conn *pgconn.PgConn, slot string) (bool, error) {
	var active, lost bool
	err := s.pool.QueryRow(ctx, `
SELECT active, coalesce(wal_status = 'lost', false)
FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&active, &lost)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("change stream: %w", translate(err))
	case active:
		return false, errSlotBusy
	case !lost:
		return true, nil
	}
	// Dropped on the replication connection, whose role has the
	// REPLICATION right the pool's may lack, and only if it is still lost
	// and idle: another follower may have dropped it and created a new
	// one since it was read.
	res, err := conn.Exec(ctx, `
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
WHERE slot_name = '`+slot+`' AND NOT active AND wal_status = 'lost'`).ReadAll()
	var pe *pgconn.PgError
	switch {
	case errors.As(err, &pe) && (pe.Code == "42704" || pe.Code == "55006"): // dropped, or taken, meanwhile
		return false, errSlotBusy
	case err != nil:
		return false, fmt.Errorf("change stream: drop the lost slot %s: %w", slot, err)
	}
	if len(res) == 0 || len(res[0].Rows) == 0 {
		return false, errSlotBusy // another follower got there first: look again
	}
	return false, nil
}

// stream reads the slot's messages and hands the changes of committed
// transactions to apply, several transactions at a time: a batch is applied
// when a receive would wait batchWindow for more, or when it holds
// maxBatch changes. A transaction's end is acknowledged only after apply
// returned nil for it.
func (s *Store) stream(ctx context.Context, conn *pgconn.PgConn, apply func(context.Context, []userapi.Change) error, missed func(context.Context) error) error {
	var (
		applied   pglogrepl.LSN // every transaction up to here is applied
		inTx      bool
		changes   []userapi.Change // of committed transactions not yet applied, and of the open one
		committed int              // how many of changes belong to committed transactions
		batchEnd  pglogrepl.LSN    // the end of the last committed transaction in changes
		flushBy   time.Time        // when the batch is applied if nothing else arrives
		massive   bool             // the open transaction changed more than massChange rows
		relID     uint32           // the users relation's id in this stream
		versionAt = -1             // the version column's position in its tuples
		idAt      = -1
		nextAck   = time.Now().Add(statusInterval)
	)
	ack := func() error {
		nextAck = time.Now().Add(statusInterval)
		return pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{WALWritePosition: applied})
	}
	col := func(t *pglogrepl.TupleData, at int) (int64, error) {
		if t == nil || at < 0 || at >= len(t.Columns) {
			return 0, errors.New("change stream: tuple without the column")
		}
		return t.Columns[at].Int64()
	}
	flush := func() error {
		if err := apply(ctx, changes[:committed]); err != nil {
			return fmt.Errorf("change stream: apply: %w", err)
		}
		applied = batchEnd
		changes = append(changes[:0], changes[committed:]...)
		committed = 0
		if soon := time.Now().Add(ackDelay); soon.Before(nextAck) {
			nextAck = soon
		}
		return nil
	}
	// add keeps a change of the open transaction; past massChange rows the
	// transaction is handled as a whole instead (see massChange).
	add := func(c userapi.Change) {
		if massive {
			return
		}
		if len(changes)-committed >= massChange {
			massive = true
			changes = changes[:committed]
			return
		}
		changes = append(changes, c)
	}
	for {
		if committed > 0 && (committed >= maxBatch || !time.Now().Before(flushBy)) {
			if err := flush(); err != nil {
				return err
			}
		}
		if time.Now().After(nextAck) && applied > 0 {
			if err := ack(); err != nil {
				return fmt.Errorf("change stream: status: %w", err)
			}
		}
		wait := nextAck
		if committed > 0 && flushBy.Before(wait) {
			wait = flushBy
		}
		rctx, cancel := context.WithDeadline(ctx, wait)
		msg, err := conn.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if pgconn.Timeout(err) {
				if committed == 0 {
					nextAck = time.Now() // report the position, then wait again
				}
				continue
			}
			return fmt.Errorf("change stream: receive: %w", err)
		}
		cd, ok := msg.(*pgproto3.CopyData)
		if !ok {
			if e, ok := msg.(*pgproto3.ErrorResponse); ok {
				return fmt.Errorf("change stream: server: %s", e.Message)
			}
			continue
		}
		switch cd.Data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err != nil {
				return fmt.Errorf("change stream: %w", err)
			}
			if !inTx && committed == 0 && ka.ServerWALEnd > applied {
				// Every transaction before the server's position has been
				// sent and applied: nothing to replay below it.
				applied = ka.ServerWALEnd
			}
			if ka.ReplyRequested {
				nextAck = time.Now()
			}
		case pglogrepl.XLogDataByteID:
			xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
			if err != nil {
				return fmt.Errorf("change stream: %w", err)
			}
			m, err := pglogrepl.Parse(xld.WALData)
			if err != nil {
				return fmt.Errorf("change stream: %w", err)
			}
			switch m := m.(type) {
			case *pglogrepl.RelationMessage:
				if m.RelationName != "users" {
					continue
				}
				relID = m.RelationID
				idAt, versionAt = -1, -1
				for i, c := range m.Columns {
					switch c.Name {
					case "id":
						idAt = i
					case "version":
						versionAt = i
					}
				}
			case *pglogrepl.BeginMessage:
				inTx, massive = true, false
			case *pglogrepl.InsertMessage:
				if m.RelationID != relID {
					continue
				}
				c, err := rowChange(col, m.Tuple, idAt, versionAt)
				if err != nil {
					return err
				}
				add(c)
			case *pglogrepl.UpdateMessage:
				if m.RelationID != relID {
					continue
				}
				c, err := rowChange(col, m.NewTuple, idAt, versionAt)
				if err != nil {
					return err
				}
				add(c)
			case *pglogrepl.DeleteMessage:
				if m.RelationID != relID {
					continue
				}
				id, err := col(m.OldTuple, idAt)
				if err != nil {
					return err
				}
				add(userapi.Change{ID: id, Deleted: true})
			case *pglogrepl.TruncateMessage:
				// The ids are not in the message: every cached row may be
				// gone, which is what missed is for.
				if err := missed(ctx); err != nil {
					return fmt.Errorf("change stream: truncate: %w", err)
				}
			case *pglogrepl.CommitMessage:
				inTx = false
				if massive {
					if committed > 0 {
						if err := flush(); err != nil {
							return err
						}
					}
					if err := missed(ctx); err != nil {
						return fmt.Errorf("change stream: a transaction of more than %d rows: %w", massChange, err)
					}
					applied = m.TransactionEndLSN
					continue
				}
				for i := committed; i < len(changes); i++ {
					changes[i].Committed = m.CommitTime
				}
				if committed == 0 {
					flushBy = time.Now().Add(batchWindow)
				}
				committed = len(changes)
				batchEnd = m.TransactionEndLSN
				if committed == 0 {
					// Nothing of users in it: nothing to apply, and no
					// reason to replay it.
					applied = batchEnd
				}
			}
		}
	}
}

// batchWindow is how long committed changes wait for more before they are
// applied: under a stream of commits, one Redis round trip then carries
// several transactions instead of one each (most of what following the
// stream costs is the wake-ups and round trips per batch), at the price of
// this much more lag.
const batchWindow = 5 * time.Millisecond

// maxBatch bounds the changes of one apply.
const maxBatch = 512

// massChange: a transaction that changes more rows than this (a bulk
// UPDATE, a backfill) starts every tier afresh, as missed does, instead of
// invalidating each row: cheaper than that many tombstones, and it bounds
// the memory of an open transaction.
const massChange = 10_000

// ackDelay batches acknowledgements under a stream of commits: a replay
// after a crash repeats at most this much, and invalidations are
// idempotent.
const ackDelay = 100 * time.Millisecond

func rowChange(col func(*pglogrepl.TupleData, int) (int64, error), t *pglogrepl.TupleData, idAt, versionAt int) (userapi.Change, error) {
	id, err := col(t, idAt)
	if err != nil {
		return userapi.Change{}, err
	}
	v, err := col(t, versionAt)
	if err != nil {
		return userapi.Change{}, err
	}
	return userapi.Change{ID: id, Version: v}, nil
}
