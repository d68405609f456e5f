#!/usr/bin/env bash
# GPU machine, one GPU (compute capability 8.9+): fp8 weights (--quantization fp8).
#   bash tools/device_fp8_weights.sh [SMOLLM2_DIR]
# (a) the CUDA cases of tests/test_fp8.py: the fp8 linear through torch._scaled_mm against
#     bf16, and a CUDA graph capturing it (activation quantization included);
# (b) with SMOLLM2_DIR (the HF folder python -m tools.smollm2 writes): 64 text prompts x 64
#     greedy tokens on the GPU, fp8 weights against bfloat16 (tools/compare_fp8.py);
# (c) llama3-8b dummy, 1,024 requests of 512/256 then (time allowing) 512 of 2048/128:
#     pipemax-bf16 and pipemax-fp8 in one bench run: output tok/s, fp8 over bf16, measured over
#     predicted, the GEMM rates measured at the model's shapes. (Enough requests that the
#     micro-batches reach the planned size: the prediction assumes full micro-batches.)
# Run from the repo root with the posix_ipc wheel in .whl/ (see docs/benchmarks.md).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "capability", torch.cuda.get_device_capability())'

echo "== (a) CUDA cases of tests/test_fp8.py"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_fp8.py \
    -k "cuda or scaled_mm or fp8_linear or quantize" 2>&1 | tail -3

if [ -n "${1:-}" ]; then
    echo "== (b) SmolLM2 fp8 against bf16"
    timeout 120 python3 -m tools.compare_fp8 --model "$1" --device cuda --dtype bfloat16 \
        --num-prompts 64 --max-tokens 64 --prompts text --pipemax-args "--progress off" \
        --json "$OUT/fp8_smollm2.json" > "$OUT/fp8_smollm2.log" 2>&1
    echo "compare_fp8 exit $?"
    grep '^compare_fp8' "$OUT/fp8_smollm2.log" || tail -5 "$OUT/fp8_smollm2.log"
fi

bench() {   # name, workload, requests: at most 200 s, and within 460 s of the start
    local left=$((460 - SECONDS)); [ "$left" -gt 200 ] && left=200
    timeout "$left" python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 \
        --workload "$2" --num-requests "$3" --systems pipemax-bf16,pipemax-fp8 \
        --pipemax-args "--progress off" --json "$OUT/$1.json" > "$OUT/$1.log" 2>&1
    echo "bench $1 exit $?"
    grep 'plan:\|plan predicted\|error' "$OUT/$1.log" | cut -c1-420
    python3 - "$OUT/$1.json" <<'EOF'
import json, sys
rows = {r["system"]: r for r in json.load(open(sys.argv[1]))}
def show(r):
    if "error" in r:
        return f"{r['system']}: error {r['error']}"
    f = (r.get("stages") or [{}])[0].get("figures") or {}
    p = r.get("plan") or {}
    return (f"{r['system']}: {r['output_tok_s']:.0f} output tok/s, predicted "
            f"{p.get('predicted_tok_s', 0):.0f} ({p.get('bound')}-bound), measured/predicted "
            f"{r.get('measured_over_predicted') or 0:.2f}; GEMM TFLOP/s at {f.get('gemm_tokens')} "
            f"tokens: {f.get('tflops', 0):.0f} / {f.get('decode_tflops', 0):.0f}; "
            f"{p.get('micro_batches')} x {p.get('seqs_per_mb')} seqs; peak GPU GiB "
            f"{max(r.get('peak_gpu_gb') or [0]):.1f}")
for r in rows.values():
    print("  " + show(r))
b, q = rows.get("pipemax-bf16", {}), rows.get("pipemax-fp8", {})
if "output_tok_s" in b and "output_tok_s" in q:
    print(f"  fp8 over bf16: {q['output_tok_s'] / b['output_tok_s']:.2f}x")
EOF
}
echo "== (c) llama3-8b dummy, bf16 beside fp8"
bench fp8_bench_512_256 fixed:512/256 1024
if [ "$SECONDS" -lt 300 ]; then
    bench fp8_bench_2048_128 fixed:2048/128 512
else
    echo "bench fp8_bench_2048_128 skipped: ${SECONDS} s used"
fi
echo "total ${SECONDS} s; /dev/shm pipemax objects left: $(ls /dev/shm | grep -c pipemax)"
