#!/usr/bin/env bash
# GPU machine, one GPU: prefix caching's three targets, each caching on beside caching off.
#  1. llama3-8b dummy, shared:1024/128/128, 1024 requests: output tok/s on over off (target
#     >= 3x), prompt tokens computed over total (target <= 15%).
#  2. the few-shot mix at a 24 GB cap with offload on: the host pool as the cache's second
#     tier off (pipemax-cache, the default) beside on (pipemax-hostcache, --prefix-cache-host
#     on), the tier's run first; both let offloaded sequences map cached GPU prefixes. Target: host-tier hits
#     (host_cache_hits) counted, and faster with the tier on. About 4 minutes.
#  3. unique prompts, fixed:512/256, 512 requests: caching on within 2% of off.
# About 15 minutes.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
show() {
    python3 -c "
import json, sys
rows = {r['system']: r for r in json.load(open(sys.argv[1]))}
for name, r in rows.items():
    print(' ', name, {k: r.get(k) for k in ('output_tok_s', 'prompt_tokens', 'prompt_tokens_computed', 'prompt_cache_hit_share', 'preemptions', 'offloaded_admitted', 'offloaded_cached', 'host_cache_blocks', 'host_cache_blocks_out', 'host_cache_hits', 'bytes_prefetched', 'seconds', 'error')})
for on, off in (('pipemax-cache', 'pipemax-nocache'), ('pipemax-hostcache', 'pipemax-cache')):
    a, b = rows.get(on, {}), rows.get(off, {})
    if a.get('output_tok_s') and b.get('output_tok_s'):
        print('  %s/%s output tok/s: %.3f' % (on, off, a['output_tok_s'] / b['output_tok_s']))
" "$1"
}
bench() {    # NAME WORKLOAD REQUESTS SYSTEMS [bench flags...]
    local name=$1 w=$2 n=$3 systems=$4; shift 4
    echo "== $name: $w, $n requests, $systems $*"
    timeout 580 python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --workload "$w" \
        --num-requests "$n" --systems "$systems" "$@" \
        --json "$OUT/prefix_$name.json" 2>"$OUT/prefix_$name.log" | grep -v '^\[bench\]\|^{'
    show "$OUT/prefix_$name.json"
}
case "${1:-all}" in
    shared|all) bench shared shared:1024/128/128 1024 pipemax-cache,pipemax-nocache ;;&
    fewshot|all) bench fewshot_24gb fewshot 512 pipemax-hostcache,pipemax-cache \
                     --gpu-memory-gb 24 --pipemax-args "--kv-offload on" ;;&
    unique|all) bench unique fixed:512/256 512 pipemax-cache,pipemax-nocache ;;
esac
