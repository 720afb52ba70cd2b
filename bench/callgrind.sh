#!/usr/bin/env bash
# Instructions per proxied request, under callgrind (deterministic, unlike wall-clock on a shared
# machine): the gateway binary under `valgrind --tool=callgrind`, bench_mock as the upstream, wrk
# at c=1. Instrumentation is switched on after a 3 s warm-up and off after the load (plus 0.5 s,
# so the records writer's batches of the measured requests are counted); every gateway thread
# counts; the total is divided by wrk's request count.
#
#   bench/callgrind.sh [json|stream] [none|sqlite] [SECONDS] [GATEWAY_BINARY]
#   MEMBERS=1 bench/callgrind.sh …   # the config of bench/members.sh: 1,000 members, the
#                                    # benchmark's key one of them with rpm and tpm
#
# Defaults: json sqlite 8 bench/out/bin/openai-api-route (run bench/run.sh once to build it, or
# pass a binary). Streams are 10 chunks with no gap (`?chunks=10&gap_ms=0`). Needs valgrind and
# wrk (`apt-get install valgrind wrk`). Prints one `CG` line; the profile stays in
# bench/out/callgrind/ (`callgrind_annotate bench/out/callgrind/<kind>-<db>/cg.out.1`).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIND=${1:-json}; DB=${2:-sqlite}; SECS=${3:-8}; GW=${4:-$ROOT/bench/out/bin/openai-api-route}
MOCK_BIN=$ROOT/bench/out/bin/bench_mock
for b in "$GW" "$MOCK_BIN"; do [[ -x $b ]] || { echo "callgrind.sh: $b missing (run bench/run.sh once)" >&2; exit 1; }; done
D=$ROOT/bench/out/callgrind/$KIND-$DB${MEMBERS:+-members}
rm -rf "$D"; mkdir -p "$D"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null' EXIT
"$MOCK_BIN" 127.0.0.1:0 --threads 1 >"$D/mock.out" 2>"$D/mock.log" &
PIDS+=($!)
for _ in $(seq 100); do grep -q '^port ' "$D/mock.out" && break; sleep 0.05; done
MP=$(awk '/^port /{print $2}' "$D/mock.out")
GP=$((20000 + RANDOM % 20000))
if [[ ${MEMBERS:-0} == 1 ]]; then
  # shellcheck source=bench/lib.sh
  . "$ROOT/bench/lib.sh"
  members_yaml "$MP" sk-bench-client-token >"$D/gw.yaml"
else
  printf 'authorization: sk-bench-client-token\nupstreams:\n  - name: mock\n    endpoint: http://127.0.0.1:%s/v1\n    sk: sk-bench-upstream-key\n' "$MP" >"$D/gw.yaml"
fi
[[ $DB == sqlite ]] && DBARG=$D/records.sqlite || DBARG=none
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$D/cg.out" \
  "$GW" -addr "127.0.0.1:$GP" -config "$D/gw.yaml" -database "$DBARG" >"$D/gw.out" 2>"$D/gw.log" &
GWP=$!
PIDS+=("$GWP")
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$GP/healthz" && break; sleep 0.1; done
URL=http://127.0.0.1:$GP/v1/chat/completions
LUA=$ROOT/bench/post.lua
if [[ $KIND == stream ]]; then
  export BENCH_STREAM=1
  URL="$URL?chunks=10&gap_ms=0"
fi
export BENCH_TOKEN=sk-bench-client-token
wrk -t1 -c1 -d3s -s "$LUA" "$URL" >/dev/null 2>&1
callgrind_control -i on "$GWP" >/dev/null 2>&1
OUT=$(wrk -t1 -c1 -d"${SECS}s" -s "$LUA" "$URL" 2>&1)
sleep 0.5
callgrind_control -i off "$GWP" >/dev/null 2>&1
callgrind_control -d "$GWP" >/dev/null 2>&1
sleep 1
REQ=$(grep -o 'requests=[0-9]*' <<<"$OUT" | head -1 | cut -d= -f2)
ERR=$(grep -o 'err_status=[0-9]*' <<<"$OUT" | head -1)
# A dump's instruction count is its `totals:` line (its `summary:` header stays 0).
IR=$(cat "$D"/cg.out* 2>/dev/null | awk '/^totals:/ { s += $2 } END { print s + 0 }')
echo "CG $KIND db=$DB requests=${REQ:-0} $ERR Ir=$IR Ir_per_req=$(awk -v i="$IR" -v r="${REQ:-0}" 'BEGIN { printf "%.0f", r ? i / r : 0 }')"
