//go:build race

package bench

// raceEnabled is set under the race detector, whose instrumentation
// allocates and would make allocation counts meaningless.
const raceEnabled = true
