#!/usr/bin/env bash
# PostgreSQL recording figures: records/s into PostgreSQL through the real Recorder/DbActor, and
# the gateway's c=64 throughput with PostgreSQL recording vs -database none, alternating in one
# run. Needs a PostgreSQL server (default: the machine's, trust auth); creates and drops its own
# database. Gateways and the mock on core 0, wrk on core 1, as bench/run.sh does; each round runs
# the PostgreSQL-recording gateway twice: with the benchmark database's PostgreSQL backends kept off
# core 0 (a shared database normally runs on its own machine) and left to the scheduler.
#
#   bench/postgres.sh                       # BENCH_POSTGRES=postgres://postgres@127.0.0.1:5432/test
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_database oar_bench
DUR=${BENCH_DUR:-5}
ROUNDS=${BENCH_ROUNDS:-2}
OUT=bench/out/pg
mkdir -p "$OUT"

echo "== building (release)"
cargo build --release --locked --examples --bins -q
cargo bench --locked --bench records --no-run -q 2>/dev/null

echo "== records/s into PostgreSQL"
RECORDS_DATABASE="$URL" cargo bench --locked --bench records -q 2>/dev/null | grep -E "^records:|^RESULT"

TOKEN=sk-bench-client-token
target/release/examples/bench_mock 127.0.0.1:0 > "$OUT/mock.log" 2>&1 & PIDS+=($!)
sleep 0.3
MOCK_PORT=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$OUT/mock.log" | cut -d: -f2)
taskset -a -p -c 0 "${PIDS[0]}" >/dev/null
cat > "$OUT/gw.yaml" <<YAML
authorization: $TOKEN
upstreams:
  - name: mock
    endpoint: http://127.0.0.1:$MOCK_PORT/v1
    sk: sk-bench-upstream
YAML
start_gw() { # name database; sets GW_ADDR (not in a subshell, so PIDS keeps the pid for cleanup)
  target/release/openai-api-route -addr 127.0.0.1:0 -config "$OUT/gw.yaml" -database "$2" > "$OUT/$1.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  for _ in $(seq 100); do grep -q "listening on" "$OUT/$1.log" && break; sleep 0.05; done
  taskset -a -p -c 0 "$pid" >/dev/null
  GW_ADDR=$(grep -o 'listening on [0-9.:]*' "$OUT/$1.log" | cut -d' ' -f3)
}
start_gw gw_pg "$URL"; PG_ADDR=$GW_ADDR
# PostgreSQL is the shared server of a scale-out deployment, normally another machine. Each round
# measures it both ways: its backends for this database kept off the gateway's core (on core 1,
# with wrk), and left to the scheduler (they then take CPU from the gateway's core too).
pin_pg() { # CPU list for the PostgreSQL backends serving the benchmark database
  for p in $(psql "$ADMIN" -tAc "SELECT pid FROM pg_stat_activity WHERE datname = '$DB'"); do
    taskset -p -c "$1" "$p" >/dev/null 2>&1 || true
  done
}
start_gw gw_none none; NONE_ADDR=$GW_ADDR
rps() { BENCH_TOKEN=$TOKEN taskset -c 1 wrk -t2 -c64 -d"${DUR}s" -s bench/post.lua "http://$1/v1/chat/completions" 2>/dev/null | awk '/Requests\/sec/ {print int($2)}'; }
echo "== c=64 for ${DUR}s, ${ROUNDS} rounds alternating (gateways on core 0, wrk on core 1)"
rps "$PG_ADDR" >/dev/null; rps "$NONE_ADDR" >/dev/null   # warm-up
ALL_CPUS=0-$(($(nproc) - 1))
pg_sum=0; none_sum=0; free_sum=0
for r in $(seq "$ROUNDS"); do
  pin_pg 1; a=$(rps "$PG_ADDR")
  b=$(rps "$NONE_ADDR")
  pin_pg "$ALL_CPUS"; c=$(rps "$PG_ADDR")
  echo "round $r: postgres recording $a req/s (PostgreSQL off core 0), $c req/s (PostgreSQL unpinned); -database none $b req/s"
  pg_sum=$((pg_sum + a)); none_sum=$((none_sum + b)); free_sum=$((free_sum + c))
done
sleep 0.3
dropped=$(curl -s "http://$PG_ADDR/v1/metrics" | awk '/^openai_api_route_records_dropped_total / {print $2}')
rows=$(psql "$URL" -tAc "SELECT COUNT(*) FROM records")
echo "RESULT postgres_rps=$((pg_sum / ROUNDS)) none_rps=$((none_sum / ROUNDS)) ratio=$(awk "BEGIN {printf \"%.2f\", $pg_sum / $none_sum}") unpinned_rps=$((free_sum / ROUNDS)) unpinned_ratio=$(awk "BEGIN {printf \"%.2f\", $free_sum / $none_sum}") rows=$rows dropped=${dropped:-?}"
