#!/usr/bin/env bash
# GPU machine (one H200 at --gpu-memory-gb 24): KV offload off / on (first-come) / on (the
# selection, --offload-policy selection), and swap against recompute where preemptions happen,
# each beside tools/simulate.py with the same flags (the ratios of docs/benchmarks.md). One line
# per system and way:
#   CASE SYSTEM real|sim tok/s=.. steps=.. kinds=.. preempt=.. offl=.. pcie_gb=..
#   bash tools/device_offload_h200.sh [CASE ...]   (default: both cases; about 11 minutes)
#   NOSIM=1 bash tools/device_offload_h200.sh ...  (the runs alone; the simulator can run elsewhere)
# Cases: chat_24gb (llama3-8b chat mix x 200), fixed_24gb (llama3-8b 1024/1024 x 64),
# plans_3stages (the chat mix x 200 over 3 stages sharing the GPU, 9 GB each: about a third of
# the weights and of the one-stage 24 GB case's KV room per stage; offload on with the driver's
# copy plans and without, and off; no simulator line: the simulator gives every stage a GPU of
# its own).
# Swap vs recompute: with offload off a preemption recomputes (recomputed= tokens), with it on
# or swap-only (--kv-offload swap) the preempted sequence's KV is swapped to the host pool
# (swapped=); the lines show both. The auto line shows what auto chose beside the others.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
trap 'pkill -TERM -P $$; wait; exit 143' TERM INT   # timeout passes the TERM on to its run
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
CAL="decode=0.771,mixed=0.723,prompt=0.723,layer_us=74"
line() {  # case, system, way, json file (a stats JSON or a simulator object)
    python3 - "$@" <<'PY'
import json, sys
case, system, way, path = sys.argv[1:5]
try:
    d = json.load(open(path))
except (OSError, ValueError) as e:
    print(case, system, way, "error", e); sys.exit()
pcie = d.get("bytes_prefetched", 0) + d.get("bytes_offloaded", 0)
if "finals" in d:
    kinds = {}
    for f in d["finals"]:
        for k, v in (f.get("step_kinds") or {}).items():
            s, g = kinds.get(k, (0, 0.0))
            kinds[k] = (max(s, v["steps"]), g + v["gpu_s"])
    tok_s = d.get("output_tok_s") or d["output_tokens"] / d["seconds"]
else:
    kinds = {k: (v["steps"], sum(v["sim_s"])) for k, v in d["step_kinds"].items()}
    tok_s = d["output_tok_s"]
print(case, system, way, f"tok/s={tok_s:.0f}", f"steps={d.get('steps')}",
      "kinds=" + ",".join(f"{k}:{s}/{g:.1f}" for k, (s, g) in sorted(kinds.items())),
      f"preempt={d.get('preemptions')}", f"swapped={d.get('swapped_out')}",
      f"recomputed={d.get('tokens_recomputed')}", f"offl={d.get('offloaded_admitted')}",
      f"moved={d.get('moved_to_host')}/{d.get('moved_to_gpu')}/"
      f"{d.get('moved_between_micro_batches')}", f"pcie_gb={pcie / 1e9:.0f}", flush=True)
PY
}
one() {  # case, system, then the flags shared by the run and the simulator
    local case=$1 system=$2; shift 2
    local wl=$OUT/$case.requests.jsonl
    rm -f "$OUT/$case.$system.out.jsonl"     # a fresh run, never a resumed one
    # in the background and waited for, so that a TERM to this script (a caller's time
    # limit) reaches the run at once (the trap below) instead of leaving it on the GPU
    timeout 240 python3 -m pipemax.launch --device cuda --gpus "$GPUS" --model llama3-8b \
        --load-format dummy --input "$wl" --output "$OUT/$case.$system.out.jsonl" --quiet \
        --stats-json "$OUT/$case.$system.stats.json" --gpu-memory-gb "$MEM" --micro-batches "$MB" \
        --no-socket $STAGE_DEVICES "$@" >"$OUT/$case.$system.log" 2>&1 &
    wait $! || echo "$case $system real failed"
    line "$case" "$system" real "$OUT/$case.$system.stats.json"
    grep -o "[0-9]* prefetches issued from the driver's copy plans\|[0-9]* steps taken while the one before computed" "$OUT/$case.$system.log"
    [ "$GPUS" = 1 ] && [ -z "${NOSIM:-}" ] || return 0
    python3 -m tools.simulate --json --calibrate "$CAL" --model llama3-8b --gpu-memory-gb "$MEM" \
        --micro-batches 4 --workload "$WL" --num-requests "$N" "$@" \
        > "$OUT/$case.$system.sim.json" 2>"$OUT/$case.$system.sim.err" \
        && line "$case" "$system" sim "$OUT/$case.$system.sim.json"
}
run_case() {
    GPUS=1; MB=4; STAGE_DEVICES=; MEM=24
    case $1 in
    chat_24gb) WL=chat; N=200 ;;
    fixed_24gb) WL=fixed:1024/1024; N=64 ;;
    plans_3stages) WL=chat; N=200; GPUS=3; MEM=9; STAGE_DEVICES="--stage-devices 0,0,0" ;;
    *) echo "unknown case $1"; return 1 ;;
    esac
    python3 - "$WL" "$N" "$OUT/$1.requests.jsonl" <<'PY'
import json, sys
from pipemax.model_config import BUILTIN_MODELS
from tools.workload import requests
spec, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(path, "w") as f:
    for r in requests(spec, n, BUILTIN_MODELS["llama3-8b"].vocab_size, 0):
        f.write(json.dumps(r) + "\n")
PY
    if [ "$1" = plans_3stages ]; then
        one "$1" resident --kv-offload off
        one "$1" offload-plans --kv-offload on --prefetch-plans on
        one "$1" offload-noplans --kv-offload on --prefetch-plans off
        return
    fi
    one "$1" resident --kv-offload off
    one "$1" swap --kv-offload swap
    one "$1" offload-fc --kv-offload on --offload-policy first-come
    one "$1" offload-sel --kv-offload on --offload-policy selection
    one "$1" auto --kv-offload auto
}
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(chat_24gb fixed_24gb)
for c in "${cases[@]}"; do
    start=$(date +%s); run_case "$c"; echo "$c: $(( $(date +%s) - start )) s"
done
