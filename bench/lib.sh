# Shared by the bench scripts (sourced, not run): nginx in front of the mock, CPU ticks of a set
# of processes, the members' config and a throwaway PostgreSQL database. The scripts keep their
# own gateways in GP, their pids in PIDS and their URLs in URL.

# start_nginx DIR MOCK_PORT LISTEN_PORT: nginx (2 workers, keep-alive to the mock, no buffering)
# on core 0; sets NPID and URL[nginx] and adds to PIDS.
start_nginx() {
  local dir=$1 mp=$2 port=$3
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<NG
worker_processes 2; daemon off; pid $dir/nginx.pid; error_log $dir/error.log warn;
events { worker_connections 16384; }
http { access_log off; client_body_temp_path $dir/cb; proxy_temp_path $dir/p; fastcgi_temp_path $dir/f; uwsgi_temp_path $dir/u; scgi_temp_path $dir/s;
  keepalive_requests 1000000;
  upstream mock { server 127.0.0.1:$mp; keepalive 512; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$port; location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } } }
NG
  taskset -c 0 "$(command -v nginx || echo /usr/sbin/nginx)" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
  NPID=$!; PIDS+=($NPID); URL[nginx]=http://127.0.0.1:$port/v1/chat/completions
}

# The pids of a system: nginx's master and workers, or one gateway.
pids_of() { case $1 in nginx) echo $NPID $(pgrep -P $NPID);; *) echo ${GP[$1]};; esac; }

# User + system CPU ticks summed over the given pids.
ticks() { local t=0 p v; for p in "$@"; do v=$(sed 's/^.*) //' /proc/$p/stat | awk '{print $12+$13}'); t=$((t+v)); done; echo $t; }

# members_yaml MOCK_PORT TOKEN: the config of bench/members.sh and `MEMBERS=1 bench/callgrind.sh`:
# 1,000 members (every third with limits of its own), the one whose key is TOKEN in the middle with
# `rpm` and `tpm` too high ever to refuse, and the mock as the one upstream.
members_yaml() {
  local mp=$1 token=$2 i
  echo "members:"
  for i in $(seq 1 1000); do
    if ((i == 500)); then
      echo "  - {name: bench, key: $token, rpm: 100000000, tpm: 1000000000000}"
    elif ((i % 3 == 0)); then
      printf '  - {name: member-%04d, key: sk-member-key-%04d-abcdefghij, rpm: 60, tpm: 200000, concurrent: 8}\n' "$i" "$i"
    else
      printf '  - {name: member-%04d, key: sk-member-key-%04d-abcdefghij}\n' "$i" "$i"
    fi
  done
  printf 'upstreams:\n  - name: mock\n    endpoint: http://127.0.0.1:%s/v1\n    sk: k\n' "$mp"
}

# bench_database PREFIX: a fresh PostgreSQL database PREFIX_<pid> on BENCH_POSTGRES's server
# (default: the machine's, trust auth), dropped at exit together with the processes in PIDS. Sets
# ADMIN, DB and URL, and installs wrk when it is missing.
bench_database() {
  ADMIN=${BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
  DB=$1_$$
  URL="${ADMIN%/*}/$DB"
  command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
  PIDS=()
  trap bench_database_cleanup EXIT
  psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
}
bench_database_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}

# start_mock: bench_mock ($MOCK) on core 0 in the current directory, and gw.yaml for a gateway in
# front of it; sets MP (its port) and adds it to PIDS.
start_mock() {
  taskset -c 0 "$MOCK" 127.0.0.1:0 --threads 1 > mock.out 2>/dev/null &
  PIDS+=($!); sleep 0.5; MP=$(awk '/^port /{print $2}' mock.out)
  printf 'authorization: sk-bench-client-token\nupstreams:\n  - name: mock\n    endpoint: http://127.0.0.1:%s/v1\n    sk: k\n' "$MP" > gw.yaml
}

# start_four_systems BIN DIR BASEPORT: the systems bench/record.sh and bench/c1path.sh compare, all
# on core 0 — `direct` (the mock), `off` (BIN with -database none), `on` (BIN recording to
# DIR/on.sqlite) and nginx (DIR/ngx) — on ports from BASEPORT; fills GP, URL and PIDS.
start_four_systems() {
  local bin=$1 dir=$2 base=$3 port=$3 s db
  declare -gA URL GP
  start_mock
  GP[direct]=${PIDS[-1]}
  URL[direct]=http://127.0.0.1:$MP/v1/chat/completions
  for s in off on; do
    port=$((port+1))
    db=none; [[ $s == on ]] && db=$dir/on.sqlite
    taskset -c 0 "$bin" -addr 127.0.0.1:$port -config gw.yaml -database "$db" >/dev/null 2>$s.log &
    GP[$s]=$!; PIDS+=($!); URL[$s]=http://127.0.0.1:$port/v1/chat/completions
  done
  start_nginx "$dir/ngx" "$MP" $((base + 99))
  sleep 1.5
  for p in ${GP[off]} ${GP[on]} $NPID $(pgrep -P $NPID); do taskset -a -p -c 0 "$p" >/dev/null; done
}
