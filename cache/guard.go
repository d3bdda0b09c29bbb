package cache

import (
	"fmt"
	"sync/atomic"
)

// The guard rules: what stops a stale read. They are enforced twice, here in
// Go for the local tier and in Lua for Redis (fillScript, invalidateScript,
// intentScript in redis.go); TestGuardRulesAgree runs one table of states
// and operations through both. The invariants:
//
//  1. Versions only go up. A fill of version v is rejected by a value or
//     tombstone of a higher version (admit).
//  2. A write's tombstone is installed after its commit and before it
//     returns (Store.invalidate), and by the change stream's leader for every
//     commit, whoever made it (Store.applyChanges); it lives TombstoneTTL.
//  3. A fill whose read began more than TombstoneTTL/2 ago is dropped
//     (Store.fill), so no tombstone that should reject it has expired.
//  4. An intent rejects every fill until the write's tombstone replaces it
//     or it expires; it is never served (admit, localTier.intent).
//  5. A local entry is served only in the epoch it was filled in, and the
//     epoch moves whenever invalidations may have been missed: the notice
//     channel or the Redis tier went unusable, or the key generation moved
//     (Store.state, redisTier.refreshGate, adoptGen).
//  6. A Redis fill is sent only if the Redis tier has been usable, in one
//     health epoch, since its read began (redisTier.fill), and is refused by
//     any Redis but the one last probed (fillScript's run-id check).
//  7. A local copy of a Redis entry lives no longer than the Redis entry
//     (redisTier.get).
//  8. When changes may have been missed, every instance moves to a new key
//     generation, never one used before (probeScript, moveGeneration).

// fillResult is the outcome of a version-guarded fill.
type fillResult int

const (
	fillInstalled fillResult = iota
	fillStale                // the tier holds a newer version or a tombstone that rejects it
	fillUnchanged            // the tier already holds the same
	fillSkipped              // the channel epoch changed since the read, or the tier is unusable
)

// admit decides a fill of e over old, the same rule in both tiers (Redis
// runs it as the fill script):
//   - an intent rejects every fill;
//   - a value is rejected by a tombstone or value of a higher version, and
//     replaces anything else (an absence is older than any value: an id
//     that is deleted gets a poison tombstone first, and a fill is dropped
//     long before that tombstone expires);
//   - an absence is accepted only where nothing is cached: a tombstone or
//     value means the id existed after the absence was read.
//
// stale reports that old is a local entry of a dead epoch, which is no
// longer served and is replaced by an equal one.
func admit(old, e *entry, stale bool) fillResult {
	if old == nil {
		return fillInstalled
	}
	if old.kind == kindIntent {
		// The read may have come before the write's commit, and the
		// write's version is not known yet.
		return fillStale
	}
	switch e.kind {
	case kindValue:
		switch {
		case old.kind == kindAbsent:
			return fillInstalled
		case e.version < old.version:
			return fillStale
		case e.version == old.version && old.kind == kindValue && !stale:
			return fillUnchanged
		}
		return fillInstalled
	case kindAbsent:
		switch {
		case old.kind != kindAbsent:
			return fillStale
		case stale:
			return fillInstalled
		}
		return fillUnchanged
	}
	panic(fmt.Sprintf("cache: admit of kind %d", e.kind))
}

// epoch counts the transitions of something that is up or down (the notice
// channel, the Redis tier's usability): it goes up by one at every change
// and is odd while up, and renew starts a new epoch while staying up. Work
// that began in one epoch and ends in another (a fill whose read straddled
// an outage) is dropped by comparing the two.
type epoch struct{ atomic.Uint64 }

// up reports whether the current epoch is an up one.
func (e *epoch) up() bool { return e.Load()&1 == 1 }

// set moves to up or down and reports whether that was a change.
func (e *epoch) set(up bool) bool {
	for {
		v := e.Load()
		if (v&1 == 1) == up {
			return false
		}
		if e.CompareAndSwap(v, v+1) {
			return true
		}
	}
}

// renew starts a new up epoch and reports whether it did: while down it
// does nothing, since coming up starts a new epoch anyway.
func (e *epoch) renew() bool {
	for {
		v := e.Load()
		if v&1 == 0 {
			return false
		}
		if e.CompareAndSwap(v, v+2) {
			return true
		}
	}
}
