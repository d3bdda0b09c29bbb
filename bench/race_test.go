//go:build race

package bench

// raceEnabled is set under the race detector, whose instrumentation slows
// every round trip (TestKnownLatency allows for it) and
// allocates, which would make allocation counts meaningless.
const raceEnabled = true
