#!/usr/bin/env bash
# Where the gateway's CPU goes at c=64: `perf record` of the release binary under wrk, each sample
# attributed to its owner (the kernel, glibc's allocator or memcpy/memset, or the Rust crate its
# symbol belongs to). Prints the share per owner and the busiest symbols of a few crates.
#
#   bench/profile.sh [json|stream] [sqlite|none] [SECONDS]
#
# Gateway and bench_mock on core 0, wrk on core 1 (as bench/run.sh). Needs perf, wrk and a
# previous run of bench/run.sh (bench/out/bin). The profile stays in bench/out/profile/.
set -u
KIND=${1:-json}; DB=${2:-sqlite}; SECS=${3:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd); B=$ROOT/bench/out/bin; D=$ROOT/bench/out/profile/$KIND-$DB
rm -rf "$D"; mkdir -p "$D"; cd "$D" || exit 1
taskset -c 0 $B/bench_mock 127.0.0.1:0 --threads 1 > mock.out 2>/dev/null &
MPID=$!; sleep 0.5; MP=$(awk '/^port /{print $2}' mock.out)
printf 'authorization: sk-bench-client-token\nupstreams:\n  - name: mock\n    endpoint: http://127.0.0.1:%s/v1\n    sk: k\n' $MP > gw.yaml
[[ $DB == sqlite ]] && DBA=$D/r.sqlite || DBA=none
$B/openai-api-route -addr 127.0.0.1:29222 -config gw.yaml -database $DBA >gw.out 2>gw.log &
GPID=$!; sleep 1; taskset -a -p -c 0 $GPID >/dev/null
export BENCH_TOKEN=sk-bench-client-token
LUA=$ROOT/bench/post.lua; Q=""
if [[ $KIND == stream ]]; then export BENCH_STREAM=1; Q="?chunks=10&gap_ms=0"; fi
taskset -c 1 wrk -t2 -c64 -d2s -s $LUA "http://127.0.0.1:29222/v1/chat/completions$Q" >/dev/null
perf record -F 2999 -g -p $GPID -o perf.data -- sleep $((SECS-1)) >/dev/null 2>&1 &
PP=$!
OUT=$(taskset -c 1 wrk -t2 -c64 -d${SECS}s -s $LUA "http://127.0.0.1:29222/v1/chat/completions$Q")
wait $PP
echo "$OUT" | grep -E "Requests/sec|WRK" | head -2
kill $GPID $MPID; wait 2>/dev/null
perf report -i perf.data --no-children --sort dso,sym --stdio 2>/dev/null | grep -E "^ +[0-9.]+%" > flat.txt
python3 - <<'PY'
import re,collections
tot=collections.Counter(); syms=collections.defaultdict(collections.Counter)
for line in open('flat.txt'):
    m=re.match(r'\s+([0-9.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)',line)
    if not m: continue
    pct=float(m.group(1)); dso=m.group(2); sym=m.group(4).strip()
    if m.group(3)=='k' or 'kernel' in dso: owner='kernel'
    elif 'libc' in dso: owner='libc ('+('malloc/free' if re.search(r'malloc|free|_int_|cfree|realloc',sym) else 'memcpy/memset' if re.search(r'mem(cpy|move|set)',sym) else 'other')+')'
    else:
        s=re.sub(r'^<','',sym); s=re.sub(r'^_?<?','',s)
        c=re.match(r'([a-z_0-9]+)::',s)
        owner=c.group(1) if c else 'other: '+s[:40]
        if owner in ('core','alloc','std'): owner='std/core/alloc'
    tot[owner]+=pct; syms[owner][sym[:90]]+=pct
allp=sum(tot.values())
for o,p in tot.most_common(25):
    print(f"{p:6.2f}%  {o}")
print(f"total {allp:.1f}%")
for o in ['openai_api_route','actix_http','awc','tokio','actix_web']:
    print('--',o); 
    for s,p in syms[o].most_common(6): print(f"   {p:5.2f}% {s}")
PY
