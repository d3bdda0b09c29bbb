package bench

import (
	"math"
	"testing"
)

func TestParseMix(t *testing.T) {
	tests := []struct {
		in      string
		want    Mix
		wantErr bool
	}{
		{in: "read=80,list=5,update=10,create=5", want: Mix{80, 5, 10, 5}},
		{in: " read = 1 , create=3 ", want: Mix{OpRead: 1, OpCreate: 3}},
		{in: "update=1", want: Mix{OpUpdate: 1}},
		{in: "read=0,list=0", wantErr: true},
		{in: "", wantErr: true},
		{in: "read", wantErr: true},
		{in: "delete=5", wantErr: true},
		{in: "read=-1", wantErr: true},
		{in: "read=x", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseMix(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseMix(%q) error = %v, want error %v", tt.in, err, tt.wantErr)
			}
			if !tt.wantErr && got != tt.want {
				t.Errorf("ParseMix(%q) = %v, want %v", tt.in, got, tt.want)
			}
		})
	}
	if got, want := (Mix{80, 0, 10, 5}).String(), "read=80,update=10,create=5"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

func TestMixProportions(t *testing.T) {
	w := Workload{Kind: "mixed", IDs: 1000, KeyDist: "uniform", Mix: Mix{80, 5, 10, 5}, ListLimit: 50}
	p := newPicker(&w, 1, 2)
	const n = 200_000
	var got [numOps]int
	for range n {
		got[p.op()]++
	}
	for op := range numOps {
		want := float64(w.Mix[op]) / 100
		share := float64(got[op]) / n
		if math.Abs(share-want) > 0.005 {
			t.Errorf("%s: share %.4f, want %.3f ± 0.005", op, share, want)
		}
	}
}

func TestUniformIDs(t *testing.T) {
	const ids, n = 20, 200_000
	w := Workload{Kind: "uniform", IDs: ids, KeyDist: "uniform", Mix: Mix{OpRead: 1}, ListLimit: 50}
	p := newPicker(&w, 3, 4)
	counts := map[int64]int{}
	for range n {
		id := p.id()
		if id < 1 || id > ids {
			t.Fatalf("id %d outside 1..%d", id, ids)
		}
		counts[id]++
	}
	// Chi-square with 19 degrees of freedom: 43.8 is the 0.999 quantile.
	exp := float64(n) / ids
	chi := 0.0
	for id := int64(1); id <= ids; id++ {
		d := float64(counts[id]) - exp
		chi += d * d / exp
	}
	if chi > 43.8 {
		t.Errorf("chi-square %.1f > 43.8: ids are not uniform: %v", chi, counts)
	}
}

func TestZipfIDs(t *testing.T) {
	const ids, n, s = 10_000, 400_000, 1.2
	w := Workload{Kind: "zipf", IDs: ids, ZipfS: s, KeyDist: "zipf", Mix: Mix{OpRead: 1}, ListLimit: 50}
	p := newPicker(&w, 5, 6)
	counts := map[int64]int{}
	for range n {
		id := p.id()
		if id < 1 || id > ids {
			t.Fatalf("id %d outside 1..%d", id, ids)
		}
		counts[id]++
	}
	// Rank r (0-based) has weight (1+r)^-s (math/rand/v2 with v=1), so the
	// most popular id is drawn 2^s times as often as the second, 3^s as
	// the third.
	k := newKeyspace(ids)
	top := float64(counts[k.id(0)])
	for r, want := range map[uint64]float64{1: math.Pow(2, s), 2: math.Pow(3, s), 9: math.Pow(10, s)} {
		ratio := top / float64(counts[k.id(r)])
		if math.Abs(ratio-want)/want > 0.1 {
			t.Errorf("count(rank 0)/count(rank %d) = %.2f, want %.2f ± 10%%", r, ratio, want)
		}
	}
	// Skew: the 1% most popular ids get the bulk of the draws.
	hot := 0
	for r := range uint64(ids / 100) {
		hot += counts[k.id(r)]
	}
	if share := float64(hot) / n; share < 0.6 {
		t.Errorf("top 1%% of ids drew %.2f of requests, want a skewed > 0.6", share)
	}
	// The hot ids are scattered, not the run 1, 2, 3…
	if k.id(0) == 1 && k.id(1) == 2 {
		t.Errorf("ranks map to adjacent ids %d, %d", k.id(0), k.id(1))
	}
}

func TestKeyspaceIsPermutation(t *testing.T) {
	for _, n := range []uint64{1, 2, 3, 10, 97, 1000, 1024, 65_536, 100_000} {
		k := newKeyspace(n)
		seen := make([]bool, n+1)
		for r := range n {
			id := k.id(r)
			if id < 1 || uint64(id) > n || seen[id] {
				t.Fatalf("n=%d: rank %d → id %d (out of range or repeated)", n, r, id)
			}
			seen[id] = true
		}
	}
}

func TestNextCursor(t *testing.T) {
	tests := []struct{ body, want string }{
		{`{"items":[],"next_cursor":"abc_-9"}`, "abc_-9"},
		{`{"items":[{"id":1}], "next_cursor" : "x"}`, "x"},
		{`{"items":[],"next_cursor":null}`, ""},
		{`{"items":[]}`, ""},
		{`{"next_cursor":"unterminated`, ""},
	}
	for _, tt := range tests {
		if got := string(nextCursor(nil, []byte(tt.body))); got != tt.want {
			t.Errorf("nextCursor(%s) = %q, want %q", tt.body, got, tt.want)
		}
	}
}
