#!/bin/sh
# compare-wrk.sh: userapi bench against wrk, against the same server, in
# alternation, so both see the same machine load.
#
#   bench/compare-wrk.sh [URL] [ROUNDS] [SECONDS] [CONNECTIONS]
#
# Without URL it builds and starts bench/cmd/fixedserver (a fasthttp server
# answering every path with a fixed user) on a free 127.0.0.1 port, the
# cheapest possible server, where the load generator's own cost matters most.
# With URL (a running userapi, say) it sends GET URL/users/1 with wrk and
# `--ids 1` reads with userapi bench, the same request stream.
#
# Each round runs wrk (2 threads, one per core of the 2-core machine) and
# userapi bench, closed loop, with the same connections and duration (the
# order alternates), and prints requests/s and the mean, p50 and p99
# latency of both and their ratios, then the median and range of the
# per-round throughput ratios. Needs wrk (apt-get install -y wrk), go,
# python3, bc and curl.
set -eu

cd "$(dirname "$0")/.."
url=${1:-}
rounds=${2:-3}
secs=${3:-5}
conns=${4:-64}

command -v wrk >/dev/null || { echo "compare-wrk: wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }
tmp=$(mktemp -d)
srv_pid=
cleanup() {
	if [ -n "$srv_pid" ]; then kill "$srv_pid" 2>/dev/null || true; wait "$srv_pid" 2>/dev/null || true; fi
	rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

go build -o "$tmp/userapi" ./cmd/userapi
if [ -z "$url" ]; then
	go build -o "$tmp/fixedserver" ./bench/cmd/fixedserver
	port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
	"$tmp/fixedserver" --addr "127.0.0.1:$port" 2>"$tmp/fixed.log" &
	srv_pid=$!
	url="http://127.0.0.1:$port"
	for _ in 1 2 3 4 5 6 7 8 9 10; do
		curl -sf "$url/users/1" >/dev/null 2>&1 && break
		sleep 0.2
	done
fi

# ms converts wrk's "1.23ms" / "456.00us" / "1.20s" to milliseconds.
ms() {
	awk -v v="$1" 'BEGIN {
		if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
		else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
		else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
		else printf "%s", v }'
}

run_wrk() {
	wrk -t2 -c"$conns" -d"${secs}s" --latency "$url/users/1" >"$tmp/wrk.txt"
	w_rps=$(awk '/^Requests\/sec:/ {print $2}' "$tmp/wrk.txt")
	w_p50=$(ms "$(awk '$1 == "50%" {print $2}' "$tmp/wrk.txt")")
	w_p99=$(ms "$(awk '$1 == "99%" {print $2}' "$tmp/wrk.txt")")
	w_avg=$(ms "$(awk '$1 == "Latency" {print $2; exit}' "$tmp/wrk.txt")")
}

run_bench() {
	"$tmp/userapi" bench "$url" --connections "$conns" --duration "${secs}s" --warmup 0s --ids 1 --json --quiet >"$tmp/bench.json"
	set -- $(python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["total"]; print(t["requests_per_sec"], t["latency_ms"]["p50"], t["latency_ms"]["p99"], t["latency_ms"]["mean"])' "$tmp/bench.json")
	b_rps=$1 b_p50=$2 b_p99=$3 b_avg=$4
}

echo "server $url, $rounds rounds of ${secs}s, $conns connections, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-5s %10s %7s %7s %7s   %11s %7s %7s %7s   %6s %6s %6s %6s\n' round "wrk req/s" mean p50 p99 "bench req/s" mean p50 p99 "req/s" mean p50 p99
i=1
while [ "$i" -le "$rounds" ]; do
	# Alternate who goes first, so neither always meets a colder server.
	if [ $((i % 2)) -eq 1 ]; then run_wrk; run_bench; else run_bench; run_wrk; fi

	printf '%-5s %10.0f %7.3f %7.3f %7.3f   %11.0f %7.3f %7.3f %7.3f   %6.2f %6.2f %6.2f %6.2f\n' \
		"$i" "$w_rps" "$w_avg" "$w_p50" "$w_p99" "$b_rps" "$b_avg" "$b_p50" "$b_p99" \
		"$(echo "$b_rps / $w_rps" | bc -l)" "$(echo "$b_avg / $w_avg" | bc -l)" \
		"$(echo "$b_p50 / $w_p50" | bc -l)" "$(echo "$b_p99 / $w_p99" | bc -l)"
	echo "$b_rps $w_rps" >>"$tmp/ratios"
	i=$((i + 1))
done
echo "latencies in ms; ratios are userapi bench / wrk"
# The rounds of a shared machine disagree; the median of the per-round
# throughput ratios is the figure to quote, with its range.
awk '{print $1 / $2}' "$tmp/ratios" | sort -g | awk '{v[NR] = $1} END {
	m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
	printf "requests/s, userapi bench / wrk: median %.2f over %d rounds (%.2f-%.2f)\n", m, NR, v[1], v[NR] }'
