#!/bin/sh
# compare-vegeta.sh: the open loop of userapi bench against two independent
# open-loop generators, vegeta and fortio, against the same server, in
# rotation, so all three see the same machine load.
#
#   bench/compare-vegeta.sh [URL] [ROUNDS] [SECONDS] [RATES] [CONNECTIONS]
#
# Defaults: 3 rounds of 6 s at 2000 and 5000 req/s ("2000 5000"), 64
# connections. Without URL it starts `userapi serve --cache local` over a
# temporary SQLite database seeded with IDS users (default 10000, the hot
# set), on a free 127.0.0.1 port. With URL (a running userapi whose users
# 1..IDS exist) it uses that.
#
# vegeta (github.com/tsenart/vegeta/v12) and fortio (fortio.org/fortio) are
# built with `go install` into the temporary directory: they are tools of
# this script, not dependencies of the service. Set VEGETA or FORTIO to use
# a binary already built, and USERAPI to run a given userapi binary (an
# older build, to compare before and after).
#
# Each round runs, for every rate:
#   - vegeta: `attack -rate R -workers C -max-workers C`, keep-alive, GET
#     URL/users/i for i in 1..IDS round robin; its results go to a file and
#     are reported after the run, so no report process competes with it;
#   - fortio: `load -qps R -c C -uniform -r 0.00001` (10 µs histogram
#     buckets; the default is 1 ms), keep-alive, its own HTTP/1.1 client,
#     GET URL/users/1 (fortio loads one URL; every id is cached alike);
#   - userapi bench: `--rate R --connections C --ids IDS`, uniform reads of
#     the same ids as vegeta, no warm-up, like the others;
# in an order that rotates from round to round, and prints the p50 and p99
# latency of each, userapi bench's schedule lag, and the ratios. vegeta and
# fortio count latency from the moment they send, userapi bench from the
# intended send time; at a rate the server sustains they should agree.
# vegeta's client is Go's net/http, whose hand-offs between goroutines add
# to every request; fortio's, like userapi bench's, writes and reads its
# connection itself. The last lines give, per rate and generator, the median
# and range of the per-round ratios, and how many rounds agree within 20 %
# or 0.1 ms.
# With DELAY set (e.g. DELAY=1ms) and no URL, the server is fixedserver
# --delay DELAY instead (bench/cmd/fixedserver: every answer leaves exactly
# DELAY after its handler starts, to within the wake-up time of a free
# core: internal/pace), so each generator's figures can be
# read against a known latency: what a generator reports above DELAY is its
# own (and the loopback's) time.
# The service runs with --auth off and --rate-limit off: the comparison is
# between generators, and all send the same bare requests.
# Needs go, python3, bc and curl.
set -eu

cd "$(dirname "$0")/.."
url=${1:-}
rounds=${2:-3}
secs=${3:-6}
rates=${4:-2000 5000}
conns=${5:-64}
ids=${IDS:-10000}

tmp=$(mktemp -d)
srv_pid=
cleanup() {
	if [ -n "$srv_pid" ]; then kill "$srv_pid" 2>/dev/null || true; wait "$srv_pid" 2>/dev/null || true; fi
	rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

userapi=${USERAPI:-}
if [ -z "$userapi" ]; then
	go build -o "$tmp/userapi" ./cmd/userapi
	userapi=$tmp/userapi
fi
# Outside the module, so the service's go.mod is not touched.
vegeta=${VEGETA:-}
if [ -z "$vegeta" ]; then
	(cd "$tmp" && GOBIN="$tmp/bin" GOFLAGS= go install github.com/tsenart/vegeta/v12@v12.13.0)
	vegeta=$tmp/bin/vegeta
fi
fortio=${FORTIO:-}
if [ -z "$fortio" ]; then
	(cd "$tmp" && GOBIN="$tmp/bin" GOFLAGS= go install fortio.org/fortio@v1.66.5)
	fortio=$tmp/bin/fortio
fi

# start NAME PATH COMMAND...: run the server on a free port and wait until
# PATH answers.
start() {
	name=$1 path=$2
	shift 2
	port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
	"$@" --addr "127.0.0.1:$port" >"$tmp/serve.log" 2>&1 &
	srv_pid=$!
	url="http://127.0.0.1:$port"
	for _ in $(seq 50); do
		curl -sf "$url$path" >/dev/null 2>&1 && return
		sleep 0.2
	done
	echo "compare-vegeta: $name did not become ready:" >&2
	cat "$tmp/serve.log" >&2
	exit 1
}
if [ -z "$url" ] && [ -n "${DELAY:-}" ]; then
	go build -o "$tmp/fixedserver" ./bench/cmd/fixedserver
	start fixedserver /users/1 "$tmp/fixedserver" --delay "$DELAY"
elif [ -z "$url" ]; then
	db="sqlite:$tmp/users.db"
	"$userapi" migrate --db "$db" >"$tmp/migrate.log" 2>&1
	"$userapi" seed --db "$db" --users "$ids" >"$tmp/seed.log" 2>&1
	start userapi /readyz "$userapi" serve --db "$db" --cache local --log-level error --auth off --rate-limit off
fi
i=1
while [ "$i" -le "$ids" ]; do echo "GET $url/users/$i"; i=$((i + 1)); done >"$tmp/targets"

run_vegeta() { # rate
	"$vegeta" attack -targets "$tmp/targets" -rate "$1" -duration "${secs}s" -workers "$conns" -max-workers "$conns" >"$tmp/vegeta.bin"
	"$vegeta" report -type json <"$tmp/vegeta.bin" >"$tmp/vegeta.json"
	set -- $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); l=r["latencies"]
print(l["50th"]/1e6, l["99th"]/1e6, r["requests"] - round(r["success"] * r["requests"]))' "$tmp/vegeta.json")
	v_p50=$1 v_p99=$2 v_err=$3
}

run_fortio() { # rate
	"$fortio" load -quiet -qps "$1" -c "$conns" -t "${secs}s" -uniform -r 0.00001 -p 50,99 -json "$tmp/fortio.json" "$url/users/1" >/dev/null 2>&1
	set -- $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); p={x["Percentile"]: x["Value"] for x in r["DurationHistogram"]["Percentiles"]}
print(p[50]*1e3, p[99]*1e3, sum(n for c, n in r["RetCodes"].items() if str(c) != "200"))' "$tmp/fortio.json")
	f_p50=$1 f_p99=$2 f_err=$3
}

run_bench() { # rate
	"$userapi" bench "$url" --rate "$1" --connections "$conns" --duration "${secs}s" --warmup 0s --ids "$ids" --json --quiet >"$tmp/bench.json"
	set -- $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); t=r["total"]; l=t["latency_ms"]; g=r["schedule_lag_ms"]
print(l["p50"], l["p99"], g["p50"], g["p99"], t["errors"])' "$tmp/bench.json")
	b_p50=$1 b_p99=$2 b_lag50=$3 b_lag99=$4 b_err=$5
}

echo "server $url${DELAY:+ (fixedserver --delay $DELAY)}, $rounds rounds of ${secs}s at $rates req/s, $conns connections, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-5s %6s   %7s %7s   %7s %7s   %7s %7s   %7s %7s   %5s %5s   %5s %5s  %s\n' \
	round rate "v p50" "v p99" "f p50" "f p99" "b p50" "b p99" "lag p50" "lag p99" "b/v50" "b/v99" "b/f50" "b/f99" errors
r=1
while [ "$r" -le "$rounds" ]; do
	for rate in $rates; do
		# Rotate who goes first, so none always meets a colder server.
		case $((r % 3)) in
		1) run_vegeta "$rate"; run_fortio "$rate"; run_bench "$rate" ;;
		2) run_fortio "$rate"; run_bench "$rate"; run_vegeta "$rate" ;;
		0) run_bench "$rate"; run_vegeta "$rate"; run_fortio "$rate" ;;
		esac
		printf '%-5s %6s   %7.3f %7.3f   %7.3f %7.3f   %7.3f %7.3f   %7.3f %7.3f   %5.2f %5.2f   %5.2f %5.2f  %s/%s/%s\n' \
			"$r" "$rate" "$v_p50" "$v_p99" "$f_p50" "$f_p99" "$b_p50" "$b_p99" "$b_lag50" "$b_lag99" \
			"$(echo "$b_p50 / $v_p50" | bc -l)" "$(echo "$b_p99 / $v_p99" | bc -l)" \
			"$(echo "$b_p50 / $f_p50" | bc -l)" "$(echo "$b_p99 / $f_p99" | bc -l)" "$v_err" "$f_err" "$b_err"
		echo "$rate $v_p50 $v_p99 $f_p50 $f_p99 $b_p50 $b_p99" >>"$tmp/rounds"
	done
	r=$((r + 1))
done
echo "latencies in ms (v: vegeta, f: fortio, b: userapi bench); ratios are userapi bench / the other; errors vegeta/fortio/bench"
# The rounds of a shared machine disagree; per rate, the median of the
# per-round ratios is the figure to quote, with its range, and "agree"
# counts the rounds within 20 % or 0.1 ms of the other generator.
python3 - "$tmp/rounds" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for rate in dict.fromkeys(r[0] for r in rows):
    rs = [list(map(float, r[1:])) for r in rows if r[0] == rate]
    for gen, at in (("vegeta", 0), ("fortio", 2)):
        for name, i in (("p50", 0), ("p99", 1)):
            other, ours = [x[at + i] for x in rs], [x[4 + i] for x in rs]
            ratios = [b / o for b, o in zip(ours, other)]
            agree = sum(abs(b - o) <= max(0.2 * o, 0.1) for b, o in zip(ours, other))
            print(f"{rate:>6} req/s {name} against {gen}: median ratio {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}), within 20 % or 0.1 ms in {agree} of {len(rs)} rounds")
EOF
