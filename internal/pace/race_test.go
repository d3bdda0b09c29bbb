//go:build race

package pace

// raceEnabled is set under the race detector, whose instrumentation
// allocates.
const raceEnabled = true
