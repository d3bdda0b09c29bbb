package bench

import (
	"fmt"
	"html"
	"html/template"
	"math"
	"strconv"
	"strings"
)

// The charts of the report are inline SVG written here, so the report needs
// no script library and opens offline. Every element is well-formed XML
// (the report tests parse the page as XML), data lines are <path
// class="data"> and data bars <rect class="data">.

// palette holds distinguishable colours for series, in order of use.
func palette(i int) string {
	colors := [...]string{"#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"}
	return colors[i%len(colors)]
}

// Chart geometry, in SVG user units; the SVG scales to the page width.
const (
	chartW      = 760
	chartH      = 300
	marginLeft  = 70
	marginRight = 20
	marginTop   = 34
	marginBot   = 46
)

// markersUpTo is the longest series whose points get a dot: short runs
// have few points, and a dot shows where each second's value is.
const markersUpTo = 40

type xy struct{ X, Y float64 }

type line struct {
	Name   string
	Points []xy
	Color  string
	Dash   bool
}

type tick struct {
	At    float64
	Label string
}

type axis struct {
	Label  string
	Ticks  []tick // fixed ticks; nil = chosen from the data, starting at 0
	Format func(float64) string
}

type band struct {
	From, To float64
	Label    string
}

type lineChart struct {
	Title string // for screen readers
	X, Y  axis
	Lines []line
	Bands []band
	// NoMarkers leaves out the dots of short series, for curves (the
	// percentile spectrum) whose points are not measurements in time.
	NoMarkers bool
}

// niceTicks returns ticks from 0 to at least hi with a 1-2-2.5-5 step.
func niceTicks(hi float64, format func(float64) string) []tick {
	if !(hi > 0) || math.IsInf(hi, 0) {
		hi = 1
	}
	raw := hi / 5
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step := mag
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*mag >= raw {
			step = m * mag
			break
		}
	}
	var ts []tick
	for v := 0.0; ; v += step {
		v = math.Round(v/step) * step
		ts = append(ts, tick{At: v, Label: format(v)})
		if v >= hi {
			break
		}
	}
	return ts
}

// fmtNum formats an axis number compactly: 12k, 1.5M, 0.25.
func fmtNum(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 1e6:
		return trimZeros(strconv.FormatFloat(v/1e6, 'f', 2, 64)) + "M"
	case a >= 1e4:
		return trimZeros(strconv.FormatFloat(v/1e3, 'f', 1, 64)) + "k"
	case a >= 100 || a == 0:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 1:
		return trimZeros(strconv.FormatFloat(v, 'f', 2, 64))
	}
	return trimZeros(strconv.FormatFloat(v, 'f', 3, 64))
}

func trimZeros(s string) string {
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

func fmtSeconds(v float64) string { return fmtNum(v) + "s" }

func esc(s string) string { return html.EscapeString(s) }

func f1(v float64) string { return strconv.FormatFloat(v, 'f', 1, 64) }

func extent(lines []line) (xmin, xmax, ymax float64) {
	xmin, xmax = math.Inf(1), math.Inf(-1)
	for _, l := range lines {
		for _, p := range l.Points {
			xmin, xmax, ymax = min(xmin, p.X), max(xmax, p.X), max(ymax, p.Y)
		}
	}
	if math.IsInf(xmin, 0) {
		xmin, xmax = 0, 1
	}
	return xmin, xmax, ymax
}

// noData stands in for a chart with nothing to draw, such as the latency
// distribution of a run in which no request was answered.
func noData(title string) template.HTML {
	return template.HTML(`<p class="nodata">` + esc(title) + `: no data.</p>`)
}

// svg renders the chart.
func (c *lineChart) svg() template.HTML {
	points := 0
	for _, l := range c.Lines {
		points += len(l.Points)
	}
	if points == 0 {
		return noData(c.Title)
	}
	xmin, xmax, ymax := extent(c.Lines)
	xf := c.X.Format
	if xf == nil {
		xf = fmtNum
	}
	yf := c.Y.Format
	if yf == nil {
		yf = fmtNum
	}
	xt := c.X.Ticks
	if xt == nil {
		xt = niceTicks(xmax, xf)
		xmin = 0
	}
	if len(xt) > 0 {
		xmin = min(xmin, xt[0].At)
		xmax = max(xmax, xt[len(xt)-1].At)
	}
	if xmax <= xmin {
		xmax = xmin + 1
	}
	yt := c.Y.Ticks
	if yt == nil {
		yt = niceTicks(ymax*1.05, yf)
	}
	ytop := yt[len(yt)-1].At
	if ytop <= 0 {
		ytop = 1
	}
	pw, ph := float64(chartW-marginLeft-marginRight), float64(chartH-marginTop-marginBot)
	sx := func(x float64) float64 { return marginLeft + (x-xmin)/(xmax-xmin)*pw }
	sy := func(y float64) float64 { return marginTop + ph - min(max(y/ytop, 0), 1.02)*ph }

	var b strings.Builder
	legendItems, extra := layoutLegend(c.Lines)
	openSVG(&b, c.Title, extra)
	for _, bd := range c.Bands {
		x0, x1 := sx(max(bd.From, xmin)), sx(min(bd.To, xmax))
		if x1 > x0 {
			fmt.Fprintf(&b, `<rect class="band" x="%s" y="%d" width="%s" height="%s"/>`, f1(x0), marginTop, f1(x1-x0), f1(ph))
			fmt.Fprintf(&b, `<text class="band-label" x="%s" y="%d">%s</text>`, f1(x0+4), marginTop+14, esc(bd.Label))
		}
	}
	for _, t := range yt {
		y := sy(t.At)
		fmt.Fprintf(&b, `<line class="grid" x1="%d" x2="%d" y1="%s" y2="%s"/>`, marginLeft, chartW-marginRight, f1(y), f1(y))
		fmt.Fprintf(&b, `<text class="tick" x="%d" y="%s" text-anchor="end">%s</text>`, marginLeft-6, f1(y+4), esc(t.Label))
	}
	for _, t := range xt {
		x := sx(t.At)
		fmt.Fprintf(&b, `<line class="xtick" x1="%s" x2="%s" y1="%s" y2="%s"/>`, f1(x), f1(x), f1(marginTop+ph), f1(marginTop+ph+5))
		anchor := "middle"
		if x > chartW-marginRight-24 { // keep the last label inside the frame
			anchor = "end"
		}
		fmt.Fprintf(&b, `<text class="tick" x="%s" y="%s" text-anchor="%s">%s</text>`, f1(x), f1(marginTop+ph+18), anchor, esc(t.Label))
	}
	fmt.Fprintf(&b, `<line class="axis" x1="%d" x2="%d" y1="%s" y2="%s"/>`, marginLeft, chartW-marginRight, f1(marginTop+ph), f1(marginTop+ph))
	axisLabels(&b, c.X.Label, c.Y.Label)
	for i, l := range c.Lines {
		color := l.Color
		if color == "" {
			color = palette(i)
		}
		if len(l.Points) == 0 {
			continue
		}
		var d strings.Builder
		for j, p := range l.Points {
			cmd := "L"
			if j == 0 {
				cmd = "M"
			}
			fmt.Fprintf(&d, "%s%s %s", cmd, f1(sx(p.X)), f1(sy(p.Y)))
		}
		if len(l.Points) == 1 { // a lone point still shows as a short stroke
			fmt.Fprintf(&d, "h0.1")
		}
		dash := ""
		if l.Dash {
			dash = ` stroke-dasharray="5 4"`
		}
		fmt.Fprintf(&b, `<path class="data" d="%s" stroke="%s"%s><title>%s</title></path>`, d.String(), color, dash, esc(l.Name))
		if !c.NoMarkers && len(l.Points) <= markersUpTo {
			for _, p := range l.Points {
				fmt.Fprintf(&b, `<circle class="marker" cx="%s" cy="%s" r="2.5" fill="%s"/>`, f1(sx(p.X)), f1(sy(p.Y)), color)
			}
		}
	}
	drawLegend(&b, legendItems)
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// openSVG starts a chart; extra is added above the normal frame (for legend
// rows).
func openSVG(b *strings.Builder, title string, extra int) {
	fmt.Fprintf(b, `<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 %d %d %d" role="img" aria-label="%s">`, -extra, chartW, chartH+extra, esc(title))
	fmt.Fprintf(b, `<title>%s</title>`, esc(title))
}

func axisLabels(b *strings.Builder, x, y string) {
	if x != "" {
		fmt.Fprintf(b, `<text class="axis-label" x="%d" y="%d" text-anchor="middle">%s</text>`, marginLeft+(chartW-marginLeft-marginRight)/2, chartH-6, esc(x))
	}
	if y != "" {
		fmt.Fprintf(b, `<text class="axis-label" x="14" y="%d" text-anchor="middle" transform="rotate(-90 14 %d)">%s</text>`, marginTop+(chartH-marginTop-marginBot)/2, marginTop+(chartH-marginTop-marginBot)/2, esc(y))
	}
}

// legendItem is one series name placed in the legend.
type legendItem struct {
	x, y  float64
	name  string
	color string
}

// legendRowH is the height of one legend row.
const legendRowH = 18

// layoutLegend places the series names in rows above the plot, left to
// right, wrapping at the chart's width. It returns the items and the extra
// height the rows after the first one need; charts grow upward by it (the
// viewBox starts at -extra), so the plot keeps its size.
func layoutLegend(lines []line) (items []legendItem, extra int) {
	if len(lines) < 2 {
		return nil, 0
	}
	x, row := float64(marginLeft), 0
	for i, l := range lines {
		color := l.Color
		if color == "" {
			color = palette(i)
		}
		// About 6.8 units per character at 12px, plus the swatch and a gap.
		w := float64(len([]rune(l.Name)))*6.8 + 30
		if x+w > chartW-marginRight && x > marginLeft {
			x, row = marginLeft, row+1
		}
		items = append(items, legendItem{x: x, y: float64(row * legendRowH), name: l.Name, color: color})
		x += w
	}
	extra = row * legendRowH
	for i := range items {
		items[i].y -= float64(extra)
	}
	return items, extra
}

func drawLegend(b *strings.Builder, items []legendItem) {
	for _, it := range items {
		fmt.Fprintf(b, `<rect class="swatch" x="%s" y="%s" width="14" height="4" fill="%s"/>`, f1(it.x), f1(it.y+12), it.color)
		fmt.Fprintf(b, `<text class="legend" x="%s" y="%s">%s</text>`, f1(it.x+18), f1(it.y+18), esc(it.name))
	}
}

type bar struct {
	Label string
	Value float64
	Note  string // drawn above the bar, such as "×2.1"
	Color string
}

type barChart struct {
	Title string
	Y     axis
	Bars  []bar
}

func (c *barChart) svg() template.HTML {
	if len(c.Bars) == 0 {
		return noData(c.Title)
	}
	yf := c.Y.Format
	if yf == nil {
		yf = fmtNum
	}
	hi := 0.0
	for _, br := range c.Bars {
		hi = max(hi, br.Value)
	}
	yt := niceTicks(hi*1.12, yf) // room for the notes above the bars
	ytop := yt[len(yt)-1].At
	pw, ph := float64(chartW-marginLeft-marginRight), float64(chartH-marginTop-marginBot)
	sy := func(y float64) float64 { return marginTop + ph - min(max(y/ytop, 0), 1)*ph }

	var b strings.Builder
	openSVG(&b, c.Title, 0)
	for _, t := range yt {
		y := sy(t.At)
		fmt.Fprintf(&b, `<line class="grid" x1="%d" x2="%d" y1="%s" y2="%s"/>`, marginLeft, chartW-marginRight, f1(y), f1(y))
		fmt.Fprintf(&b, `<text class="tick" x="%d" y="%s" text-anchor="end">%s</text>`, marginLeft-6, f1(y+4), esc(t.Label))
	}
	fmt.Fprintf(&b, `<line class="axis" x1="%d" x2="%d" y1="%s" y2="%s"/>`, marginLeft, chartW-marginRight, f1(marginTop+ph), f1(marginTop+ph))
	axisLabels(&b, "", c.Y.Label)
	n := max(len(c.Bars), 1)
	slot := pw / float64(n)
	bw := min(slot*0.6, 90)
	for i, br := range c.Bars {
		color := br.Color
		if color == "" {
			color = palette(0)
		}
		cx := marginLeft + slot*(float64(i)+0.5)
		top := sy(br.Value)
		h := marginTop + ph - top
		fmt.Fprintf(&b, `<rect class="data" x="%s" y="%s" width="%s" height="%s" fill="%s"><title>%s: %s</title></rect>`,
			f1(cx-bw/2), f1(top), f1(bw), f1(max(h, 0.5)), color, esc(br.Label), esc(yf(br.Value)))
		if br.Note != "" {
			fmt.Fprintf(&b, `<text class="bar-note" x="%s" y="%s" text-anchor="middle">%s</text>`, f1(cx), f1(top-6), esc(br.Note))
		}
		fmt.Fprintf(&b, `<text class="tick" x="%s" y="%s" text-anchor="middle">`, f1(cx), f1(marginTop+ph+16))
		for j, l := range wrapLabel(br.Label, int(slot/6.2)) {
			fmt.Fprintf(&b, `<tspan x="%s" dy="%d">%s</tspan>`, f1(cx), min(j, 1)*13, esc(l))
		}
		b.WriteString(`</text>`)
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// spectrumX maps a percentile to the x axis of a percentile spectrum:
// -log10(1 - p/100), so 90, 99, 99.9 … are evenly spaced. 100 (the maximum)
// has no finite position and is drawn half a decade after the last point.
func spectrumX(p float64) float64 { return -math.Log10(1 - p/100) }

// spectrumLine turns spectrum points into a line.
func spectrumLine(name string, pts []Point, color string) line {
	l := line{Name: name, Color: color}
	last := 0.0
	for _, p := range pts {
		x := last + 0.5
		if p.Percentile < 100 {
			x = spectrumX(p.Percentile)
			last = x
		}
		l.Points = append(l.Points, xy{x, p.Ms})
	}
	return l
}

// spectrumTicks labels the decades of a spectrum axis up to xmax.
func spectrumTicks(lines []line) []tick {
	_, xmax, _ := extent(lines)
	labels := []string{"0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%", "99.99999%"}
	var ts []tick
	for i, l := range labels {
		ts = append(ts, tick{At: float64(i), Label: l})
		if float64(i) >= xmax {
			break
		}
	}
	return ts
}

// wrapLabel breaks a label into at most two lines of about width
// characters, shortening the second with an ellipsis if it must.
func wrapLabel(s string, width int) []string {
	width = max(width, 6)
	words := strings.Fields(s)
	var lines []string
	cur := ""
	for _, w := range words {
		switch {
		case cur == "":
			cur = w
		case len([]rune(cur))+1+len([]rune(w)) <= width:
			cur += " " + w
		default:
			lines = append(lines, cur)
			cur = w
		}
	}
	if cur != "" {
		lines = append(lines, cur)
	}
	if len(lines) > 2 {
		lines = []string{lines[0], strings.Join(lines[1:], " ")}
	}
	if len(lines) == 2 {
		if r := []rune(lines[1]); len(r) > width {
			lines[1] = string(r[:width-1]) + "…"
		}
	}
	return lines
}
