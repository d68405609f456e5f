#!/usr/bin/env bash
# GPU machine, one GPU: the kernels' tests, equality with transformers (float32) and near-ties
# only (bfloat16, prompts split into chunks), the decode step profile, and the throughput
# figures of docs/benchmarks.md (llama3-8b 512/256, 1024 requests; 24 GB offload off / on;
# the share of prefetch hidden).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_triton_decode.py \
    tests/test_triton_fused.py 2>&1 | tail -2
python3 -m tools.compare_hf --device cuda --dtype float32 --gpus 1 --num-prompts 12 \
    --pipemax-args "--max-num-batched-tokens 96" 2>&1 | grep "^compare_hf"
python3 -m tools.compare_hf --device cuda --dtype bfloat16 --gpus 1 \
    --pipemax-args "--max-num-batched-tokens 96" --json "$OUT/compare_bf16.json" 2>&1 | grep "^compare_hf"
python3 -m tools.profile_step --model llama3-8b --batch 256 --context 640 --uneven --graphs | tail -1
python3 -m tools.profile_step --model llama3-8b --batch 230 --context 640 --uneven --prompts 3 | tail -1
python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --workload fixed:512/256 \
    --num-requests 1024 --systems pipemax,roofline --json "$OUT/bench_8b_1024.json" 2>&1 \
    | grep -v '^\[bench\]\|^{'
for m in off on; do
    python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --gpu-memory-gb 24 \
        --workload fixed:512/256 --num-requests 256 --systems pipemax \
        --pipemax-args "--kv-offload $m --micro-batches 4" --json "$OUT/bench_24gb_$m.json" 2>&1 \
        | grep -v '^\[bench\]\|^{'
done
