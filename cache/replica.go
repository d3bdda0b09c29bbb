package cache

import (
	"context"
	"fmt"

	"userapi"
)

// Reads from replicas. When the store may serve the loader's batches from a
// streaming replica (userapi.ReplicaReader), the store alone makes sure a
// replica has replayed every write this instance acknowledged for the rows
// and the callers' session tokens (userapi.Session.After, carried by each
// call). What it cannot know of are writes acknowledged by other instances
// for callers without a token; the tiers do: such a write left a tombstone
// (or an intent) in Redis before it was acknowledged, and, through the
// notice, in the local tier. So a batch a replica answered is checked
// against what the batch's Redis lookup and the local tier know of each
// id, and every row older than that is read again from the primary
// (userapi.Session.Primary) before any caller sees it or any tier is
// filled with it.

// loadRouted is store.GetUsers for a batch when the store reads replicas.
func (s *Store) loadRouted(ctx context.Context, batch []*call, ids []int64) ([]*userapi.User, error) {
	sess := &userapi.Session{}
	for _, c := range batch {
		sess.After = max(sess.After, c.need)
	}
	if s.redis != nil && s.redis.movedWithin(2*s.cfg.ReplicaMaxLag) {
		// A new generation holds no tombstone yet: a replica's old row
		// could not be told from the current one (olderThanKnown).
		sess.Primary = true
	}
	for _, c := range batch {
		if s.redis != nil && !c.checked {
			// Redis did not answer for it (unusable, failed, or an
			// invalidation of ours pending): what other instances
			// wrote is unknown here.
			sess.Primary = true
			break
		}
	}
	users, err := s.store.GetUsers(userapi.WithSession(ctx, sess), ids)
	if err != nil || !sess.Replica {
		return users, err
	}
	byID := make(map[int64]*userapi.User, len(users))
	for _, u := range users {
		byID[u.ID] = u
	}
	var again []int64
	for _, c := range batch {
		u := byID[c.id]
		if s.olderThanKnown(c.id, c.guard, u) {
			again = append(again, c.id)
			delete(byID, c.id)
		}
	}
	if len(again) == 0 {
		return users, nil
	}
	s.m.replicaRereads.Add(float64(len(again)))
	fresh, err := s.store.GetUsers(userapi.WithSession(ctx, &userapi.Session{Primary: true}), again)
	if err != nil {
		return nil, fmt.Errorf("read again from the primary: %w", err)
	}
	out := make([]*userapi.User, 0, len(byID)+len(fresh))
	for _, u := range byID {
		out = append(out, u)
	}
	return append(out, fresh...), nil
}

// olderThanKnown reports whether u, a replica's answer for id (nil: absent),
// is older than what the tiers know: a value or tombstone of a higher
// version, a tombstone of an id that existed (a create's or update's) when
// the replica says it does not, a delete's (poison) tombstone when it says
// it does, or a write under way (an intent), whose outcome only the primary
// knows. guard is what the batch's Redis lookup found.
func (s *Store) olderThanKnown(id int64, guard *entry, u *userapi.User) bool {
	if newer(guard, u) {
		return true
	}
	if s.local != nil {
		if e, ok := s.local.get(id); ok && newer(e, u) {
			return true
		}
	}
	return false
}

// newer reports whether e knows of a newer state of the row than u.
func newer(e *entry, u *userapi.User) bool {
	if e == nil {
		return false
	}
	switch e.kind {
	case kindIntent:
		return true
	case kindTombstone:
		if u == nil {
			return e.version != poisonVersion
		}
		return e.version == poisonVersion || u.Version < e.version
	case kindValue:
		return u == nil || u.Version < e.version
	}
	return false
}
