#!/usr/bin/env bash
# GPU machine, one GPU: pipelines of several stages placed on it (--stage-devices 0,0,...).
#   bash tools/device_pipelines.sh kernels   # GPU kernel tests, incl. every head size
#   bash tools/device_pipelines.sh check     # float32 against transformers, 1-4 stages, 5 families,
#                                            # KV resident and mostly in the host pool
#   bash tools/device_pipelines.sh llama     # llama3-8b dummy 512/256 at 2 and 4 stages on one GPU:
#                                            # every request served, /dev/shm clean, ring hand-offs
# Run from the repo root with the posix_ipc wheel in .whl/ (see docs/benchmarks.md).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for step in "$@"; do
case $step in
kernels)
    python3 -m pytest -q -p no:cacheprovider tests/test_triton_decode.py tests/test_attention.py \
        tests/test_devices.py tests/test_transfer.py 2>&1 | tail -4 ;;
check)
    python3 -m tools.check_pipelines --stages 1,2,3,4 --families llama-hd8,llama-hd64 \
        --json "$OUT/check_a.json" 2>&1 | grep '^check_pipelines'
    python3 -m tools.check_pipelines --stages 1,3 --families qwen2-hd80-tied,mistral-hd128,llama-hd256 \
        --json "$OUT/check_b.json" 2>&1 | grep '^check_pipelines' ;;
llama)
    for n in 2 4; do
        devs=$(python3 -c "print(','.join(['0'] * $n))")
        timeout 280 python3 -m tools.bench --model llama3-8b --device cuda --gpus $n \
            --workload fixed:512/256 --num-requests 256 --systems pipemax \
            --pipemax-args "--stage-devices $devs --progress off" \
            --json "$OUT/bench_8b_${n}stages.json" > "$OUT/bench_8b_${n}stages.log" 2>&1
        grep 'plan:\|predicted\|error\|requests ' "$OUT/bench_8b_${n}stages.log" | cut -c1-400
        python3 - "$OUT/bench_8b_${n}stages.json" <<'EOF'
import json, os, sys
r = json.load(open(sys.argv[1]))[0]
f = r.get("finals") or []
n = sum(x.get("handoffs", 0) for x in f)
per = [round(1e3 * x["handoff_s"] / max(1, x["handoffs"]), 3) for x in f]
left = [x for x in os.listdir("/dev/shm") if "pipemax" in x]
print(f"  served {r.get('requests_ok')} ok, {r.get('requests_error')} failed; "
      f"ring hand-offs {n}: mean ms per stage {per}, max "
      f"{max((x['handoff_max_s'] for x in f), default=0) * 1e3:.2f} ms; "
      f"/dev/shm pipemax objects left: {len(left)}")
EOF
    done ;;
esac
done
