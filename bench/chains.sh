#!/usr/bin/env bash
# Bounded chain reading (0.4, docs/affinity.md "Bounded reading"): peak RSS at start with N large
# Responses records in the store (each a ~460 KB request body + kept output items, all owned by
# one upstream, `rebuild: true`) against the same gateway started on an empty store — SQLite,
# then PostgreSQL — and the CPU that two idle PostgreSQL replicas and PostgreSQL itself use over
# BENCH_IDLE seconds after that load. Seeds the records straight into the `records` table
# (sqlite3, psql); creates its own PostgreSQL database and drops it afterwards.
#
#   bench/chains.sh                                   # 1,000 records, rebuild_memory 64 MiB, 60 s idle
#   BENCH_N=400 BENCH_IDLE=8 BENCH_BIN=/tmp/old-binary bench/chains.sh
#   BENCH_POSTGRES=none bench/chains.sh               # SQLite only
#   BENCH_REBUILD_MEMORY=16777216 bench/chains.sh     # another budget
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BENCH_N:-1000}
IDLE=${BENCH_IDLE:-60}
ADMIN=${BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
DB=chains_bench_$$
URL="${ADMIN%/*}/$DB"
OUT=bench/out/chains
BIN=${BENCH_BIN:-target/release/openai-api-route}
MEM=${BENCH_REBUILD_MEMORY:-}
mkdir -p "$OUT"
rm -f "$OUT"/*.sqlite* "$OUT"/*.log
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "$ADMIN" != none ]; then
    psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

if [ -z "${BENCH_BIN:-}" ]; then
  echo "== building (release)"
  cargo build --release --locked --bin openai-api-route -q
fi
cat > "$OUT/gw.yaml" <<YAML
authorization: sk-bench-client-token
rebuild: true
${MEM:+rebuild_memory: $MEM}
upstreams:
  - name: up
    endpoint: http://127.0.0.1:9/v1
YAML

# start NAME DATABASE: a gateway in the background; waits until it listens; sets GW (its pid)
# and START_MS (spawn to listening).
start() {
  local t0=$(date +%s%N)
  RUST_LOG=info "$BIN" -addr 127.0.0.1:0 -config "$OUT/gw.yaml" -database "$2" > "$OUT/$1.log" 2>&1 &
  GW=$!; PIDS+=("$GW")
  for _ in $(seq 1200); do grep -qs "listening on" "$OUT/$1.log" && break; sleep 0.05; done
  grep -q "listening on" "$OUT/$1.log" || { echo "$1 did not start:"; cat "$OUT/$1.log"; exit 1; }
  START_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
}
stop() { kill -TERM "$1"; wait "$1" 2>/dev/null || true; }
kb() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }
# mem NAME PID: peak (VmHWM) and current (VmRSS) resident memory, in MiB.
mem() { printf '%-28s peak %6.1f MiB   now %6.1f MiB' "$1" "$(echo "$(kb "$2" VmHWM)/1024" | bc -l)" "$(echo "$(kb "$2" VmRSS)/1024" | bc -l)"; }
ticks() { local t=0 p; for p in "$@"; do [ -r "/proc/$p/stat" ] && t=$((t + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12+$13}'))); done; echo $t; }
loaded() { grep -o "[0-9]* bytes of chain parts loaded" "$OUT/$1.log" | head -1 | awk '{printf "%.1f MiB of chain parts", $1/1048576}'; }

BODY="'{\"model\":\"m\",\"input\":\"'"
ITEMS="'[{\"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"'"
END_ITEMS="'\"}]}]'"
COLS="created_at, method, path, upstream, status, complete, object_id, request_body, response_items"

echo "== SQLite: $N records of ~460 KB"
start sqlite-empty "$OUT/empty.sqlite"; sleep 1
echo "$(mem "empty store" $GW)   start ${START_MS} ms"; stop $GW
start sqlite-seed "$OUT/full.sqlite"; stop $GW   # the gateway's own tables
sqlite3 "$OUT/full.sqlite" <<SQL
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < $N - 1)
INSERT INTO records ($COLS)
SELECT strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), 'POST', '/v1/responses', 'up', 200, 1, 'resp_bench_' || i,
       $BODY || hex(randomblob(115000)) || '"}', $ITEMS || hex(randomblob(115000)) || $END_ITEMS
FROM n;
SQL
echo "store: $(du -m "$OUT/full.sqlite" | cut -f1) MB"
start sqlite-full "$OUT/full.sqlite"; sleep 1
echo "$(mem "$N records" $GW)   start ${START_MS} ms   $(loaded sqlite-full)"; stop $GW

[ "$ADMIN" = none ] && exit 0
echo "== PostgreSQL: $N records of ~460 KB, two replicas"
psql "$ADMIN" -qc "CREATE DATABASE $DB" >/dev/null
start pg-empty "$URL"; sleep 1
echo "$(mem "empty store" $GW)   start ${START_MS} ms"
POLLED=$GW   # running while the records arrive: reads them in its poll
psql "$URL" -q <<SQL
INSERT INTO records ($COLS)
SELECT now(), 'POST', '/v1/responses', 'up', 200, 1, 'resp_bench_' || i,
       $BODY || (SELECT string_agg(md5(random()::text || i || j), '') FROM generate_series(1, 3600) j) || '"}',
       $ITEMS || (SELECT string_agg(md5(random()::text || i || j), '') FROM generate_series(1, 3600) j) || $END_ITEMS
FROM generate_series(0, $N - 1) i;
SQL
echo "store: $(psql "$URL" -Atc "SELECT pg_database_size('$DB') / 1048576") MB"
start pg-full "$URL"; STARTED=$GW
sleep 5
echo "$(mem "$N records, at start" $STARTED)   start ${START_MS} ms   $(loaded pg-full)"
echo "$(mem "$N records, by its poll" $POLLED)"
backends() { psql "$ADMIN" -Atc "SELECT pid FROM pg_stat_activity WHERE datname = '$DB'"; }
a0=$(ticks $POLLED); b0=$(ticks $STARTED); p0=$(ticks $(backends))
sleep "$IDLE"
a1=$(ticks $POLLED); b1=$(ticks $STARTED); p1=$(ticks $(backends))
echo "idle ${IDLE} s: replica (poll) $(echo "($a1-$a0)/100" | bc -l | xargs printf '%.2f') CPU-s," \
  "replica (start) $(echo "($b1-$b0)/100" | bc -l | xargs printf '%.2f') CPU-s," \
  "PostgreSQL backends $(echo "($p1-$p0)/100" | bc -l | xargs printf '%.2f') CPU-s"
echo "$(mem "replica (poll), after idle" $POLLED)"
echo "$(mem "replica (start), after idle" $STARTED)"
