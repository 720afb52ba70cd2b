#!/usr/bin/env bash
# PostgreSQL statements per second one replica makes (docs/benchmarks.md, "Replicas: PostgreSQL
# statements per second"), idle and loaded, counted by pg_stat_statements in a temporary cluster
# of this script's own (initdb on its own port, run as the postgres user; the machine's server is
# not touched). Two replicas share the database, as in production; the figures are replica A's:
#   idle      no traffic for DUR seconds
#   loaded    wrk -c16 against A for DUR seconds, a healthy upstream
#   churn     the same load with a second, dead upstream in front (cooldown 2 s, probe_interval 1):
#             cooldowns, half-open claims and probes all the time
# Statements are grouped by what makes them (replicas thread, record writer, owners poll, other).
#
#   bench/replicas.sh            # BIN=target/debug/openai-api-route DUR=20
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug/openai-api-route}
DUR=${DUR:-20}
PORT=${PG_PORT:-55439}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
OUT=bench/out/replicas
mkdir -p "$OUT"
TMP=$(mktemp -d)
chmod 755 "$TMP"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$TMP/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT
[ -x "$BIN" ] || cargo build -q --bins --examples
[ -x target/debug/examples/bench_mock ] || cargo build -q --examples
chown postgres "$TMP"
runuser -u postgres -- "$PGBIN/initdb" -D "$TMP/data" -A trust -U postgres >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$TMP/data" -l "$TMP/pg.log" -w \
  -o "-p $PORT -k $TMP -c listen_addresses=127.0.0.1 -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all" \
  start >/dev/null
PSQL=(psql -h 127.0.0.1 -p "$PORT" -U postgres -qtA)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE bench" >/dev/null
"${PSQL[@]}" -d bench -c "CREATE EXTENSION pg_stat_statements" >/dev/null
# Replica B connects as another role, so pg_stat_statements counts each replica apart.
"${PSQL[@]}" -d bench -c "CREATE ROLE replica_b LOGIN SUPERUSER" >/dev/null
URL_A="postgres://postgres@127.0.0.1:$PORT/bench"
URL_B="postgres://replica_b@127.0.0.1:$PORT/bench"

target/debug/examples/bench_mock 127.0.0.1:0 > "$OUT/mock.log" 2>&1 & PIDS+=($!)
sleep 0.3
MOCK=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$OUT/mock.log" | cut -d: -f2)
DEAD=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TOKEN=sk-bench-client-token

start_gw() { # name config url; sets GW_ADDR
  "$BIN" -addr 127.0.0.1:0 -config "$2" -database "$3" > "$OUT/$1.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 200); do grep -q "listening on" "$OUT/$1.log" && break; sleep 0.05; done
  GW_ADDR=$(grep -o 'listening on [0-9.:]*' "$OUT/$1.log" | cut -d' ' -f3)
}
stop_gws() { for p in "${PIDS[@]:1}"; do kill "$p" 2>/dev/null || true; done; PIDS=("${PIDS[0]}"); sleep 0.5; }

measure() { # label config load(yes|no)
  stop_gws
  start_gw a "$2" "$URL_A"; A=$GW_ADDR
  start_gw b "$2" "$URL_B"
  sleep 3
  "${PSQL[@]}" -d bench -c "SELECT pg_stat_statements_reset()" >/dev/null
  if [ "$3" = yes ]; then
    wrk -t1 -c16 -d"${DUR}s" -s bench/post.lua "http://$A/v1/chat/completions" -H "Authorization: Bearer $TOKEN" > "$OUT/$1.wrk"
    REQS=$(grep -o '[0-9.]* requests in' "$OUT/$1.wrk" | cut -d' ' -f1)
  else
    sleep "$DUR"; REQS=0
  fi
  echo "== $1: $REQS requests to A in ${DUR}s (B idle); statements per second | A | B"
  "${PSQL[@]}" -d bench -F ' | ' -c "
    WITH s AS (
      SELECT CASE
        WHEN query ~ 'openai_api_route_(health|replicas)' THEN 'replicas thread: ' || left(regexp_replace(query, '\s+', ' ', 'g'), 60)
        WHEN query ~* 'copy records' OR query IN ('COMMIT', 'START TRANSACTION') THEN 'record writer (COPY, BEGIN, COMMIT)'
        WHEN query ~* 'records' THEN 'owners poll (records reads)'
        ELSE 'other: ' || left(regexp_replace(query, '\s+', ' ', 'g'), 50) END AS what,
        r.rolname = 'replica_b' AS b, calls
      FROM pg_stat_statements p JOIN pg_roles r ON r.oid = p.userid
      WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'bench')
        AND query !~ 'pg_stat_statements')
    SELECT what, round(sum(calls) FILTER (WHERE NOT b)::numeric / $DUR, 2),
      round(coalesce(sum(calls) FILTER (WHERE b), 0)::numeric / $DUR, 2)
    FROM s GROUP BY ROLLUP (what) ORDER BY what NULLS LAST"
}

cat > "$OUT/healthy.yaml" <<YAML
authorization: $TOKEN
upstreams:
  - name: mock
    endpoint: http://127.0.0.1:$MOCK/v1
    sk: sk-bench-upstream
    models: [bench]
YAML
cat > "$OUT/churn.yaml" <<YAML
authorization: $TOKEN
cooldown: {failures: 3, seconds: 2}
probe_interval: 1
upstreams:
  - name: dead
    endpoint: http://127.0.0.1:$DEAD/v1
    sk: sk-bench-dead
    models: [bench]
  - name: mock
    endpoint: http://127.0.0.1:$MOCK/v1
    sk: sk-bench-upstream
    models: [bench]
YAML
measure idle "$OUT/healthy.yaml" no
measure loaded "$OUT/healthy.yaml" yes
measure churn "$OUT/churn.yaml" yes
