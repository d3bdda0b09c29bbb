package testenv

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// Sum is the sum of the counters or gauges named name in g whose label is
// value (every series when label is "").
func Sum(tb testing.TB, g prometheus.Gatherer, name, label, value string) float64 {
	tb.Helper()
	mfs, err := g.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			// One of the two is nil, whose getter gives 0.
			v := m.GetCounter().GetValue() + m.GetGauge().GetValue()
			if label == "" {
				sum += v
				continue
			}
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					sum += v
				}
			}
		}
	}
	return sum
}
