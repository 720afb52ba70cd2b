#!/usr/bin/env bash
# What recording costs, and the c=1 path (issue "Recording nearly free"): every figure of one
# interleaved run of four systems in front of the same bench_mock —
#   direct  wrk straight to the mock (the c=1 baseline for "added" latency)
#   nginx   nginx proxy_pass (bench/lib.sh)
#   off     the gateway with -database none
#   on      the same binary recording every request to SQLite
# then a soak of the recording gateway (JSON, then streams, at c=32) and the records check: after
# a SIGTERM (which flushes the queue) every request it answered is a row.
#
#   bench/record.sh [GATEWAY_BINARY]      # default target/release/openai-api-route
#
# Per system: c=1 p50/p99 of JSON and 10-chunk stream requests; c=64 requests/s and CPU per
# request (all the system's threads, user + system) for JSON and streams, during the run and
# with the catch-up after it (until the system is idle again: the spool's rows). Servers on core 0, wrk on
# core 1 (as bench/ab.sh); the systems' order alternates each round. ROUNDS (default 3), DUR
# (seconds per run, default 5) and SOAK (seconds per kind, default 30) set the length. Needs nginx,
# wrk, python3 and bench/out/bin/bench_mock (or target/release/examples/bench_mock).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/openai-api-route}
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
ROUNDS=${ROUNDS:-3}; DUR=${DUR:-5}; SOAK=${SOAK:-30}
MOCK=$ROOT/bench/out/bin/bench_mock; [[ -x $MOCK ]] || MOCK=$ROOT/target/release/examples/bench_mock
D=$ROOT/bench/out/record; rm -rf "$D"; mkdir -p "$D/ngx"; cd "$D" || exit 1
ulimit -n 20000
PIDS=()
start_four_systems "$BIN" "$D" 29700
export BENCH_TOKEN=sk-bench-client-token
declare -A REQ P50 P99 TK TC N
SENT=0
# Waits until the gateways are idle (a writer catching up after a c=64 run would otherwise run
# on core 0 during the next system's run), at most 30 s.
settle() {
  local a b i
  for i in $(seq 60); do
    a=$(ticks ${GP[off]} ${GP[on]}); sleep 0.5; b=$(ticks ${GP[off]} ${GP[on]})
    ((b - a <= 1)) && return
  done
}
# wrk_once SYSTEM CONNS KIND [SECONDS]
wrk_once() {
  settle
  local s=$1 c=$2 kind=$3 dur=${4:-$DUR} q="" t=1 out
  export BENCH_STREAM=0; [[ $kind == stream ]] && { BENCH_STREAM=1; q='?chunks=10&gap_ms=0'; }
  ((c > 1)) && t=2
  local pids; pids=$(pids_of "$s"); local t0; t0=$(ticks $pids)
  out=$(taskset -c 1 wrk -t$t -c"$c" -d"${dur}"s -s "$ROOT/bench/post.lua" "${URL[$s]}$q" 2>&1)
  local t1; t1=$(ticks $pids)
  # And with what the run left to do (the spool's rows, written once the machine is idle).
  settle; local t2; t2=$(ticks $pids)
  local line; line=$(grep '^WRK ' <<<"$out")
  local n p50 p99 bad
  n=$(grep -o 'requests=[0-9]*' <<<"$line" | cut -d= -f2)
  bad=$(grep -o 'err_status=[0-9]*' <<<"$line" | cut -d= -f2)
  ((bad > 0)) && echo "!! $s $kind c=$c: $bad non-2xx answers" >&2
  p50=$(grep -o 'p50_us=[0-9.]*' <<<"$line" | cut -d= -f2); p99=$(grep -o 'p99_us=[0-9.]*' <<<"$line" | cut -d= -f2)
  local k=$s:$kind:$c
  REQ[$k]=$(( ${REQ[$k]:-0} + n )); TK[$k]=$(( ${TK[$k]:-0} + t1 - t0 )); TC[$k]=$(( ${TC[$k]:-0} + t2 - t0 )); N[$k]=$(( ${N[$k]:-0} + 1 ))
  P50[$k]=$(awk -v a="${P50[$k]:-0}" -v b="$p50" 'BEGIN{print a+b}'); P99[$k]=$(awk -v a="${P99[$k]:-0}" -v b="$p99" 'BEGIN{print a+b}')
  [[ $s == on ]] && SENT=$((SENT + n))
  echo "$kind c=$c $s: $n requests, p50 ${p50} µs, p99 ${p99} µs, $(awk -v t=$((t1-t0)) -v n="$n" 'BEGIN{printf "%.1f", (n ? t*10000/n : 0)}') µs CPU/req" >&2
}
for s in direct nginx off on; do wrk_once "$s" 64 json 2 >/dev/null 2>&1; done
for r in $(seq "$ROUNDS"); do
  order=(direct nginx off on); ((r % 2 == 0)) && order=(on off nginx direct)
  for kind in json stream; do
    for s in "${order[@]}"; do wrk_once "$s" 1 $kind; done
    for s in "${order[@]}"; do wrk_once "$s" 64 $kind; done
  done
done
echo "soak: $SOAK s of JSON, then of streams, at c=32 (recording)" >&2
wrk_once on 32 json "$SOAK"; wrk_once on 32 stream "$SOAK"
# Records dropped at a full queue, as the gateway counts them (before it stops).
dropped=$(curl -s -H "authorization: Bearer $BENCH_TOKEN" "${URL[on]%/chat/completions}/metrics" \
  | awk '/^openai_api_route_records_dropped_total/{print $2}')
kill -TERM "${GP[on]}"; while kill -0 "${GP[on]}" 2>/dev/null; do sleep 0.1; done
rows=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from records').fetchone()[0])" "$D/on.sqlite")
avg() { awk -v a="$2" -v n="${N[$1]}" 'BEGIN{printf "%.0f", a/n}'; }
rps() { awk -v r="${REQ[$1]}" -v n="${N[$1]}" -v d="$DUR" 'BEGIN{printf "%.0f", r/(n*d)}'; }
cpu() { awk -v t="${TK[$1]}" -v n="${REQ[$1]}" 'BEGIN{printf "%.1f", t*10000/n}'; }
cpu_all() { awk -v t="${TC[$1]}" -v n="${REQ[$1]}" 'BEGIN{printf "%.1f", t*10000/n}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
echo
echo "| request | system | c=64 req/s | ÷ nginx | CPU µs/req | with catch-up | c=1 p50 | added over direct | c=1 p99 | p99 ÷ nginx |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for kind in json stream; do
  d50=$(avg direct:$kind:1 "${P50[direct:$kind:1]}")
  n50=$(avg nginx:$kind:1 "${P50[nginx:$kind:1]}"); n99=$(avg nginx:$kind:1 "${P99[nginx:$kind:1]}")
  for s in direct nginx off on; do
    p50=$(avg $s:$kind:1 "${P50[$s:$kind:1]}"); p99=$(avg $s:$kind:1 "${P99[$s:$kind:1]}")
    c="—"; ca="—"; [[ $s != direct ]] && { c="$(cpu $s:$kind:64) µs"; ca="$(cpu_all $s:$kind:64) µs"; }
    echo "| $kind | $s | $(rps $s:$kind:64) | $(ratio "${REQ[$s:$kind:64]}" "${REQ[nginx:$kind:64]}") | $c | $ca | $p50 µs | +$((p50 - d50)) µs | $p99 µs | $(ratio "$p99" "$n99") |"
  done
done
echo
for kind in json stream; do
  d50=$(avg direct:$kind:1 "${P50[direct:$kind:1]}"); n50=$(avg nginx:$kind:1 "${P50[nginx:$kind:1]}")
  for s in off on; do
    p50=$(avg $s:$kind:1 "${P50[$s:$kind:1]}")
    echo "$kind $s: c=1 p50 added ÷ nginx's added: $(ratio $((p50 - d50)) $((n50 - d50)))"
  done
  echo "$kind records ratio (c=64 req/s on ÷ off): $(ratio "${REQ[on:$kind:64]}" "${REQ[off:$kind:64]}")"
  echo "$kind CPU per request on ÷ off: $(ratio "$(cpu on:$kind:64)" "$(cpu off:$kind:64)") during the run, $(ratio "$(cpu_all on:$kind:64)" "$(cpu_all off:$kind:64)") with the catch-up after it"
done
echo "records: $rows rows for $SENT requests answered (the extra rows: requests wrk cut at the end of a run); records_dropped_total ${dropped:-?}; checkpoint warnings in the log: $(grep -c 'checkpoint failed' on.log)"
kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null
