package bench

import (
	"fmt"
	"math/bits"
	"math/rand/v2"
	"strconv"
	"strings"
)

// Op is one kind of request the generator sends.
type Op uint8

// The operations. The numbering is part of no external format; names are.
const (
	OpRead   Op = iota // GET /users/{id}
	OpList             // GET /users?limit=…&cursor=… following next_cursor
	OpUpdate           // PATCH /users/{id} with If-Match from an earlier read
	OpCreate           // POST /users with a unique email
	numOps
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpList:
		return "list"
	case OpUpdate:
		return "update"
	case OpCreate:
		return "create"
	}
	return "op" + strconv.Itoa(int(o))
}

// Mix is the relative weight of each operation, indexed by Op.
type Mix [numOps]int

// ParseMix parses "read=80,list=5,update=10,create=5". Weights are
// relative (they need not sum to 100); omitted operations get 0.
func ParseMix(s string) (Mix, error) {
	var m Mix
	total := 0
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, val, ok := strings.Cut(part, "=")
		if !ok {
			return m, fmt.Errorf("--mix %q: want op=weight, got %q", s, part)
		}
		op, ok := opByName(strings.TrimSpace(name))
		if !ok {
			return m, fmt.Errorf("--mix %q: unknown operation %q (want read, list, update, create)", s, name)
		}
		w, err := strconv.Atoi(strings.TrimSpace(val))
		if err != nil || w < 0 || w > 1_000_000 {
			return m, fmt.Errorf("--mix %q: weight of %s must be an integer in 0..1000000", s, op)
		}
		m[op] = w
		total += w
	}
	if total == 0 {
		return m, fmt.Errorf("--mix %q: weights must not all be zero", s)
	}
	return m, nil
}

func opByName(name string) (Op, bool) {
	for op := range numOps {
		if op.String() == name {
			return op, true
		}
	}
	return 0, false
}

// String formats m as ParseMix reads it, leaving out zero weights.
func (m Mix) String() string {
	var parts []string
	for op := range numOps {
		if m[op] > 0 {
			parts = append(parts, op.String()+"="+strconv.Itoa(m[op]))
		}
	}
	return strings.Join(parts, ",")
}

// Workload is what requests are sent.
type Workload struct {
	Kind    string  // "uniform", "zipf" or "mixed"; informative, Mix and KeyDist decide
	IDs     int64   // user ids 1..IDs are drawn; they should exist (seeded)
	ZipfS   float64 // Zipf exponent, > 1
	KeyDist string  // "uniform" or "zipf": how ids are drawn for reads and updates
	Mix     Mix
	// ListLimit is the page size of list requests.
	ListLimit int
}

func (w *Workload) validate() error {
	switch w.Kind {
	case "uniform", "zipf", "mixed":
	default:
		return fmt.Errorf("--workload %q: want uniform, zipf or mixed", w.Kind)
	}
	switch w.KeyDist {
	case "uniform", "zipf":
	default:
		return fmt.Errorf("--key-dist %q: want uniform or zipf", w.KeyDist)
	}
	if w.IDs < 1 {
		return fmt.Errorf("--ids must be at least 1")
	}
	// math/rand/v2's Zipf needs s > 1.
	if w.KeyDist == "zipf" && !(w.ZipfS > 1) {
		return fmt.Errorf("--zipf-s must be greater than 1")
	}
	if w.ListLimit < 1 || w.ListLimit > 1000 {
		return fmt.Errorf("--list-limit must be in 1..1000")
	}
	total := 0
	for _, v := range w.Mix {
		if v < 0 {
			return fmt.Errorf("mix weights must not be negative")
		}
		total += v
	}
	if total == 0 {
		return fmt.Errorf("the mix has no operations")
	}
	return nil
}

// picker draws operations and ids for one sender. It is not safe for
// concurrent use; every sender has its own, seeded differently, so senders
// share no lock and no cache line.
type picker struct {
	r     *rand.Rand
	zipf  *rand.Zipf // nil for uniform keys
	keys  keyspace
	cum   [numOps]uint64 // cumulative weights
	total uint64
}

func newPicker(w *Workload, seed1, seed2 uint64) *picker {
	p := &picker{r: rand.New(rand.NewPCG(seed1, seed2)), keys: newKeyspace(uint64(w.IDs))}
	for op := range numOps {
		p.total += uint64(w.Mix[op])
		p.cum[op] = p.total
	}
	if w.KeyDist == "zipf" && w.IDs > 1 {
		p.zipf = rand.NewZipf(p.r, w.ZipfS, 1, uint64(w.IDs-1))
	}
	return p
}

// op draws the next operation according to the mix.
func (p *picker) op() Op {
	if p.cum[OpRead] == p.total {
		return OpRead // read-only workloads draw no random number here
	}
	x := p.r.Uint64N(p.total)
	for op := range numOps {
		if x < p.cum[op] {
			return op
		}
	}
	return OpRead
}

// id draws the next user id in 1..IDs.
func (p *picker) id() int64 {
	if p.zipf == nil {
		return 1 + int64(p.r.Uint64N(p.keys.n))
	}
	return p.keys.id(p.zipf.Uint64())
}

// keyspace maps Zipf ranks (0 is the most popular) onto ids 1..n by a
// bijection that scatters them, so the hot set is not a run of adjacent ids
// that would share database pages and flatter an uncached server.
type keyspace struct {
	n    uint64
	mult uint64 // coprime with n, so rank*mult mod n is a permutation
}

func newKeyspace(n uint64) keyspace {
	if n < 1 {
		n = 1
	}
	const golden = 0x9E3779B97F4A7C15 // 2^64/φ: spreads consecutive ranks far apart
	m := golden % n
	for m == 0 || gcd(m, n) != 1 {
		m++
		if m >= n {
			m = 1
		}
	}
	return keyspace{n: n, mult: m}
}

func (k keyspace) id(rank uint64) int64 {
	hi, lo := bits.Mul64(rank%k.n, k.mult)
	return 1 + int64(bits.Rem64(hi, lo, k.n))
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}
