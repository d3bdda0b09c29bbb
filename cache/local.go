package cache

import (
	"fmt"
	"time"

	"github.com/maypok86/otter/v2"
)

// kind is what an entry says about its id.
type kind uint8

const (
	kindValue     kind = iota + 1 // the row, encoded, at version
	kindAbsent                    // no such row (negative entry); version 0
	kindTombstone                 // versions below version are stale; never served
	// kindIntent: a write of the id is under way (see Store.intend). It
	// rejects every fill and is never served; the write's invalidation
	// replaces it with a tombstone, and if the writer died first it
	// expires like one. version carries the highest version the entry it
	// replaced knew of, so that the tombstone keeps guarding it.
	kindIntent
)

// guards reports whether k is a guard against stale fills rather than data:
// a guard is never served and stays in force across channel epochs.
func (k kind) guards() bool { return k == kindTombstone || k == kindIntent }

// entry is one cached id, in either tier. It is immutable once installed.
type entry struct {
	kind    kind
	version int64
	json    []byte        // kindValue only
	epoch   uint64        // local tier: the channel epoch its data was read in
	ttl     time.Duration // lifetime from installation
}

// entryOverhead approximates an entry's memory beyond its JSON: the entry
// struct (64 bytes with its size class), otter's node (about 84 bytes in a
// heap profile of a full cache), its hash-table slot and sketch counters
// (about 20), and the JSON's size-class rounding.
const entryOverhead = 176

// localTier is the in-process tier: an otter cache of entries by id,
// bounded by bytes.
type localTier struct {
	c *otter.Cache[int64, *entry]
}

func newLocalTier(maxBytes int64) (*localTier, error) {
	c, err := otter.New(&otter.Options[int64, *entry]{
		MaximumWeight: uint64(maxBytes),
		// Guards weigh nothing, so size pressure never evicts one before
		// it has done its job (rejecting stale fills); they are few (one
		// per write in the last TombstoneTTL) and small.
		Weigher: func(_ int64, e *entry) uint32 {
			if e.kind.guards() {
				return 0
			}
			return uint32(entryOverhead + len(e.json))
		},
		ExpiryCalculator: otter.ExpiryWritingFunc(func(e otter.Entry[int64, *entry]) time.Duration {
			return e.Value.ttl
		}),
	})
	if err != nil {
		return nil, fmt.Errorf("local tier: %w", err)
	}
	return &localTier{c: c}, nil
}

func (l *localTier) get(id int64) (*entry, bool) { return l.c.GetIfPresent(id) }

// fill installs e if admit allows and the channel epoch is still e.epoch
// and up; the check and the write are one atomic step (otter's Compute
// holds the key's bucket lock), so a tombstone or an epoch change that
// lands first always wins.
func (l *localTier) fill(id int64, e *entry, state *epoch) fillResult {
	res := fillSkipped
	l.c.Compute(id, func(old *entry, found bool) (*entry, otter.ComputeOp) {
		cur := state.Load()
		if cur != e.epoch || cur&1 == 0 {
			res = fillSkipped
			return old, otter.CancelOp
		}
		if !found {
			old = nil
		}
		res = admit(old, e, found && !old.kind.guards() && old.epoch != cur)
		if res != fillInstalled {
			return old, otter.CancelOp
		}
		return e, otter.WriteOp
	})
	return res
}

// tombstone makes the tier reject fills of id below version, for ttl,
// unless it already holds that version or a newer one. It resolves an
// intent whatever the versions: the write it announced has finished. A
// release (version 0: the write changed nothing) only resolves an intent.
func (l *localTier) tombstone(id, version int64, ttl time.Duration) {
	l.c.Compute(id, func(old *entry, found bool) (*entry, otter.ComputeOp) {
		v := version
		switch {
		case found && old.kind == kindIntent:
			v = max(v, old.version)
		case version == releaseVersion, found && old.kind != kindAbsent && old.version >= version:
			return old, otter.CancelOp
		}
		return &entry{kind: kindTombstone, version: v, ttl: ttl}, otter.WriteOp
	})
}

// intent marks id as being written, for ttl or until the write's
// tombstone resolves it: until then no fill is accepted and nothing is
// served.
// guardMargin lengthens a local intent beyond the Redis intent it mirrors.
// The two are set within microseconds of each other and would expire
// together, but the local tier's clock is not Redis's: a local intent that
// went first let a read fill the local tier while Redis still refused the
// same row (the intent), and Redis then stayed without it until the local
// entry expired, minutes later.
const guardMargin = 20 * time.Millisecond

func (l *localTier) intent(id int64, ttl time.Duration) {
	l.c.Compute(id, func(old *entry, found bool) (*entry, otter.ComputeOp) {
		var v int64
		if found && old.kind != kindAbsent {
			v = old.version
		}
		return &entry{kind: kindIntent, version: v, ttl: ttl + guardMargin}, otter.WriteOp
	})
}

// flush drops every entry. It is called when the notice channel comes
// back, so it may drop tombstones too: fills that they would have rejected
// were started in an earlier epoch and are rejected for that.
func (l *localTier) flush() { l.c.InvalidateAll() }

// bytes is the weight of the entries held.
func (l *localTier) bytes() uint64 { return l.c.WeightedSize() }
