#!/usr/bin/env bash
# Members' limits across replicas (docs/operations.md, "Members' limits across replicas"): the
# latency a member with rpm and tpm adds, at one connection, on one replica and on two replicas
# sharing one PostgreSQL database, against a member without limits, against local limits only
# (-database none), and against a place claimed per request (concurrent: 1, what a PostgreSQL
# round trip per request costs); then the PostgreSQL statements per second the sharing makes on
# an idle and on a loaded replica (from the gateway's debug log).
# Needs a PostgreSQL server (default: the machine's, trust auth); creates and drops its own
# database. Gateways and the mock on core 0, wrk on core 1.
#
#   bench/limits.sh        # BENCH_POSTGRES=postgres://postgres@127.0.0.1:5432/test BENCH_DUR=5 BENCH_ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_database oar_limits
DUR=${BENCH_DUR:-5}
ROUNDS=${BENCH_ROUNDS:-3}
OUT=bench/out/limits
mkdir -p "$OUT"

echo "== building (release)"
cargo build --release --locked --examples --bins -q

FREE=sk-bench-client-token
# One member per kind of run: a member's rpm window holds its admissions of the last minute, and
# walking it is part of every request's cost, so no run inherits another's.
LOCAL=sk-bench-local-token-0123456789
SOLO=sk-bench-solo-token-0123456789
PAIR=sk-bench-pair-token-0123456789
ONE=sk-bench-one-place-token-0123456789
target/release/examples/bench_mock 127.0.0.1:0 > "$OUT/mock.log" 2>&1 & PIDS+=($!)
sleep 0.3
MOCK_PORT=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$OUT/mock.log" | cut -d: -f2)
taskset -a -p -c 0 "${PIDS[0]}" >/dev/null
# Limits far above what the run sends: every request is admitted, and each goes through the
# checks, the leases and the token sums.
cat > "$OUT/gw.yaml" <<YAML
authorization: $FREE
members:
  - name: local
    key: $LOCAL
    rpm: 10000000
    tpm: 10000000000
  - name: solo
    key: $SOLO
    rpm: 10000000
    tpm: 10000000000
  - name: pair
    key: $PAIR
    rpm: 10000000
    tpm: 10000000000
  - name: one_place
    key: $ONE
    concurrent: 1
upstreams:
  - name: mock
    endpoint: http://127.0.0.1:$MOCK_PORT/v1
    sk: sk-bench-upstream
YAML
start_gw() { # name database; sets GW_ADDR (not in a subshell, so PIDS keeps the pid for cleanup)
  RUST_LOG=info,openai_api_route::shared_limits=debug target/release/openai-api-route \
    -addr 127.0.0.1:0 -config "$OUT/gw.yaml" -database "$2" > "$OUT/$1.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  for _ in $(seq 100); do grep -q "listening on" "$OUT/$1.log" && break; sleep 0.05; done
  taskset -a -p -c 0 "$pid" >/dev/null
  GW_ADDR=$(grep -o 'listening on [0-9.:]*' "$OUT/$1.log" | cut -d' ' -f3)
}
start_gw none none; NONE=$GW_ADDR
start_gw a "$URL"; A=$GW_ADDR
# wrk c=1 for DUR on core 1: "p50 p99" in microseconds.
lat() { BENCH_TOKEN=$2 taskset -c 1 wrk -t1 -c1 -d"${DUR}s" -s bench/post.lua "http://$1/v1/chat/completions" 2>/dev/null |
  awk '/^WRK/ {for (i = 1; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}; printf "%d %d %d\n", v["p50_us"], v["p99_us"], v["err_status"]}'; }
declare -A P50 P99
run() { # label addr token [addr2 token2: the same load on a second replica at once]
  local r other=
  if [ $# -gt 3 ]; then lat "$4" "$5" > "$OUT/other.txt" & other=$!; fi
  r=$(lat "$2" "$3")
  [ -z "$other" ] || wait "$other"
  set -- "$1" $r
  P50[$1]="${P50[$1]:-} $2"; P99[$1]="${P99[$1]:-} $3"
  [ "$4" = 0 ] || echo "  ($1: $4 answers were not 2xx)"
}
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
echo "== c=1, ${DUR}s each, ${ROUNDS} rounds alternating (gateways on core 0, wrk on core 1)"
lat "$A" "$FREE" >/dev/null; lat "$NONE" "$FREE" >/dev/null   # warm-up
for r in $(seq "$ROUNDS"); do
  run "none, no limits" "$NONE" "$FREE"
  run "none, rpm+tpm (local only)" "$NONE" "$LOCAL"
  run "1 replica, no limits" "$A" "$FREE"
  run "1 replica, rpm+tpm" "$A" "$SOLO"
  run "1 replica, concurrent: 1" "$A" "$ONE"
  [ "$r" = 1 ] && { start_gw b "$URL"; B=$GW_ADDR; lat "$B" "$FREE" >/dev/null; }
  run "2 replicas, no limits" "$A" "$FREE" "$B" "$FREE"
  run "2 replicas, rpm+tpm" "$A" "$PAIR" "$B" "$PAIR"
  echo "round $r done"
done
for k in "none, no limits" "none, rpm+tpm (local only)" "1 replica, no limits" "1 replica, rpm+tpm" \
         "1 replica, concurrent: 1" "2 replicas, no limits" "2 replicas, rpm+tpm"; do
  printf "%-30s p50 %5s us  p99 %5s us   (rounds: p50%s, p99%s)\n" "$k" \
    "$(echo "${P50[$k]}" | median)" "$(echo "${P99[$k]}" | median)" "${P50[$k]}" "${P99[$k]}"
done

# Statements per second, from the sharing thread's own count (logged every 10 s at debug).
rate() { grep -o 'members.* limits: [0-9.]* PostgreSQL statements' "$OUT/$1.log" | tail -1 | awk '{print $3}'; }
echo "== PostgreSQL statements per second of the sharing (the roster's own apart)"
sleep 31; echo "idle: replica a $(rate a)/s, replica b $(rate b)/s"
load() { BENCH_TOKEN=$2 taskset -c 1 wrk -t2 -c16 -d"$3s" -s bench/post.lua "http://$1/v1/chat/completions" 2>/dev/null | awk '/Requests\/sec/ {print int($2)}'; }
sleep 10   # a log line covering only the load comes next
rps=$(load "$A" "$SOLO" 21)
echo "loaded (c=16, $rps req/s of the member with rpm+tpm on a): replica a $(rate a)/s, replica b $(rate b)/s"

# What per-request atomic updates would cost: one call of the slot function per request, the
# round trip a request would wait for and the rate one member's lock lets through.
PGBENCH=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench | tail -1)
echo "SELECT * FROM openai_api_route_take_slots('bench', 'bench-replica', 1000000000, 1, 2000);" > "$OUT/claim.sql"
for c in 1 4; do
  PGOPTIONS="-c synchronous_commit=off" taskset -c 1 "$PGBENCH" -n -f "$OUT/claim.sql" -T "$DUR" -c "$c" -j 1 -M prepared "$URL" 2>/dev/null |
    awk -v c="$c" '/latency average/ {l = $4} /^tps/ {t = int($3)} END {printf "one slot per request, %d clients: %s ms per call, %d calls/s\n", c, l, t}'
done
