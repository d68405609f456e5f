#!/usr/bin/env bash
# GPU machine (one H200 for issue 4's table): llama3-8b beside transformers at 512/256, the
# other fixed workloads, and the 13-14B models, one bench JSON each under $OUT. Run on the
# H200 (`run` with kind nvidia-h200); about 8-9 minutes.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench() {  # name, then bench flags
    local name=$1; shift
    python3 -m tools.bench --device cuda --gpus 1 --json "$OUT/$name.json" "$@" 2>/dev/null \
        | sed "s/^/$name: /"
}
bench 8b_512_256 --model llama3-8b --workload fixed:512/256 --num-requests 1024 \
    --systems pipemax,transformers,roofline --hf-batch-sizes 256,512
bench 8b_1024_1024 --model llama3-8b --workload fixed:1024/1024 --num-requests 256 \
    --systems pipemax,roofline
bench 8b_2048_128 --model llama3-8b --workload fixed:2048/128 --num-requests 512 \
    --systems pipemax,roofline
bench 13b_512_256 --model llama2-13b --workload fixed:512/256 --num-requests 512 \
    --systems pipemax,roofline
bench qwen14b_512_256 --model qwen2.5-14b --workload fixed:512/256 --num-requests 512 \
    --systems pipemax,roofline
