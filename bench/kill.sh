#!/usr/bin/env bash
# What a crash under load loses with the record spool (see the observability guide, "The spool"):
# the gateway recording to SQLite under wrk (JSON, c=32), killed with SIGKILL after KILL_AT
# seconds (default 5) while wrk keeps sending; then started again on the same database. Prints
# the spool's size at the kill, the requests wrk had answered, the rows before and after the
# restart (no row twice: every request id distinct) and how long the restart took to listen.
#
#   bench/kill.sh [GATEWAY_BINARY]        # default target/release/openai-api-route
#
# Gateway and mock on core 0, wrk on core 1. Needs wrk, python3, curl and bench_mock.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/openai-api-route}
MOCK=$ROOT/bench/out/bin/bench_mock; [[ -x $MOCK ]] || MOCK=$ROOT/target/release/examples/bench_mock
D=$ROOT/bench/out/kill; rm -rf "$D"; mkdir -p "$D"; cd "$D" || exit 1
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
PIDS=(); start_mock; MPID=${PIDS[-1]}
taskset -c 0 "$BIN" -addr 127.0.0.1:29950 -config gw.yaml -database "$D/db.sqlite" >/dev/null 2>gw1.log &
GP=$!; sleep 1
export BENCH_TOKEN=sk-bench-client-token BENCH_STREAM=0
taskset -c 1 wrk -t2 -c32 -d8s -s "$ROOT/bench/post.lua" http://127.0.0.1:29950/v1/chat/completions > wrk.out 2>&1 &
WP=$!
sleep "${KILL_AT:-5}"
echo "spool at the kill: $(stat -c %s db.sqlite-spool) bytes"
kill -KILL $GP; wait $GP 2>/dev/null; wait $WP
echo "answered before the kill: $(grep -o 'requests=[0-9]*' wrk.out | cut -d= -f2)"
rows() { python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print(c.execute('select count(*), count(distinct request_id) from records').fetchone())" db.sqlite; }
echo "rows, distinct request ids before the restart: $(rows)"
T0=$(date +%s%N)
taskset -c 0 "$BIN" -addr 127.0.0.1:29951 -config gw.yaml -database "$D/db.sqlite" >/dev/null 2>gw2.log &
GP=$!
until curl -s -o /dev/null http://127.0.0.1:29951/healthz; do sleep 0.02; done
echo "the restart listened after $(( ($(date +%s%N) - T0) / 1000000 )) ms: $(grep -o 'wrote [0-9]* request records[^"]*' gw2.log)"
echo "rows, distinct request ids after the restart: $(rows)"
kill -TERM $GP; wait $GP 2>/dev/null; kill $MPID 2>/dev/null
