#!/usr/bin/env bash
# GPU machine, one GPU (compute capability 8.9+): the fused fp8 activation quantization.
#   bash tools/device_fp8_gemm.sh [bench]    (about 1 minute; with bench about 4)
# (a) tests/test_triton_fp8.py compiled (the kernel's bytes against torch's, on the GPU) and the
#     GPU cases of tests/test_fp8.py (the fp8 linear against bf16, a CUDA graph capturing it);
# (b) tools/fp8_gemm_bench.py: one llama3-8b layer's GEMMs at 256 and 2,048 tokens, bf16
#     against fp8 (torch quantization and fused), and the pieces alone, eager and graphed;
# (c) with "bench": llama3-8b dummy, 1,024 requests of 512/256, pipemax-bf16 beside pipemax-fp8.
# Run from the repo root with the posix_ipc wheel in .whl/ (see docs/benchmarks.md).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "capability", torch.cuda.get_device_capability())'
echo "== (a) tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_triton_fp8.py tests/test_fp8.py \
    -k "triton_fp8 or cuda or scaled_mm or fp8_linear or quantize" 2>&1 | tee "$OUT/fp8_gemm_tests.log" | tail -15
echo "== (b) GEMM micro-benchmark"
timeout 120 python3 -m tools.fp8_gemm_bench --model llama3-8b --tokens 256,2048 2>&1 \
    | tee "$OUT/fp8_gemm_bench.log"
if [ "${1:-}" = bench ]; then
    echo "== (c) llama3-8b dummy 512/256, bf16 beside fp8"
    timeout 230 python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 \
        --workload fixed:512/256 --num-requests 1024 --systems pipemax-bf16,pipemax-fp8 \
        --pipemax-args "--progress off" --json "$OUT/fp8_bench_512_256.json" \
        > "$OUT/fp8_bench_512_256.log" 2>&1
    echo "bench exit $?"
    grep 'plan:\|plan predicted\|error' "$OUT/fp8_bench_512_256.log" | cut -c1-420
    python3 - "$OUT/fp8_bench_512_256.json" <<'PY'
import json, sys
rows = {r["system"]: r for r in json.load(open(sys.argv[1]))}
for r in rows.values():
    if "error" in r:
        print(f"  {r['system']}: error {r['error']}")
        continue
    f = (r.get("stages") or [{}])[0].get("figures") or {}
    p = r.get("plan") or {}
    print(f"  {r['system']}: {r['output_tok_s']:.0f} output tok/s, predicted "
          f"{p.get('predicted_tok_s', 0):.0f}, measured/predicted "
          f"{r.get('measured_over_predicted') or 0:.2f}; GEMM TFLOP/s at {f.get('gemm_tokens')} "
          f"tokens: {f.get('tflops', 0):.0f} / {f.get('decode_tflops', 0):.0f}")
b, q = rows.get("pipemax-bf16", {}), rows.get("pipemax-fp8", {})
if "output_tok_s" in b and "output_tok_s" in q:
    print(f"  fp8 over bf16: {q['output_tok_s'] / b['output_tok_s']:.2f}x")
PY
fi
echo "total ${SECONDS} s"
