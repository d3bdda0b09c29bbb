package userapi

import (
	"context"
	"fmt"
	"strconv"
	"strings"
)

// Position is a point in the database's commit history, for read-your-writes
// across read replicas: on PostgreSQL, a WAL location (LSN). A read that must
// reflect a write is served only by a server that has replayed at least the
// write's position. 0 is "no position".
type Position uint64

// String formats p as PostgreSQL prints an LSN: two hexadecimal halves,
// "16/B374D848".
func (p Position) String() string {
	return strconv.FormatUint(uint64(p>>32), 16) + "/" + strconv.FormatUint(uint64(p&0xFFFFFFFF), 16)
}

// ParsePosition parses the form String writes (upper or lower case).
func ParsePosition(s string) (Position, error) {
	hi, lo, ok := strings.Cut(s, "/")
	if !ok || hi == "" || lo == "" || len(hi) > 8 || len(lo) > 8 {
		return 0, fmt.Errorf("position %q is not of the form 16/B374D848", s)
	}
	h, err := strconv.ParseUint(hi, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("position %q is not of the form 16/B374D848", s)
	}
	l, err := strconv.ParseUint(lo, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("position %q is not of the form 16/B374D848", s)
	}
	return Position(h<<32 | l), nil
}

// Session carries one request's read-your-writes state between the HTTP
// layer and a store that reads from replicas. It is not safe for concurrent
// use: one request's calls run one after another.
type Session struct {
	// After is the position every read of the request must reflect (the
	// client's session token); 0 adds nothing to what the store requires
	// on its own.
	After Position
	// Primary makes the reads go to the primary, whatever the replicas have
	// replayed (the cache asks for it when a replica's row is older than a
	// version it knows of).
	Primary bool
	// Wrote is set by the store when a write of the request commits: the
	// position a later read must reach to see it (the token the client gets
	// back).
	Wrote Position
	// Replica is set by the store when a read was served by a replica.
	Replica bool
}

type sessionKey struct{}

// WithSession returns ctx carrying s.
func WithSession(ctx context.Context, s *Session) context.Context {
	return context.WithValue(ctx, sessionKey{}, s)
}

// SessionFrom returns the session ctx carries, or nil.
func SessionFrom(ctx context.Context) *Session {
	s, _ := ctx.Value(sessionKey{}).(*Session)
	return s
}

// ReplicaReader is implemented by stores that may serve reads from
// replicas (PostgreSQL with --db-replica). Callers that keep their own
// copies of rows (the cache) ask it to decide whether to check a replica's
// rows against the versions they know of.
type ReplicaReader interface {
	// ReadsReplicas reports whether reads may be served by a replica.
	ReadsReplicas() bool
}
