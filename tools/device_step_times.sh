#!/usr/bin/env bash
# GPU machine: where a real run's time goes (stage busy / waiting, driver waiting).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
show() { python3 -c "import json; r=json.load(open('$1'))[0]; print({k: r.get(k) for k in ('output_tok_s','seconds','steps','driver_wait_s','max_seqs_per_mb','error')}, [{k: round(f[k], 2) for k in ('busy_s','wait_s','steps')} for f in r.get('finals', [])])"; }
python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --gpu-memory-gb 24 \
    --workload fixed:512/256 --num-requests 128 --systems pipemax \
    --pipemax-args "--kv-offload off --micro-batches 4" --json "$OUT/a.json" >/dev/null 2>&1; show "$OUT/a.json"
python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --workload fixed:512/256 \
    --num-requests 256 --systems pipemax --json "$OUT/b.json" >/dev/null 2>&1; show "$OUT/b.json"
python3 -m tools.profile_step --model llama3-8b --batch 18 --context 640 --uneven --profile 2>&1 | grep -v Warn | head -30
