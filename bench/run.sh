#!/usr/bin/env bash
# Benchmark harness: the gateway against a direct call and nginx proxy_pass, in one run.
#
#   bench/run.sh           full run (~10 s per measurement, a few minutes in all)
#   bench/run.sh --smoke   ~1 s per measurement: only proves the harness works
#
# What it does (everything on 127.0.0.1, everything it starts is stopped on exit):
#   - installs nginx and wrk from Debian's packages when missing;
#   - builds the release binary, the examples bench_mock and sse_load, benches/records.rs and
#     benches/allocations.rs (heap allocations per proxied request, printed in the table);
#   - starts bench_mock (fixed chat completion; SSE of 20 chunks 50 ms apart for "stream":true),
#     nginx as a plain reverse proxy in front of it, and the gateway three times: recording ON
#     (SQLite in bench/out/), -database none, and with a refused first upstream;
#   - measures, alternating systems: (a) c=1 latency, (b) c=64 throughput and p99 with CPU per
#     request, (c) N concurrent SSE streams, (e) the refused-first-upstream cost, (f) 10-chunk
#     stream requests at c=1 and c=64 (latency, CPU per request), plus the
#     records/s benchmark; prints one markdown table and writes it to bench/out/results.md.
#
# Pinning (2+ cores): for the wrk phases the servers (mock, nginx, gateways) run on core 0 and
# wrk on core 1, so a proxy's cost is what limits core 0. The SSE phase is not pinned by default:
# thousands of streams need more than one core for mock + proxy together, and pinning them to
# one core measures that core, not the proxy (BENCH_SSE_LAYOUT=mock1 puts the proxy alone on
# core 0 and mock + sse_load on core 1; servers0 keeps the wrk layout).
#
# Environment: BENCH_NO_BUILD=1 reuses the last build; BENCH_PIN=0 disables core pinning;
# BENCH_DUR / BENCH_ROUNDS override the seconds per round and rounds per measurement;
# BENCH_SSE_LAYOUT as above.
set -uo pipefail

MODE=full
for a in "$@"; do
  case "$a" in
    --smoke) MODE=smoke ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=$ROOT/bench/out
mkdir -p "$OUT"
RUNLOG=$OUT/run.log
: >"$RUNLOG"
: >"$OUT/wrk.log"
: >"$OUT/sse.log"
TOKEN=sk-bench-client-token
export BENCH_TOKEN=$TOKEN

if [[ $MODE == smoke ]]; then
  DUR=${BENCH_DUR:-1}; ROUNDS=${BENCH_ROUNDS:-1}; WARM=0; PAUSE=0.2
  SSE_NS=(100); SSE_ARGS=(--chunks 5 --gap-ms 20); SSE_CHUNKS=5; SSE_GAP=20
  RECORDS_N=20000
else
  DUR=${BENCH_DUR:-5}; ROUNDS=${BENCH_ROUNDS:-2}; WARM=2; PAUSE=1
  SSE_NS=(1000 5000); SSE_ARGS=(--chunks 20 --gap-ms 50); SSE_CHUNKS=20; SSE_GAP=50
  RECORDS_N=200000
fi

log() { echo "[bench $(date +%T)] $*" | tee -a "$RUNLOG" >&2; }
die() { log "FAILED: $*"; exit 1; }

# ---------------------------------------------------------------- processes we own
STARTED=()
cleanup() {
  local p alive
  for p in "${STARTED[@]}"; do kill "$p" 2>/dev/null; done
  for _ in $(seq 50); do
    alive=0
    for p in "${STARTED[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  for p in "${STARTED[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- tools
need=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v curl >/dev/null 2>&1 || need+=(curl)
if ((${#need[@]})); then
  log "installing ${need[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq "${need[@]}" >>"$RUNLOG" 2>&1; then
    apt-get update -qq >>"$RUNLOG" 2>&1
    apt-get install -y -qq "${need[@]}" >>"$RUNLOG" 2>&1 || die "apt-get install ${need[*]}"
  fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# Debian's package may have started the system nginx; we never touch it, we run our own.

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)

# ---------------------------------------------------------------- build
BIN=$OUT/bin
mkdir -p "$BIN"
if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
  log "building release binary, examples and the records bench (cargo, release profile)"
  cargo build --release --bins --examples 2>>"$RUNLOG" || die "cargo build (see $RUNLOG)"
  cargo bench --bench records --no-run 2>"$OUT/bench-build.log" || { cat "$OUT/bench-build.log" >>"$RUNLOG"; die "cargo bench --no-run"; }
  rec_exe=$(grep -o 'target/release/deps/records-[0-9a-f]*' "$OUT/bench-build.log" | tail -1)
  [[ -n $rec_exe ]] || die "records bench executable not found"
  # Private copies: other builds of the tree must not swap binaries under a running benchmark.
  cp -f target/release/openai-api-route target/release/examples/bench_mock \
    target/release/examples/sse_load "$BIN/" || die "copy binaries"
  cp -f "$rec_exe" "$BIN/records-bench"
  cargo bench --bench allocations --no-run 2>"$OUT/bench-build.log" || { cat "$OUT/bench-build.log" >>"$RUNLOG"; die "cargo bench --bench allocations --no-run"; }
  alloc_exe=$(grep -o 'target/release/deps/allocations-[0-9a-f]*' "$OUT/bench-build.log" | tail -1)
  [[ -n $alloc_exe ]] || die "allocations bench executable not found"
  cp -f "$alloc_exe" "$BIN/alloc-bench"
fi
for b in openai-api-route bench_mock sse_load records-bench alloc-bench; do
  [[ -x $BIN/$b ]] || die "$BIN/$b missing (run without BENCH_NO_BUILD=1 once)"
done

# ---------------------------------------------------------------- pinning
if [[ ${BENCH_PIN:-1} != 0 && $(nproc) -ge 2 ]]; then
  PIN=1; SRV=(taskset -c 0); LOAD=(taskset -c 1)
  PIN_NOTE="servers (mock, nginx, gateway) pinned to core 0, load generators (wrk, sse_load) to core 1"
else
  PIN=0; SRV=(); LOAD=()
  PIN_NOTE="no core pinning"
fi
pin_all() { # pin every thread of a process we started after its start
  [[ $PIN == 1 ]] && taskset -a -p -c 0 "$1" >/dev/null 2>&1
  return 0
}

# ---------------------------------------------------------------- helpers
free_port() {
  local p
  for p in $(seq "$1" $(($1 + 500))); do
    if ! ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then echo "$p"; return; fi
  done
  die "no free port from $1"
}
CLK_TCK=$(getconf CLK_TCK)
ticks() { # user+sys ticks summed over the given pids
  local p t=0 v
  for p in "$@"; do
    v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}')
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
mem_kb() { # FIELD PID... → summed kB (VmRSS, VmHWM)
  local f=$1 p t=0 v
  shift
  for p in "$@"; do
    v=$(awk -v f="$f:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null)
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
listen_overflows() { # kernel-wide count of connections dropped because an accept queue was full
  awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ListenOverflows") c = i; h = 1 } else print $c }' /proc/net/netstat
}
mb() { awk -v k="$1" 'BEGIN { printf "%.1f MB", k / 1024 }'; }
fmt_us() { # microseconds → "123 µs" / "1.23 ms"
  awk -v u="$1" 'BEGIN { if (u == "" || u == "-") { print "—"; exit }
    if (u >= 10000) printf "%.1f ms", u / 1000; else if (u >= 1000) printf "%.2f ms", u / 1000;
    else printf "%.0f µs", u }'
}
calc() { awk "BEGIN { print $* }"; }

wait_listening() { # LOGFILE PID → prints ADDR
  local i addr
  for i in $(seq 200); do
    addr=$(grep -o 'listening on [^ ]*' "$1" 2>/dev/null | head -1 | awk '{print $3}')
    [[ -n $addr ]] && { echo "$addr"; return 0; }
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- mock upstream
log "starting bench_mock"
"${SRV[@]}" "$BIN/bench_mock" 127.0.0.1:0 --threads 1 >"$OUT/mock.out" 2>"$OUT/mock.log" &
MOCK_PID=$!
STARTED+=("$MOCK_PID")
for _ in $(seq 100); do grep -q '^port ' "$OUT/mock.out" 2>/dev/null && break; sleep 0.05; done
MOCK_PORT=$(awk '/^port /{print $2}' "$OUT/mock.out")
[[ -n $MOCK_PORT ]] || die "bench_mock did not start: $(cat "$OUT/mock.log")"
MOCK=127.0.0.1:$MOCK_PORT

# ---------------------------------------------------------------- gateways
gw_config() { # FILE [refused]
  {
    echo "authorization: $TOKEN"
    # Never cool the refused upstream down: every request pays one refused connect.
    [[ ${2:-} == refused_every ]] && echo "cooldown: {failures: 1000000000, seconds: 1}"
    echo "upstreams:"
    if [[ ${2:-} == refused* ]]; then
      # Port 1 on loopback: nothing listens, the connect is refused at once.
      echo "  - name: refused"
      echo "    endpoint: http://127.0.0.1:1/v1"
      echo "    sk: sk-bench-upstream-refused"
    fi
    echo "  - name: mock"
    echo "    endpoint: http://$MOCK/v1"
    echo "    sk: sk-bench-upstream-key"
  } >"$1"
}
declare -A URL PIDS IDLE_RSS
start_gw() { # NAME DATABASE [refused]
  local name=$1 db=$2 pid addr
  gw_config "$OUT/$name.yaml" "${3:-}"
  "$BIN/openai-api-route" -addr 127.0.0.1:0 -config "$OUT/$name.yaml" -database "$db" \
    >/dev/null 2>"$OUT/$name.log" &
  pid=$!
  STARTED+=("$pid")
  addr=$(wait_listening "$OUT/$name.log" "$pid") || die "gateway $name did not start: $(tail -5 "$OUT/$name.log")"
  pin_all "$pid"
  URL[$name]=http://$addr/v1/chat/completions
  PIDS[$name]=$pid
}
rm -f "$OUT"/records*.sqlite*
log "starting the gateway: recording ON, recording OFF, refused first upstream"
start_gw gw_on "$OUT/records.sqlite"
start_gw gw_off none
start_gw gw_ref "$OUT/records-refused.sqlite" refused
start_gw gw_refx "$OUT/records-refused-every.sqlite" refused_every
GW_WORKERS=$(grep -io 'starting [0-9]* workers' "$OUT/gw_on.log" | head -1 | awk '{print $2}')
GW_WORKERS=${GW_WORKERS:-$(nproc)}

# ---------------------------------------------------------------- nginx
NGX=$OUT/nginx
mkdir -p "$NGX"
NGINX_PORT=$(free_port 18480)
cat >"$NGX/nginx.conf" <<EOF
# bench/run.sh: plain reverse proxy in front of bench_mock (generated; never the system nginx)
worker_processes $GW_WORKERS;
daemon off;
pid $NGX/nginx.pid;
error_log $NGX/error.log warn;
worker_rlimit_nofile $FD_LIMIT;
events { worker_connections 16384; }
http {
  access_log off;
  default_type application/octet-stream;
  client_body_temp_path $NGX/client_body;
  proxy_temp_path $NGX/proxy;
  fastcgi_temp_path $NGX/fastcgi;
  uwsgi_temp_path $NGX/uwsgi;
  scgi_temp_path $NGX/scgi;
  keepalive_requests 1000000;
  upstream mock {
    server $MOCK;
    keepalive 512;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
"$NGINX" -t -p "$NGX" -c "$NGX/nginx.conf" -e "$NGX/error.log" >>"$RUNLOG" 2>&1 || die "nginx config test failed (see $RUNLOG)"
log "starting nginx ($GW_WORKERS workers) on 127.0.0.1:$NGINX_PORT"
"$NGINX" -p "$NGX" -c "$NGX/nginx.conf" -e "$NGX/error.log" >>"$RUNLOG" 2>&1 &
NGINX_PID=$!
STARTED+=("$NGINX_PID")
for _ in $(seq 100); do
  [[ $(pgrep -P "$NGINX_PID" | wc -l) -ge $GW_WORKERS ]] && ss -Hltn "sport = :$NGINX_PORT" | grep -q . && break
  kill -0 "$NGINX_PID" 2>/dev/null || die "nginx exited: $(tail -3 "$NGX/error.log")"
  sleep 0.05
done
nginx_pids() { echo "$NGINX_PID" $(pgrep -P "$NGINX_PID"); }
for p in $(nginx_pids); do pin_all "$p"; done

URL[direct]=http://$MOCK/v1/chat/completions
URL[nginx]=http://127.0.0.1:$NGINX_PORT/v1/chat/completions
pids_of() {
  case $1 in
    direct) echo "$MOCK_PID" ;;
    nginx) nginx_pids ;;
    *) echo "${PIDS[$1]}" ;;
  esac
}

# Sanity: every system answers the request with 200 before anything is measured.
for s in direct nginx gw_on gw_off gw_ref gw_refx; do
  code=$(curl -s -o "$OUT/check-$s.json" -w '%{http_code}' -X POST -H "Authorization: Bearer $TOKEN" \
    -H 'Content-Type: application/json' -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' "${URL[$s]}")
  [[ $code == 200 ]] || die "$s answered $code: $(head -c 300 "$OUT/check-$s.json")"
done
sleep 1
for s in gw_on gw_off gw_ref; do IDLE_RSS[$s]=$(mem_kb VmRSS "${PIDS[$s]}"); done
IDLE_RSS[nginx]=$(mem_kb VmRSS $(nginx_pids))
IDLE_RSS[direct]=$(mem_kb VmRSS "$MOCK_PID")

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "mock $MOCK, nginx :$NGINX_PORT, gateways ${URL[gw_on]} ${URL[gw_off]} ${URL[gw_ref]}; $PIN_NOTE; fd limit $FD_LIMIT; load avg $LOAD_START"

# ---------------------------------------------------------------- wrk runs
declare -A R_REQ R_DUS R_P50 R_P99 R_N R_TICKS R_ERR
# Stream requests: the same body with "stream": true (BENCH_STREAM=1), answered by bench_mock with
# 10 SSE chunks and no gap between them (the usage in the last), so that the proxy's per-stream
# cost is measured.
STREAM_QUERY='?chunks=10&gap_ms=0'
run_wrk() { # SYS CONNS THREADS SECONDS TAG (a tag starting with "s" sends stream requests)
  local sys=$1 c=$2 t=$3 d=$4 tag=$5 pids t0 t1 out line kv k v stream=0 url=${URL[$1]}
  [[ $tag == s* ]] && { stream=1; url=$url$STREAM_QUERY; }
  pids=$(pids_of "$sys")
  t0=$(ticks $pids)
  out=$("${LOAD[@]}" env BENCH_STREAM=$stream wrk -t"$t" -c"$c" -d"${d}s" --latency -s "$ROOT/bench/post.lua" "$url" 2>&1)
  t1=$(ticks $pids)
  printf '### %s %s\n%s\n\n' "$sys" "$tag" "$out" >>"$OUT/wrk.log"
  line=$(grep '^WRK ' <<<"$out")
  [[ -n $line ]] || die "wrk against $sys gave no summary: $out"
  declare -A W=()
  for kv in ${line#WRK }; do k=${kv%%=*}; v=${kv#*=}; W[$k]=$v; done
  local key=$sys:$tag
  R_REQ[$key]=$(( ${R_REQ[$key]:-0} + W[requests] ))
  R_DUS[$key]=$(( ${R_DUS[$key]:-0} + W[duration_us] ))
  R_P50[$key]=$(calc "${R_P50[$key]:-0} + ${W[p50_us]}")
  R_P99[$key]=$(calc "${R_P99[$key]:-0} + ${W[p99_us]}")
  R_N[$key]=$(( ${R_N[$key]:-0} + 1 ))
  R_TICKS[$key]=$(( ${R_TICKS[$key]:-0} + t1 - t0 ))
  R_ERR[$key]=$(( ${R_ERR[$key]:-0} + W[err_connect] + W[err_read] + W[err_write] + W[err_status] + W[err_timeout] ))
  log "  $sys $tag: $(awk -v r="${W[requests]}" -v d="${W[duration_us]}" 'BEGIN{printf "%.0f req/s", r*1e6/d}'), p50 $(fmt_us "${W[p50_us]}"), p99 $(fmt_us "${W[p99_us]}"), errors $((W[err_connect] + W[err_read] + W[err_write] + W[err_status] + W[err_timeout]))"
}
avg() { # MAP KEY → mean over rounds
  local -n m=$1
  calc "${m[$2]} / ${R_N[$2]}"
}
rps() { calc "${R_REQ[$1]} * 1000000 / ${R_DUS[$1]}"; }

if ((WARM > 0)); then
  log "warm-up: ${WARM}s at c=64 per system"
  for s in direct nginx gw_on gw_off gw_ref gw_refx; do
    "${LOAD[@]}" wrk -t2 -c64 -d"${WARM}s" -s "$ROOT/bench/post.lua" "${URL[$s]}" >/dev/null 2>&1
  done
fi

C1=(direct nginx gw_on gw_off gw_ref gw_refx)
C64=(direct nginx gw_on gw_off)
log "(a)+(e) concurrency 1: $ROUNDS round(s) of ${DUR}s, systems alternating"
for r in $(seq "$ROUNDS"); do
  order=("${C1[@]}")
  ((r % 2 == 0)) && order=(gw_refx gw_ref gw_off gw_on nginx direct)
  for s in "${order[@]}"; do run_wrk "$s" 1 1 "$DUR" c1; done
done
log "(b)+(d) concurrency 64: $ROUNDS round(s) of ${DUR}s, systems alternating"
for r in $(seq "$ROUNDS"); do
  order=("${C64[@]}")
  ((r % 2 == 0)) && order=(gw_off gw_on nginx direct)
  for s in "${order[@]}"; do run_wrk "$s" 64 2 "$DUR" c64; done
done
log "(f) streams of 10 chunks, concurrency 1 and 64: $ROUNDS round(s) of ${DUR}s, systems alternating"
for r in $(seq "$ROUNDS"); do
  order=("${C64[@]}")
  ((r % 2 == 0)) && order=(gw_off gw_on nginx direct)
  for s in "${order[@]}"; do run_wrk "$s" 1 1 "$DUR" sc1; done
  for s in "${order[@]}"; do run_wrk "$s" 64 2 "$DUR" sc64; done
done

# ---------------------------------------------------------------- SSE
declare -A S_RES S_RSS S_OVF
SSE_SYS=(direct nginx gw_on)
SSE_LOAD=("${LOAD[@]}")
if [[ $PIN == 1 ]]; then
  case ${BENCH_SSE_LAYOUT:-none} in
    mock1) # the proxy gets core 0 to itself; the mock joins the load generator on core 1
      taskset -a -p -c 1 "$MOCK_PID" >/dev/null 2>&1
      SSE_NOTE="SSE: proxy alone on core 0, bench_mock and sse_load on core 1" ;;
    none) # default: thousands of streams need mock + proxy + client > 1 core; let them float
      for p in "$MOCK_PID" $(nginx_pids) "${PIDS[@]}"; do taskset -a -p -c 0-$(($(nproc) - 1)) "$p" >/dev/null 2>&1; done
      SSE_LOAD=()
      SSE_NOTE="SSE: no pinning" ;;
    servers0) SSE_NOTE="SSE: servers on core 0, sse_load on core 1" ;;
    *) die "BENCH_SSE_LAYOUT must be none, mock1 or servers0" ;;
  esac
else
  SSE_NOTE="SSE: no pinning"
fi
log "$SSE_NOTE"
log "(c) SSE: ${SSE_NS[*]} concurrent streams of $SSE_CHUNKS chunks ${SSE_GAP} ms apart"
for n in "${SSE_NS[@]}"; do
  for s in "${SSE_SYS[@]}"; do
    ovf0=$(listen_overflows)
    out=$("${SSE_LOAD[@]}" "$BIN/sse_load" "${URL[$s]}" "$n" "$TOKEN" "${SSE_ARGS[@]}" 2>&1)
    printf '### %s %s\n%s\n\n' "$s" "$n" "$out" >>"$OUT/sse.log"
    line=$(grep '^RESULT ' <<<"$out")
    [[ -n $line ]] || die "sse_load against $s gave no result: $out"
    S_RES[$s:$n]=${line#RESULT }
    S_OVF[$s:$n]=$(($(listen_overflows) - ovf0))
    S_RSS[$s:$n]=$(mem_kb VmHWM $(pids_of "$s"))
    log "  $s N=$n: ${line#RESULT }; listen overflows ${S_OVF[$s:$n]}; peak RSS $(mb "${S_RSS[$s:$n]}")"
    sleep "$PAUSE"
  done
done

# ---------------------------------------------------------------- records
log "records benchmark: $RECORDS_N records through Recorder into SQLite"
rec_out=$(RECORDS_N=$RECORDS_N "$BIN/records-bench" 2>&1)
echo "$rec_out" >"$OUT/records-bench.log"
rec_line=$(grep '^RESULT ' <<<"$rec_out")
[[ -n $rec_line ]] || die "records bench gave no result: $rec_out"
declare -A RB=()
for kv in ${rec_line#RESULT }; do RB[${kv%%=*}]=${kv#*=}; done

# Heap allocations per proxied request: the gateway in-process under a counting allocator.
log "allocations benchmark: gateway allocations per request (benches/allocations.rs)"
alloc_out=$(ALLOC_N=$([[ $MODE == smoke ]] && echo 400 || echo 4000) "$BIN/alloc-bench" 2>&1)
echo "$alloc_out" >"$OUT/alloc-bench.log"
grep -q '^ALLOC ' <<<"$alloc_out" || die "allocations bench gave no result: $alloc_out"
declare -A AL=()
while read -r _ kind rec rest; do
  for kv in $rest; do AL[$kind:$rec:${kv%%=*}]=${kv#*=}; done
done < <(grep '^ALLOC ' <<<"$alloc_out")

# Rows the recording gateway wrote during the run, and its dropped-records counter.
sleep 1
metric() { # SYS NAME
  curl -s "$(sed 's#/v1/chat/completions#/v1/metrics#' <<<"${URL[$1]}")" | awk -v n="$2" '$1 == n {print $2}'
}
GW_DROPPED=$(metric gw_on openai_api_route_records_dropped_total)
GW_ROWS="n/a"
if command -v python3 >/dev/null 2>&1; then
  GW_ROWS=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from records").fetchone()[0])' "$OUT/records.sqlite" 2>/dev/null || echo "n/a")
fi

declare -A PEAK
for s in direct nginx gw_on gw_off gw_ref gw_refx; do PEAK[$s]=$(mem_kb VmHWM $(pids_of "$s")); done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
label() {
  case $1 in
    direct) echo "direct (mock, no proxy)" ;;
    nginx) echo "nginx proxy_pass" ;;
    gw_on) echo "gateway, recording ON" ;;
    gw_off) echo "gateway, -database none" ;;
    gw_ref) echo "gateway, refused 1st upstream" ;;
    gw_refx) echo "gateway, refused 1st upstream, no cooldown" ;;
  esac
}
D50=$(avg R_P50 direct:c1)
NGINX_RPS=$(rps nginx:c64)
wrk_row() { # SYS PREFIX ("" for JSON, "s" for streams) [PEAK_RSS_CELL]: one table row
  local s=$1 k=$2 p50 p99 added r p99b cpu note=""
  p50=$(avg R_P50 "$s:${k}c1"); p99=$(avg R_P99 "$s:${k}c1")
  added=$(calc "$p50 - $(avg R_P50 "direct:${k}c1")")
  r=$(rps "$s:${k}c64"); p99b=$(avg R_P99 "$s:${k}c64")
  cpu=$(calc "${R_TICKS[$s:${k}c64]} * 1000000 / $CLK_TCK / ${R_REQ[$s:${k}c64]}")
  [[ $s == direct ]] && note=" (mock)"
  printf '| %s | %s | %s | %s | %.0f | %s | %.2f | %.1f%s |' "$(label "$s")" "$(fmt_us "$p50")" "$(fmt_us "$p99")" \
    "$([[ $s == direct ]] && echo '—' || awk -v a="$added" 'BEGIN{printf "%+.0f µs", a}')" \
    "$r" "$(fmt_us "$p99b")" "$(calc "$r / $(rps "nginx:${k}c64")")" "$cpu" "$note"
  [[ -n ${3:-} ]] && printf ' %s%s |' "$3" "$note"
  echo
}
RES=$OUT/results.md
{
  echo "## Benchmark ($MODE run, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src 2>/dev/null || echo '+local changes'))"
  echo
  echo "Command: \`bench/run.sh$([[ $MODE == smoke ]] && echo ' --smoke')\` — $(nproc) cores, $PIN_NOTE; gateway $GW_WORKERS workers, nginx $GW_WORKERS workers;"
  echo "wrk \`POST /v1/chat/completions\` (small chat JSON, Bearer token), c=1: \`-t1 -c1\`, c=64: \`-t2 -c64\`, $ROUNDS×${DUR}s each, systems alternating;"
  echo "load average $LOAD_START at start, $LOAD_END at end (the machine is shared: figures are ratios within this run)."
  echo
  echo "| system | c1 p50 | c1 p99 | added p50 vs direct | c64 req/s | c64 p99 | ratio to nginx | CPU µs/req | peak RSS |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for s in direct nginx gw_on gw_off; do wrk_row "$s" "" "$(mb "${PEAK[$s]}")"; done
  echo
  echo "Stream requests (the same body with \`\"stream\": true\`, 10 SSE chunks without a gap, usage in the last; the gateway adds \`stream_options\` and filters the usage chunk: \`force_usage\`), same layout:"
  echo
  echo "| system | c1 p50 | c1 p99 | added p50 vs direct | c64 req/s | c64 p99 | ratio to nginx | CPU µs/req |"
  echo "|---|---|---|---|---|---|---|---|"
  for s in direct nginx gw_on gw_off; do wrk_row "$s" s; done
  echo
  on50=$(avg R_P50 gw_on:c1); on99=$(avg R_P99 gw_on:c1)
  echo "Refused first upstream (first upstream 127.0.0.1:1 where nothing listens, second the mock; recording ON), c=1, vs the normal config (recording ON):"
  echo
  for s in gw_ref gw_refx; do
    ref50=$(avg R_P50 "$s:c1"); ref99=$(avg R_P99 "$s:c1")
    what="default cooldown (3 failures → back of the order for 30 s; the steady state)"
    [[ $s == gw_refx ]] && what="cooldown never reached: every request tries the refused upstream first"
    printf -- '- %s: p50 %s, p99 %s → adds %s p50 / %s p99 per request.\n' "$what" \
      "$(fmt_us "$ref50")" "$(fmt_us "$ref99")" "$(awk -v a="$(calc "$ref50 - $on50")" 'BEGIN{printf "%+.0f µs", a}')" "$(awk -v a="$(calc "$ref99 - $on99")" 'BEGIN{printf "%+.0f µs", a}')"
  done
  echo
  printf 'Idle RSS before load: gateway recording ON %s, -database none %s; nginx (master+workers) %s; mock %s.\n' \
    "$(mb "${IDLE_RSS[gw_on]}")" "$(mb "${IDLE_RSS[gw_off]}")" "$(mb "${IDLE_RSS[nginx]}")" "$(mb "${IDLE_RSS[direct]}")"
  errs=""
  for k in "${!R_ERR[@]}"; do [[ ${R_ERR[$k]} -gt 0 ]] && errs+=" $k=${R_ERR[$k]}"; done
  echo
  echo "wrk errors (connect/read/write/timeout/non-2xx):${errs:- none}."
  echo
  echo "SSE: N concurrent streams of $SSE_CHUNKS chunks ${SSE_GAP} ms apart (\`sse_load\`, ramped 250 connections per 20 ms); late = chunk > 100 ms behind the upstream's pacing; ${SSE_NOTE#SSE: }."
  echo
  echo "| system | streams | completed | failed | chunks late >100 ms | max lateness | p99 lateness | first chunk p99 | connect max (>500 ms) | accept-queue overflows | total | peak RSS after |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  for n in "${SSE_NS[@]}"; do
    for s in "${SSE_SYS[@]}"; do
      declare -A X=()
      for kv in ${S_RES[$s:$n]}; do X[${kv%%=*}]=${kv#*=}; done
      note=""; [[ $s == direct ]] && note=" (mock)"
      printf '| %s | %s | %s | %s | %s of %s | %s ms | %s ms | %s ms | %s ms (%s) | %s | %s s | %s%s |\n' "$(label "$s")" "$n" "${X[completed]}" "${X[failed]}" \
        "${X[late]}" "${X[events]}" "${X[max_late_ms]}" "${X[p99_late_ms]}" "${X[ttfb_p99_ms]}" "${X[connect_max_ms]}" "${X[slow_connects]}" \
        "${S_OVF[$s:$n]}" "${X[total_s]}" "$(mb "${S_RSS[$s:$n]}")" "$note"
    done
  done
  echo
  printf 'Records: %s records (≈1 KB request body, 500 B reply) through Recorder into SQLite in %ss → **%s records/s**, %s dropped (target ≥ 10,000/s); writer thread CPU %s µs per record.\n' \
    "${RB[records]}" "${RB[seconds]}" "${RB[records_per_s]}" "${RB[dropped]}" "${RB[writer_us]:-?}"
  printf 'Gateway recording ON during this run: %s rows written, openai_api_route_records_dropped_total = %s.\n' "$GW_ROWS" "${GW_DROPPED:-?}"
  echo
  echo "Heap allocations per proxied request, gateway threads only (\`cargo bench --bench allocations\`: the gateway in-process under a counting global allocator):"
  echo
  echo "| request | recording | allocations | reallocations | bytes allocated |"
  echo "|---|---|---|---|---|"
  for kind in json stream10; do
    for rec in recording=on recording=off; do
      printf '| %s | %s | %s | %s | %s |\n' "$([[ $kind == json ]] && echo 'JSON' || echo 'stream, 10 chunks')" "${rec#recording=}" \
        "${AL[$kind:$rec:allocs]}" "${AL[$kind:$rec:reallocs]}" "${AL[$kind:$rec:bytes]}"
    done
  done
} >"$RES"

# Targets from the performance issue, checked against this run's figures.
{
  echo
  echo "Targets (recording ON unless said):"
  chk() { if awk "BEGIN { exit !($2) }"; then echo "- met: $1"; else echo "- NOT met: $1"; fi; }
  cpu_of() { calc "${R_TICKS[$1]} * 1000000 / $CLK_TCK / ${R_REQ[$1]}"; }
  for k in c64 sc64; do
    what=JSON; [[ $k == sc64 ]] && what=stream
    chk "CPU per $what request ≤ 1.5 × nginx's ($(awk -v a="$(cpu_of gw_on:$k)" -v b="$(cpu_of nginx:$k)" 'BEGIN{printf "%.1f vs %.1f µs, %.2f×", a, b, a / b}'))" "$(cpu_of gw_on:$k) <= 1.5 * $(cpu_of nginx:$k)"
  done
  chk "c64 JSON ≥ 0.75 × nginx's requests/s (ratio $(awk -v a="$(rps gw_on:c64)" -v b="$NGINX_RPS" 'BEGIN{printf "%.2f", a / b}'))" "$(rps gw_on:c64) >= 0.75 * $NGINX_RPS"
  sadd=$(calc "$(avg R_P50 gw_on:sc1) - $(avg R_P50 direct:sc1)")
  chk "added p50 vs direct ≤ 50 µs for streams ($(awk -v a="$sadd" 'BEGIN{printf "%.0f", a}') µs; nginx $(awk -v a="$(calc "$(avg R_P50 nginx:sc1) - $(avg R_P50 direct:sc1)")" 'BEGIN{printf "%.0f", a}') µs)" "$sadd <= 50"
  gadd99=$(calc "$(avg R_P99 gw_on:c1) - $(avg R_P99 direct:c1)"); nadd99=$(calc "$(avg R_P99 nginx:c1) - $(avg R_P99 direct:c1)")
  chk "c1 p99 added over direct ≤ 3 × nginx's ($(awk -v a="$gadd99" -v b="$nadd99" 'BEGIN{printf "%+.0f vs %+.0f µs", a, b}'))" "$gadd99 <= 3 * ($nadd99 > 0 ? $nadd99 : 0)"
  chk "peak RSS at ${SSE_NS[-1]} streams ≤ 120 MB ($(mb "${S_RSS[gw_on:${SSE_NS[-1]}]}"); nginx $(mb "${S_RSS[nginx:${SSE_NS[-1]}]}"))" "${S_RSS[gw_on:${SSE_NS[-1]}]} <= 120 * 1024"
  on50=$(avg R_P50 gw_on:c1); on99=$(avg R_P99 gw_on:c1); ng99=$(avg R_P99 nginx:c1)
  chk "added p50 vs direct ≤ 50 µs ($(awk -v a="$(calc "$on50 - $D50")" 'BEGIN{printf "%.0f", a}') µs)" "$on50 - $D50 <= 50"
  chk "c1 p99 ≤ nginx's ($(fmt_us "$on99") vs $(fmt_us "$ng99"))" "$on99 <= $ng99"
  chk "c64 throughput ≥ nginx's (ratio $(awk -v a="$(rps gw_on:c64)" -v b="$NGINX_RPS" 'BEGIN{printf "%.2f", a / b}'))" "$(rps gw_on:c64) >= $NGINX_RPS"
  chk "c64 p99 ≤ 1.2 × nginx's ($(fmt_us "$(avg R_P99 gw_on:c64)") vs $(fmt_us "$(avg R_P99 nginx:c64)"))" "$(avg R_P99 gw_on:c64) <= 1.2 * $(avg R_P99 nginx:c64)"
  chk "recording ON within 10% of -database none (ratio $(awk -v a="$(rps gw_on:c64)" -v b="$(rps gw_off:c64)" 'BEGIN{printf "%.2f", a / b}'))" "$(rps gw_on:c64) >= 0.9 * $(rps gw_off:c64)"
  chk "zero dropped records in the gateway (${GW_DROPPED:-?})" "${GW_DROPPED:-1} == 0"
  last=${SSE_NS[-1]}
  declare -A X=()
  for kv in ${S_RES[gw_on:$last]}; do X[${kv%%=*}]=${kv#*=}; done
  chk "$last SSE streams all complete (${X[completed]}/$last)" "${X[completed]} == $last"
  chk "no SSE chunk held back > 100 ms (${X[late]} late, max ${X[max_late_ms]} ms)" "${X[late]} == 0"
  chk "peak RSS ≤ 150 MB ($(mb "${PEAK[gw_on]}"))" "${PEAK[gw_on]} <= 150 * 1024"
  chk "idle RSS ≤ 20 MB ($(mb "${IDLE_RSS[gw_on]}"))" "${IDLE_RSS[gw_on]} <= 20 * 1024"
  chk "refused first upstream adds ≤ 1 ms ($(awk -v a="$(calc "$(avg R_P50 gw_ref:c1) - $on50")" 'BEGIN{printf "%.0f", a}') µs p50 with cooldown, $(awk -v a="$(calc "$(avg R_P50 gw_refx:c1) - $on50")" 'BEGIN{printf "%.0f", a}') µs when tried on every request)" "$(avg R_P50 gw_refx:c1) - $on50 <= 1000"
  chk "records ≥ 10,000/s (${RB[records_per_s]})" "${RB[records_per_s]} >= 10000"
  chk "≤ 16 heap allocations per proxied JSON request (${AL[json:recording=on:allocs]})" "${AL[json:recording=on:allocs]} <= 16"
  chk "≤ 20 heap allocations per proxied 10-chunk stream (${AL[stream10:recording=on:allocs]})" "${AL[stream10:recording=on:allocs]} <= 20"
  [[ $MODE == smoke ]] && echo "(smoke run: figures from ~1 s measurements prove only that the harness works)"
} >>"$RES"

echo
cat "$RES"
log "written to $RES (raw output: $OUT/wrk.log, $OUT/sse.log, $OUT/records-bench.log, logs in $OUT)"
