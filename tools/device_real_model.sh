#!/usr/bin/env bash
# GPU machine, one GPU: a trained model (SmolLM2-135M-Instruct) against transformers on the
# same GPU. float32 must be identical; in bfloat16, 64 text prompts x 64 tokens at 1 and 3
# stages (three stages on the one GPU): the share of identical continuations and, at every
# first difference, transformers' top-2 gap (in bfloat16 units at the logit's magnitude).
#   bash tools/device_real_model.sh FILE.gguf     (the joined SmolLM2-135M-Instruct.Q4_1.gguf)
# Run from the repo root with the posix_ipc and gguf wheels in .whl/ (see docs/benchmarks.md).
set -uo pipefail
GGUF=${1:?usage: bash tools/device_real_model.sh FILE.gguf}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl \
    .whl/gguf*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
MODEL=/tmp/smollm2-135m-instruct
python3 -m tools.smollm2 --gguf "$GGUF" --out "$MODEL" > "$OUT/convert.log" 2>&1 \
    || { tail -3 "$OUT/convert.log"; exit 1; }
cmp() {   # name, then compare_hf flags
    local name=$1; shift
    python3 -m tools.compare_hf --model "$MODEL" --prompts text --device cuda --max-tokens 64 \
        --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $?"
    grep "^compare_hf\|^  prompt" "$OUT/$name.log" || tail -5 "$OUT/$name.log"
}
cmp real_fp32_1st --dtype float32 --gpus 1 --num-prompts 16
cmp real_fp32_3st --dtype float32 --gpus 3 --num-prompts 16 --pipemax-args "--stage-devices 0,0,0"
cmp real_bf16_1st --dtype bfloat16 --gpus 1 --num-prompts 64
cmp real_bf16_3st --dtype bfloat16 --gpus 3 --num-prompts 64 --pipemax-args "--stage-devices 0,0,0"
