#!/usr/bin/env bash
# GPU machine, one GPU: correctness against transformers in bfloat16, the decode-step profile,
# throughput beside transformers, and offload on/off at a commodity card's memory.
# Run from the repo root with the posix_ipc wheel in .whl/ (see docs/benchmarks.md).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
for a in "--batch 128 --context 640" "--batch 256 --context 640 --uneven" "--batch 256 --context 2048"; do
    python3 -m tools.profile_step --model llama3-8b $a
done 2>&1 | grep '^{' | tee "$OUT/profile_step.jsonl"
python3 -m tools.compare_hf --device cuda --dtype bfloat16 --gpus 1 --json "$OUT/compare_bf16.json" \
    2>&1 | grep -v "Loading weights\|Writing"
python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --workload fixed:512/256 \
    --num-requests 256 --systems pipemax,transformers --hf-batch-sizes "${HF_BATCHES:-256}" \
    --json "$OUT/bench_llama3-8b.json" 2>&1 | grep -v '^\[bench\]\|^{'
for mode in off on; do
    python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --gpu-memory-gb 24 \
        --workload fixed:512/256 --num-requests 512 --systems pipemax \
        --pipemax-args "--kv-offload $mode" --json "$OUT/bench_8b_24gb_$mode.json" 2>&1 | grep -v '^\[bench\]'
done
