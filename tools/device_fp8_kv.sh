#!/usr/bin/env bash
# GPU machine, one GPU (compute capability 8.9 or later): the fp8 (e4m3) KV cache.
#   bash tools/device_fp8_kv.sh [SMOLLM2_DIR] [no-bench | variants]
#  a. the GPU tests of the fp8 paths: the Triton decode kernel over an fp8 cache against the
#     torch fp8 path (and a graph replay with the scales changed in place), the quantizing
#     k/v write against torch's bytes, the fp8 attention and host-pool tests.
#  b. with SMOLLM2_DIR (an HF folder, python -m tools.smollm2 --out DIR): 128 text prompts x 64
#     greedy tokens in bfloat16, fp8 KV against bfloat16 KV: the share identical over the first
#     32 tokens (target >= 90%) and the chosen tokens' logprob |diff| (target mean < 0.02).
#  d. with SMOLLM2_DIR: ways of rounding the KV cache (tools/kv_variants.py: e4m3 as now, with
#     K/V smoothing, K or V left 16-bit, int8 with per-token or per-channel scales, K int8 with
#     V e4m3), each against bfloat16 KV on the same 128 prompts x 64 tokens, the model in
#     bfloat16.
#  c. llama3-8b dummy, fixed:1024/1024 at --gpu-memory-gb 24: fp8 KV beside 16-bit KV in one
#     bench run (target >= 1.5x output tok/s).
# Under 10 minutes; "no-bench": a, b and d (about 6); "variants": d only (about 2). Run from
# the repo root with the posix_ipc wheel in .whl/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader
variants() {
    echo "== d. KV rounding variants, SmolLM2 in bfloat16, against bfloat16 KV"
    timeout 300 python3 -m tools.kv_variants --model "$1" --device cuda --dtype bfloat16 \
        --num-prompts 128 --max-tokens 64 --first 32 \
        --variants fp8,fp8-ks,fp8-ks-vs,fp8-k16,fp8-v16,int8-ks-vs,int8-ks-chan,int8-ks-chan-vfp8 \
        --json "$OUT/kv_variants.json" > "$OUT/kv_variants.log" 2>&1
    echo "variants: exit $?"
    grep -E '^kv_variants|^  ' "$OUT/kv_variants.log" || tail -5 "$OUT/kv_variants.log"
}
if [ "${2:-}" = "variants" ]; then
    variants "${1:?variants needs SMOLLM2_DIR}"; exit 0
fi
echo "== a. GPU tests of the fp8 paths"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kv_quant.py \
    tests/test_triton_decode.py tests/test_triton_fused.py -k "fp8 or quant or round_trip or write_kv" \
    -rs > "$OUT/fp8_tests.log" 2>&1
echo "tests: exit $?"; grep -E "passed|failed|error|FAILED|^SKIPPED" "$OUT/fp8_tests.log" | tail -8
if [ -n "${1:-}" ]; then
    echo "== b. accuracy: SmolLM2 in bfloat16, fp8 KV against bfloat16 KV"
    timeout 200 python3 -m tools.compare_kv --model "$1" --device cuda --dtype bfloat16 \
        --num-prompts 128 --max-tokens 64 --first 32 --min-identical 0.9 --max-mean-diff 0.02 \
        --pipemax-args "--progress off" --json "$OUT/fp8_accuracy.json" > "$OUT/fp8_accuracy.log" 2>&1
    echo "accuracy: exit $? (3: a target missed)"
    grep '^compare_kv' "$OUT/fp8_accuracy.log" || tail -5 "$OUT/fp8_accuracy.log"
else
    echo "== b. skipped: no SmolLM2 folder given"
fi
if [ -n "${1:-}" ]; then
    variants "$1"
fi
if [ "${2:-}" = "no-bench" ]; then
    echo "== c. skipped (no-bench)"; exit 0
fi
echo "== c. speed: llama3-8b dummy 1024/1024 at 24 GB, fp8 KV beside 16-bit KV"
timeout 300 python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --gpu-memory-gb 24 \
    --workload fixed:1024/1024 --num-requests 96 --systems pipemax-kv16,pipemax-fp8kv \
    --pipemax-args "--progress off" --json "$OUT/fp8_bench.json" > "$OUT/fp8_bench.log" 2>&1
echo "bench: exit $?"
grep 'plan:' "$OUT/fp8_bench.log" | sed 's/.*plan: //' | cut -c1-300
python3 - "$OUT/fp8_bench.json" <<'PY'
import json, sys
try:
    rows = {r["system"]: r for r in json.load(open(sys.argv[1]))}
except (OSError, ValueError) as e:
    sys.exit(f"  no bench results: {e}")
for name, r in rows.items():
    print(" ", name, {k: r.get(k) for k in ("kv_cache_dtype", "output_tok_s", "num_blocks",
                                            "max_seqs_per_mb", "micro_batches", "preemptions",
                                            "offloaded_admitted", "seconds", "peak_gpu_gb",
                                            "error")})
a, b = rows.get("pipemax-kv16", {}), rows.get("pipemax-fp8kv", {})
if a.get("output_tok_s") and b.get("output_tok_s"):
    print("  fp8 / 16-bit output tok/s: %.3f (target >= 1.5)" % (b["output_tok_s"] / a["output_tok_s"]))
PY
left=$(ls /dev/shm | grep -c pipemax); echo "/dev/shm pipemax objects left: $left"
