#!/usr/bin/env bash
# GPU machine: correctness against transformers in bfloat16, and the first throughput figure.
# Run from the repo root with the posix_ipc wheel in .whl/ (see docs/benchmarks.md).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
python3 -m tools.compare_hf --device cuda --dtype bfloat16 --gpus 1 --json "$OUT/compare_bf16.json"
python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --workload fixed:512/256 \
    --num-requests 256 --systems pipemax,transformers --hf-batch-sizes "${HF_BATCHES:-64,256}" \
    --json "$OUT/bench_llama3-8b.json"
