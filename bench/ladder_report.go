package bench

import (
	"fmt"
	"html/template"
	"io"
	"strconv"
)

const ladderTmpl = `{{define "body"}}
<h1>userapi optimization ladder</h1>
<p class="sub">{{.Describe}} · database {{.L.DB}}{{if .L.Redis}} · Redis {{.L.Redis}}{{end}} · started {{.Started}}</p>
<p class="note">Each step starts a fresh <code>userapi serve</code> with the flags shown, runs the same workload against it and stops it. Gains compare requests/s with the previous step that ran.</p>

<h2>Throughput by step</h2>
<figure>{{.Throughput}}<figcaption>Requests per second of each step; above each bar its rate and the gain over the previous step that ran.</figcaption></figure>

<h2>Tail latency by step</h2>
<figure>{{.P99}}<figcaption>p99 latency of each step (lower is better).</figcaption></figure>

<h2>Steps side by side</h2>
<table>
<tr><th>step</th><th class="l">configuration</th><th class="l">what it changes</th><th>req/s</th><th>gain</th><th>vs step 1</th><th>p50</th><th>p99</th><th>p99.9</th><th>max</th><th>errors</th></tr>
{{range .Rows}}{{if .Ran}}<tr><td>{{.S.Step}}</td><td class="l">{{.S.Name}}<br/>{{range .S.Flags}}<code>{{.}}</code> {{end}}</td><td class="l">{{.S.Change}}</td><td>{{printf "%.0f" .T.RequestsPerSec}}</td><td>{{.Gain}}</td><td>{{.GainFirst}}</td><td>{{ms .T.Latency.P50}}</td><td>{{ms .T.Latency.P99}}</td><td>{{ms .T.Latency.P999}}</td><td>{{ms .T.Latency.Max}}</td><td>{{.T.Errors}}</td></tr>
{{else}}<tr class="skipped"><td>{{.S.Step}}</td><td class="l">{{.S.Name}}<br/>{{range .S.Flags}}<code>{{.}}</code> {{end}}</td><td class="l">{{.S.Change}}</td><td class="l" colspan="8">{{.S.Status}}: {{.S.Note}}</td></tr>
{{end}}{{end}}</table>

<h2>Latency distribution by step</h2>
<figure>{{.Spectrum}}<figcaption>Latency at each percentile for every step that ran; each step right is ten times rarer.</figcaption></figure>

<h2>Throughput over time by step</h2>
<figure>{{.Timeline}}<figcaption>Requests per second during each step's run, warm-up shaded.</figcaption></figure>

{{template "settings" .}}
{{end}}`

type ladderRow struct {
	S               StepResult
	T               Stats
	Ran             bool
	Gain, GainFirst string
}

// WriteLadderReport writes the HTML report of a ladder run.
func WriteLadderReport(w io.Writer, res *LadderResult) error {
	t, err := parseReport(ladderTmpl)
	if err != nil {
		return err
	}
	thr := &barChart{Title: "Throughput by step", Y: axis{Label: "requests/s"}}
	p99 := &barChart{Title: "p99 latency by step", Y: msAxis("p99 latency")}
	spec := &lineChart{Title: "Latency distribution by step", Y: msAxis("latency"), X: axis{Label: "percentile"}, NoMarkers: true}
	timeline := &lineChart{
		Title: "Throughput over time by step", X: axis{Label: "time", Format: fmtSeconds},
		Y: axis{Label: "requests/s"}, Bands: warmBand(res.Settings.WarmupSeconds),
	}
	var rows []ladderRow
	for i, s := range res.Steps {
		row := ladderRow{S: s, Ran: s.Status == StepRan && s.Result != nil}
		label := strconv.Itoa(s.Step) + ". " + s.Name
		if row.Ran {
			row.T = s.Result.Total
			row.Gain, row.GainFirst = fmtGain(s.Gain), fmtGain(s.GainOverFirst)
			note := fmtNum(row.T.RequestsPerSec)
			if s.Gain > 0 {
				note += " " + fmtGain(s.Gain)
			}
			thr.Bars = append(thr.Bars, bar{Label: shortLabel(s), Value: row.T.RequestsPerSec, Note: note, Color: palette(i)})
			p99.Bars = append(p99.Bars, bar{Label: shortLabel(s), Value: row.T.Latency.P99, Note: fmtMs(row.T.Latency.P99), Color: palette(i)})
			spec.Lines = append(spec.Lines, spectrumLine(label, row.T.Spectrum, palette(i)))
			tl := line{Name: label, Color: palette(i)}
			for _, sec := range s.Result.Series {
				tl.Points = append(tl.Points, xy{sec.T, sec.RequestsPerSec})
			}
			timeline.Lines = append(timeline.Lines, tl)
		} else {
			thr.Bars = append(thr.Bars, bar{Label: shortLabel(s), Value: 0, Note: s.Status, Color: "#9ca3af"})
			p99.Bars = append(p99.Bars, bar{Label: shortLabel(s), Value: 0, Note: s.Status, Color: "#9ca3af"})
		}
		rows = append(rows, row)
	}
	spec.X.Ticks = spectrumTicks(spec.Lines)
	data := struct {
		page
		L                                   *LadderResult
		Describe, Started                   string
		Rows                                []ladderRow
		Throughput, P99, Spectrum, Timeline template.HTML
	}{
		page:       newPage("userapi optimization ladder", res.Machine, settingsRows(&res.Settings), res.StartedAt),
		L:          res,
		Describe:   res.Settings.describe(),
		Started:    res.StartedAt.UTC().Format("2006-01-02 15:04:05 UTC"),
		Rows:       rows,
		Throughput: thr.svg(),
		P99:        p99.svg(),
		Spectrum:   spec.svg(),
		Timeline:   timeline.svg(),
	}
	if err := t.Execute(w, data); err != nil {
		return fmt.Errorf("render ladder report: %w", err)
	}
	return nil
}

// shortLabel names a step under its bar; the chart wraps it.
func shortLabel(s StepResult) string {
	return strconv.Itoa(s.Step) + ". " + s.Name
}
