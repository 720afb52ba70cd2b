#!/usr/bin/env bash
# Interleaved A/B of two gateway binaries and nginx at c=64: CPU per request (all threads, user +
# system), JSON and 10-chunk stream requests, recording ON (SQLite), same bench_mock upstream.
#
#   bench/ab.sh OLD_BINARY NEW_BINARY     # e.g. a release build of an older commit vs target/release
#
# Servers (mock, both gateways, nginx) on core 0, wrk on core 1, systems alternating each round.
# ROUNDS (default 4) and DUR (seconds, default 5) set the length; OLD_DB=none or NEW_DB=none runs
# that side with -database none (e.g. the same binary twice, to measure what recording costs). Needs nginx and wrk, and
# bench/out/bin/bench_mock from one run of bench/run.sh.
set -u
OLD_BIN=${1:?old gateway binary}; NEW_BIN=${2:?new gateway binary}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
ROUNDS=${ROUNDS:-4}; DUR=${DUR:-5}; B=$ROOT/bench/out/bin; D=$ROOT/bench/out/ab; rm -rf "$D"; mkdir -p "$D/ngx"; cd "$D" || exit 1
ulimit -n 20000
taskset -c 0 $B/bench_mock 127.0.0.1:0 --threads 1 > mock.out 2>/dev/null &
PIDS=($!); sleep 0.5; MP=$(awk '/^port /{print $2}' mock.out)
printf 'authorization: sk-bench-client-token\nupstreams:\n  - name: mock\n    endpoint: http://127.0.0.1:%s/v1\n    sk: k\n' $MP > gw.yaml
declare -A URL GP
port=29400
for s in old new; do
  port=$((port+1))
  BIN=$OLD_BIN; [[ $s == new ]] && BIN=$NEW_BIN
  DB=$D/$s.sqlite; [[ $s == old && ${OLD_DB:-} == none ]] && DB=none; [[ $s == new && ${NEW_DB:-} == none ]] && DB=none
  taskset -c 0 "$BIN" -addr 127.0.0.1:$port -config gw.yaml -database "$DB" >/dev/null 2>$s.log &
  GP[$s]=$!; PIDS+=($!); URL[$s]=http://127.0.0.1:$port/v1/chat/completions
done
start_nginx "$D/ngx" "$MP" 29499
sleep 1.5
for p in ${GP[old]} ${GP[new]} $NPID $(pgrep -P $NPID); do taskset -a -p -c 0 $p >/dev/null; done
export BENCH_TOKEN=sk-bench-client-token
declare -A REQ TK
for kind in json stream; do
  lua=$ROOT/bench/post.lua; q=""; export BENCH_STREAM=0; [[ $kind == stream ]] && { BENCH_STREAM=1; q='?chunks=10&gap_ms=0'; }
  for s in old new nginx; do taskset -c 1 wrk -t2 -c64 -d2s -s $lua "${URL[$s]}$q" >/dev/null 2>&1; done
  for r in $(seq $ROUNDS); do
    order=(old new nginx); ((r%2==0)) && order=(nginx new old)
    for s in "${order[@]}"; do
      pids=$(pids_of $s); t0=$(ticks $pids)
      out=$(taskset -c 1 wrk -t2 -c64 -d${DUR}s -s $lua "${URL[$s]}$q" 2>&1)
      t1=$(ticks $pids); n=$(grep -o 'requests=[0-9]*' <<<"$out" | cut -d= -f2)
      REQ[$kind:$s]=$(( ${REQ[$kind:$s]:-0} + n )); TK[$kind:$s]=$(( ${TK[$kind:$s]:-0} + t1 - t0 ))
      echo "$kind $s round $r: $n requests, $(awk -v t=$((t1-t0)) -v n=$n 'BEGIN{printf "%.1f", t*10000/n}') µs CPU/req" >&2
    done
  done
done
echo "| request | gateway OLD | gateway NEW | nginx | before / nginx | now / nginx | now req/s ÷ nginx |"
echo "|---|---|---|---|---|---|---|"
for kind in json stream; do
  cpu() { awk -v t=${TK[$kind:$1]} -v n=${REQ[$kind:$1]} 'BEGIN{printf "%.1f", t*10000/n}'; }
  o=$(cpu old); w=$(cpu new); x=$(cpu nginx)
  echo "| $kind c=64 | $o µs | $w µs | $x µs | $(awk -v a=$o -v b=$x 'BEGIN{printf "%.2f×", a/b}') | $(awk -v a=$w -v b=$x 'BEGIN{printf "%.2f×", a/b}') | $(awk -v a=${REQ[$kind:new]} -v b=${REQ[$kind:nginx]} 'BEGIN{printf "%.2f", a/b}') |"
done
kill ${PIDS[@]}; wait 2>/dev/null
