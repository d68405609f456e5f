#!/usr/bin/env bash
# GPU machine, one GPU (compute capability 8.9+): the fused fp8 activation quantization.
#   bash tools/device_fp8_gemm.sh            (about 2 minutes)
# (a) tests/test_triton_fp8.py compiled (the kernel's bytes against torch's, on the GPU) and the
#     GPU cases of tests/test_fp8.py (the fp8 linear against bf16, a CUDA graph capturing it);
# (b) tools/fp8_gemm_bench.py: one llama3-8b layer's GEMMs at 256 and 2,048 tokens, bf16
#     against fp8 (torch quantization and fused), and the pieces alone, eager and graphed.
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
echo "total ${SECONDS} s"
