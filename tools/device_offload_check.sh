#!/usr/bin/env bash
# GPU machine, one GPU: float32 equality with transformers on CUDA (COMPARE=1), throughput beside
# transformers, and KV offload on / off / auto at a commodity card's memory (24 GB).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -n "${COMPARE:-}" ] && python3 -m tools.compare_hf --device cuda --dtype float32 --gpus 1 \
    --num-prompts 12 --json "$OUT/compare_fp32.json" 2>&1 | grep "^compare_hf"
python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --workload fixed:512/256 \
    --num-requests 256 --systems pipemax,transformers --hf-batch-sizes 256 \
    --json "$OUT/bench_llama3-8b.json" 2>&1 | grep -v '^\[bench\]\|^{'
for mode in ${MODES:-off on auto}; do
    python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --gpu-memory-gb 24 \
        --workload fixed:512/256 --num-requests 256 --systems pipemax \
        --pipemax-args "--kv-offload $mode --micro-batches 4" \
        --json "$OUT/bench_8b_24gb_$mode.json" 2>&1 | grep -v '^\[bench\]\|^{'
    python3 -c "import json,sys; r=json.load(open('$OUT/bench_8b_24gb_$mode.json'))[0]; print('$mode', {k: r.get(k) for k in ('output_tok_s','num_blocks','offloaded_admitted','bytes_prefetched','bytes_offloaded','peak_gpu_gb','error','steps','seconds','driver_wait_s')}, r.get('plan'), [{k: round(f[k], 2) for k in ('busy_s','wait_s')} for f in r.get('finals', [])])"
done
