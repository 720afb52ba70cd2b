#!/usr/bin/env bash
# Where one request's time goes at c=1 (issue "Recording nearly free, and a c=1 path as short as
# nginx's"): for nginx, the gateway with -database none (`off`) and recording (`on`), a c=1 wrk run
# of JSON requests under `perf stat` of the proxy's own processes — CPU time, context switches and
# system calls per request — beside the p50 it added over the mock alone (`direct`). Interleaved
# rounds, as bench/record.sh; the servers on core 0, wrk on core 1.
#
#   bench/c1path.sh [GATEWAY_BINARY]      # ROUNDS (default 3), DUR (seconds, default 5)
#
# Needs perf (with the raw_syscalls tracepoints: root), nginx, wrk and bench_mock.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/openai-api-route}
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
ROUNDS=${ROUNDS:-3}; DUR=${DUR:-5}
MOCK=$ROOT/bench/out/bin/bench_mock; [[ -x $MOCK ]] || MOCK=$ROOT/target/release/examples/bench_mock
D=$ROOT/bench/out/c1path; rm -rf "$D"; mkdir -p "$D/ngx"; cd "$D" || exit 1
PIDS=()
start_four_systems "$BIN" "$D" 29800
export BENCH_TOKEN=sk-bench-client-token BENCH_STREAM=0
declare -A REQ P50 CPU CS SC N
run() {
  local s=$1 pids out line n p50 stat
  pids=$(pids_of "$s" | tr ' ' ',')
  perf stat -x, -e task-clock,context-switches,raw_syscalls:sys_enter -p "$pids" -o "$s.stat" -- sleep $((DUR + 1)) &
  local pp=$!
  sleep 0.3
  out=$(taskset -c 1 wrk -t1 -c1 -d"${DUR}"s -s "$ROOT/bench/post.lua" "${URL[$s]}" 2>&1)
  wait $pp
  line=$(grep '^WRK ' <<<"$out")
  n=$(grep -o 'requests=[0-9]*' <<<"$line" | cut -d= -f2)
  p50=$(grep -o 'p50_us=[0-9.]*' <<<"$line" | cut -d= -f2)
  REQ[$s]=$(( ${REQ[$s]:-0} + n )); N[$s]=$(( ${N[$s]:-0} + 1 ))
  P50[$s]=$(awk -v a="${P50[$s]:-0}" -v b="$p50" 'BEGIN{print a+b}')
  # perf stat -x,: value,unit,event,...
  CPU[$s]=$(awk -F, -v a="${CPU[$s]:-0}" '$3=="task-clock"{a+=$1} END{print a}' "$s.stat")
  CS[$s]=$(awk -F, -v a="${CS[$s]:-0}" '$3=="context-switches"{a+=$1} END{print a}' "$s.stat")
  SC[$s]=$(awk -F, -v a="${SC[$s]:-0}" '$3=="raw_syscalls:sys_enter"{a+=$1} END{print a}' "$s.stat")
  echo "$s: $n requests, p50 $p50 µs" >&2
}
for r in $(seq "$ROUNDS"); do
  order=(direct nginx off on); ((r % 2 == 0)) && order=(on off nginx direct)
  for s in "${order[@]}"; do run "$s"; done
done
d50=$(awk -v a="${P50[direct]}" -v n="${N[direct]}" 'BEGIN{printf "%.0f", a/n}')
echo
echo "| system | c=1 p50 | added over direct | CPU µs/req (its processes) | context switches/req | system calls/req |"
echo "|---|---|---|---|---|---|"
for s in direct nginx off on; do
  awk -v s="$s" -v p="${P50[$s]}" -v n="${N[$s]}" -v d="$d50" -v r="${REQ[$s]}" -v c="${CPU[$s]}" -v cs="${CS[$s]}" -v sc="${SC[$s]}" \
    'BEGIN{p50=p/n; printf "| %s | %.0f µs | +%.0f µs | %.1f | %.2f | %.1f |\n", s, p50, p50-d, c*1000/r, cs/r, sc/r}'
done
kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null
