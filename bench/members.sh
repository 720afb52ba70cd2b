#!/usr/bin/env bash
# What members cost (docs/benchmarks.md, "Members (0.4)"): CPU per request of one gateway binary
# with 1,000 members, of which the benchmark's key has `rpm` and `tpm` (high enough never to
# refuse: every request is checked, counted, its tokens added and its answer given the
# x-ratelimit-* headers), against the same binary with one `authorization` token. Interleaved,
# at c=64, JSON and 10-chunk stream requests, recording ON (SQLite), nginx as the yardstick.
#
#   bench/members.sh [BINARY]     # default target/release/openai-api-route
#
# Servers (mock, both gateways, nginx) on core 0, wrk on core 1, the three systems alternating
# each round with the members' gateway always next to the token's, so that each round gives one
# ratio measured within seconds: on a shared machine the median of those ratios says more than
# the totals (both are printed). ROUNDS (default 12) and DUR (seconds, default 4) set the length. Needs nginx and wrk
# (`apt-get install -y wrk nginx`) and bench/out/bin/bench_mock (bench/run.sh builds it, or
# `cargo build --release --example bench_mock` and copy target/release/examples/bench_mock).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(realpath "${1:-$ROOT/target/release/openai-api-route}")
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
ROUNDS=${ROUNDS:-12}; DUR=${DUR:-4}; B=$ROOT/bench/out/bin; D=$ROOT/bench/out/members; rm -rf "$D"; mkdir -p "$D/ngx"; cd "$D" || exit 1
MOCK_BIN=$B/bench_mock; [[ -x $MOCK_BIN ]] || MOCK_BIN=$ROOT/target/release/examples/bench_mock
ulimit -n 20000
taskset -c 0 "$MOCK_BIN" 127.0.0.1:0 --threads 1 > mock.out 2>/dev/null &
PIDS=($!); sleep 0.5; MP=$(awk '/^port /{print $2}' mock.out)
TOKEN=sk-bench-client-token
UP=$(printf 'upstreams:\n  - name: mock\n    endpoint: http://127.0.0.1:%s/v1\n    sk: k\n' "$MP")
printf 'authorization: %s\n%s\n' "$TOKEN" "$UP" > token.yaml
members_yaml "$MP" "$TOKEN" > members.yaml
declare -A URL GP
port=29500
for s in token members; do
  port=$((port+1))
  taskset -c 0 "$BIN" -addr 127.0.0.1:$port -config $s.yaml -database "$D/$s.sqlite" >/dev/null 2>$s.log &
  GP[$s]=$!; PIDS+=($!); URL[$s]=http://127.0.0.1:$port/v1/chat/completions
done
start_nginx "$D/ngx" "$MP" 29599
sleep 1.5
for p in ${GP[token]} ${GP[members]} $NPID $(pgrep -P $NPID); do taskset -a -p -c 0 $p >/dev/null; done
# Both gateways answer, and the member's answers carry its own rate-limit headers.
for s in token members; do
  h=$(curl -s -D - -o /dev/null -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' "${URL[$s]}")
  grep -q '^HTTP/1.1 200' <<<"$h" || { echo "$s did not answer 200: $h" >&2; kill "${PIDS[@]}"; exit 1; }
  echo "$s: $(grep -ci '^x-ratelimit-' <<<"$h") x-ratelimit-* headers" >&2
done
export BENCH_TOKEN=$TOKEN
declare -A REQ TK RATIOS
for kind in json stream; do
  lua=$ROOT/bench/post.lua; q=""; export BENCH_STREAM=0; [[ $kind == stream ]] && { BENCH_STREAM=1; q='?chunks=10&gap_ms=0'; }
  for s in token members nginx; do taskset -c 1 wrk -t2 -c64 -d2s -s "$lua" "${URL[$s]}$q" >/dev/null 2>&1; done
  for r in $(seq "$ROUNDS"); do
    order=(token members nginx); ((r%2==0)) && order=(nginx members token)
    for s in "${order[@]}"; do
      pids=$(pids_of $s); t0=$(ticks $pids)
      out=$(taskset -c 1 wrk -t2 -c64 -d"${DUR}"s -s "$lua" "${URL[$s]}$q" 2>&1)
      t1=$(ticks $pids); n=$(grep -o 'requests=[0-9]*' <<<"$out" | cut -d= -f2)
      REQ[$kind:$s]=$(( ${REQ[$kind:$s]:-0} + n )); TK[$kind:$s]=$(( ${TK[$kind:$s]:-0} + t1 - t0 ))
      declare -A ROUND; ROUND[$s]=$(awk -v t=$((t1-t0)) -v n="$n" 'BEGIN{printf "%.2f", t*10000/n}')
      echo "$kind $s round $r: $n requests, ${ROUND[$s]} µs CPU/req" >&2
    done
    RATIOS[$kind]+=" $(awk -v a="${ROUND[token]}" -v b="${ROUND[members]}" 'BEGIN{printf "%.4f", b/a}')"
  done
done
# The median of the rounds' members ÷ token ratios, as a signed percentage.
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR]=$1} END{m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; printf "%+.1f%%", (m-1)*100}'; }
# Not one request of the benchmark's member was refused.
limited=$(curl -s "${URL[members]%/chat/completions}/metrics" | grep -c '^openai_api_route_member_limited_total{.*member="bench"')
echo "member_limited_total series of the benchmark's member: $limited (must be 0)" >&2
echo "| request, c=64 | one authorization token | 1,000 members, rpm + tpm | members ÷ token, totals | members ÷ token, median of $ROUNDS rounds | nginx | token ÷ nginx |"
echo "|---|---|---|---|---|---|---|"
for kind in json stream; do
  cpu() { awk -v t=${TK[$kind:$1]} -v n=${REQ[$kind:$1]} 'BEGIN{printf "%.1f", t*10000/n}'; }
  a=$(cpu token); b=$(cpu members); x=$(cpu nginx)
  echo "| $kind | $a µs | $b µs | $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%+.1f%%", (b/a-1)*100}') | $(median "${RATIOS[$kind]}") | $x µs | $(awk -v a="$a" -v b="$x" 'BEGIN{printf "%.2f×", a/b}') |"
done
kill "${PIDS[@]}"; wait 2>/dev/null
