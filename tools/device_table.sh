#!/usr/bin/env bash
# GPU machine (one H200 for issue 4's table): llama3-8b beside transformers at 512/256, the
# other fixed workloads, the 13-14B models, the chat-like mix at 24 GB and the ring hand-off
# latency, one JSON each under $OUT. Run on the H200 (`run` with kind nvidia-h200).
#   bash tools/device_table.sh [CASE ...]     (default: every case; about 10 minutes)
# Cases: 8b_512_256 8b_1024_1024 8b_2048_128 13b_512_256 qwen14b_512_256 chat_24gb ring
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
run_case() {
    case $1 in
    8b_512_256) bench 8b_512_256 --model llama3-8b --workload fixed:512/256 --num-requests 1024 \
        --systems pipemax,transformers,roofline --hf-batch-sizes 256,512 ;;
    8b_1024_1024) bench 8b_1024_1024 --model llama3-8b --workload fixed:1024/1024 \
        --num-requests 256 --systems pipemax,roofline ;;
    8b_2048_128) bench 8b_2048_128 --model llama3-8b --workload fixed:2048/128 \
        --num-requests 512 --systems pipemax,roofline ;;
    13b_512_256) bench 13b_512_256 --model llama2-13b --workload fixed:512/256 \
        --num-requests 512 --systems pipemax,roofline ;;
    qwen14b_512_256) bench qwen14b_512_256 --model qwen2.5-14b --workload fixed:512/256 \
        --num-requests 512 --systems pipemax,roofline ;;
    chat_24gb) bench chat_24gb --model llama3-8b --gpu-memory-gb 24 --workload chat \
        --num-requests 200 --systems pipemax-resident,pipemax-offload,roofline \
        --pipemax-args "--micro-batches 4" --chart "$OUT/bench_chat_24gb.png" ;;
    ring) for th in 0 4 1; do python3 -m tools.ring_latency --sizes 8K,256K,2M,16M --iters 200 \
        --threads $th; done | tee "$OUT/ring.jsonl" \
        | sed "s/^/ring: /" ;;
    *) echo "unknown case $1"; return 1 ;;
    esac
}
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(8b_512_256 8b_1024_1024 8b_2048_128 13b_512_256 \
    qwen14b_512_256 chat_24gb ring)
for c in "${cases[@]}"; do
    start=$(date +%s); run_case "$c"; echo "$c: $(( $(date +%s) - start )) s"
done
