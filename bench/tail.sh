#!/usr/bin/env bash
# What recording costs other requests (issue "Recording without a tail"): interleaved rounds of
# two gateway binaries recording to SQLite, the NEW one again with -database none, and nginx,
# all in front of the same bench_mock.
#
#   bench/tail.sh OLD_BINARY NEW_BINARY    # e.g. a release build without the change, target/release
#
# Per system: c=1 p50/p99 for JSON and 10-chunk stream requests, c=64 JSON requests/s and CPU per
# request; then the records ratio (NEW recording ÷ NEW -database none at c=64) and the records
# check: after a SIGTERM (which flushes the queue) every request a gateway answered is a row.
# Servers on core 0, wrk on core 1 (as bench/ab.sh). ROUNDS (default 3) and DUR (seconds, default
# 5) set the length. Needs nginx, wrk, python3 and bench/out/bin/bench_mock (or target/release/
# examples/bench_mock) from a release build.
set -u
OLD_BIN=${1:?old gateway binary}; NEW_BIN=${2:?new gateway binary}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
ROUNDS=${ROUNDS:-3}; DUR=${DUR:-5}
MOCK=$ROOT/bench/out/bin/bench_mock; [[ -x $MOCK ]] || MOCK=$ROOT/target/release/examples/bench_mock
D=$ROOT/bench/out/tail; rm -rf "$D"; mkdir -p "$D/ngx"; cd "$D" || exit 1
ulimit -n 20000
taskset -c 0 "$MOCK" 127.0.0.1:0 --threads 1 > mock.out 2>/dev/null &
PIDS=($!); sleep 0.5; MP=$(awk '/^port /{print $2}' mock.out)
printf 'authorization: sk-bench-client-token\nupstreams:\n  - name: mock\n    endpoint: http://127.0.0.1:%s/v1\n    sk: k\n' "$MP" > gw.yaml
declare -A URL GP DB
port=29500
for s in old new off; do
  port=$((port+1))
  BIN=$NEW_BIN; [[ $s == old ]] && BIN=$OLD_BIN
  DB[$s]=$D/$s.sqlite; [[ $s == off ]] && DB[$s]=none
  taskset -c 0 "$BIN" -addr 127.0.0.1:$port -config gw.yaml -database "${DB[$s]}" >/dev/null 2>$s.log &
  GP[$s]=$!; PIDS+=($!); URL[$s]=http://127.0.0.1:$port/v1/chat/completions
done
start_nginx "$D/ngx" "$MP" 29599
sleep 1.5
for p in ${GP[old]} ${GP[new]} ${GP[off]} $NPID $(pgrep -P $NPID); do taskset -a -p -c 0 "$p" >/dev/null; done
export BENCH_TOKEN=sk-bench-client-token
declare -A REQ P50 P99 TK N SENT
# Waits until no gateway uses the CPU (a writer still catching up after a c=64 run, or its
# checkpoint, would otherwise run on core 0 during the next system's c=1 run), at most 30 s.
settle() {
  local all="${GP[old]} ${GP[new]} ${GP[off]}" a b i
  for i in $(seq 60); do
    a=$(ticks $all); sleep 0.5; b=$(ticks $all)
    ((b - a <= 1)) && return
  done
}
wrk_once() { # SYSTEM CONNS KIND
  settle
  local s=$1 c=$2 kind=$3 q="" t=1 out
  export BENCH_STREAM=0; [[ $kind == stream ]] && { BENCH_STREAM=1; q='?chunks=10&gap_ms=0'; }
  ((c > 1)) && t=2
  local pids; pids=$(pids_of "$s"); local t0; t0=$(ticks $pids)
  out=$(taskset -c 1 wrk -t$t -c$c -d${DUR}s -s "$ROOT/bench/post.lua" "${URL[$s]}$q" 2>&1)
  local t1; t1=$(ticks $pids)
  local line; line=$(grep '^WRK ' <<<"$out")
  local n p50 p99
  n=$(grep -o 'requests=[0-9]*' <<<"$line" | cut -d= -f2)
  p50=$(grep -o 'p50_us=[0-9.]*' <<<"$line" | cut -d= -f2); p99=$(grep -o 'p99_us=[0-9.]*' <<<"$line" | cut -d= -f2)
  local k=$s:$kind:$c
  REQ[$k]=$(( ${REQ[$k]:-0} + n )); TK[$k]=$(( ${TK[$k]:-0} + t1 - t0 )); N[$k]=$(( ${N[$k]:-0} + 1 ))
  P50[$k]=$(awk -v a="${P50[$k]:-0}" -v b="$p50" 'BEGIN{print a+b}'); P99[$k]=$(awk -v a="${P99[$k]:-0}" -v b="$p99" 'BEGIN{print a+b}')
  SENT[$s]=$(( ${SENT[$s]:-0} + n ))
  echo "$kind c=$c $s: $n requests, p50 ${p50} µs, p99 ${p99} µs" >&2
}
# Warm-up (its requests are counted for the records check too).
for s in old new off nginx; do wrk_once "$s" 64 json >/dev/null 2>&1; done
for r in $(seq "$ROUNDS"); do
  order=(old new off nginx); ((r % 2 == 0)) && order=(nginx off new old)
  for kind in json stream; do for s in "${order[@]}"; do wrk_once "$s" 1 $kind; done; done
  for s in "${order[@]}"; do wrk_once "$s" 64 json; done
done
# SIGTERM flushes every queued record; then count the rows.
for s in old new; do kill -TERM ${GP[$s]}; done
for s in old new; do while kill -0 ${GP[$s]} 2>/dev/null; do sleep 0.1; done; done
rows() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from records').fetchone()[0])" "$1"; }
avg() { awk -v a="${2}" -v n="${N[$1]}" 'BEGIN{printf "%.0f", a/n}'; }
echo
echo "| system | c=1 JSON p50 | c=1 JSON p99 | c=1 stream p50 | c=1 stream p99 | c=64 JSON req/s | CPU µs/req (c=64 JSON) |"
echo "|---|---|---|---|---|---|---|"
for s in nginx old new off; do
  kj=$s:json:1; ks=$s:stream:1; k64=$s:json:64
  rps=$(awk -v r=${REQ[$k64]} -v n=${N[$k64]} -v d=$DUR 'BEGIN{printf "%.0f", r/(n*d)}')
  cpu=$(awk -v t=${TK[$k64]} -v n=${REQ[$k64]} 'BEGIN{printf "%.1f", t*10000/n}')
  name=$s; case $s in old) name="OLD, SQLite";; new) name="NEW, SQLite";; off) name="NEW, -database none";; esac
  echo "| $name | $(avg $kj ${P50[$kj]}) µs | $(avg $kj ${P99[$kj]}) µs | $(avg $ks ${P50[$ks]}) µs | $(avg $ks ${P99[$ks]}) µs | $rps | $cpu |"
done
echo
for s in old new; do
  for kind in json stream; do
    echo "$s c=1 $kind p99 ÷ nginx: $(awk -v a=${P99[$s:$kind:1]} -v b=${P99[nginx:$kind:1]} 'BEGIN{printf "%.2f", a/b}')"
  done
  echo "$s records ratio (c=64 req/s ÷ NEW -database none): $(awk -v a=${REQ[$s:json:64]} -v b=${REQ[off:json:64]} 'BEGIN{printf "%.2f", a/b}')"
  echo "$s c=64 JSON req/s ÷ nginx: $(awk -v a=${REQ[$s:json:64]} -v b=${REQ[nginx:json:64]} 'BEGIN{printf "%.2f", a/b}')"
  echo "$s records: $(rows "${DB[$s]}") rows for ${SENT[$s]} requests answered"
done
kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null
