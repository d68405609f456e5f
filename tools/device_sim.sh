#!/usr/bin/env bash
# GPU machine (one H200): real runs beside tools/simulate.py, for its docs/benchmarks.md section.
# Each case runs tools.bench (stats JSON with the GPU seconds per step kind), then the simulator
# with the same flags, twice: with the ratios of docs/benchmarks.md, and fitted to the case's
# own run (--calibrate FILE:SYSTEM,layer_us=74). One line per system and way:
#   CASE SYSTEM real|sim|fit tok/s=.. steps=.. kinds=kind:steps/gpu_s,... preempt=.. offl=.. pcie_gb=..
#   bash tools/device_sim.sh [CASE ...]   (default: every case; about 6 minutes)
# Cases: 8b_512_256 chat_24gb 8b_1024_1024_24gb
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
CAL="decode=0.771,mixed=0.723,prompt=0.723,layer_us=74"
line() {  # case, system, way, json file (a bench list or a simulator object)
    python3 - "$@" <<'EOF'
import json, sys
case, system, way, path = sys.argv[1:5]
d = json.load(open(path))
if isinstance(d, list):
    d = next((r for r in d if r.get("system") == system), {"error": "no such system"})
if d.get("error"):
    print(case, system, way, "error", d["error"]); sys.exit()
if "finals" in d:       # a real run: GPU seconds per kind, all stages
    kinds = {}
    for f in d["finals"]:
        for k, v in (f.get("step_kinds") or {}).items():
            s, g = kinds.get(k, (0, 0.0))
            kinds[k] = (max(s, v["steps"]), g + v["gpu_s"])
    pcie = d.get("bytes_prefetched", 0) + d.get("bytes_offloaded", 0)
else:
    kinds = {k: (v["steps"], sum(v["sim_s"])) for k, v in d["step_kinds"].items()}
    pcie = d["bytes_prefetched"] + d["bytes_offloaded"]
print(case, system, way, f"tok/s={d['output_tok_s']:.0f}", f"steps={d['steps']}",
      "kinds=" + ",".join(f"{k}:{s}/{g:.1f}" for k, (s, g) in sorted(kinds.items())),
      f"preempt={d.get('preemptions')}", f"offl={d.get('offloaded_admitted')}",
      f"pcie_gb={pcie / 1e9:.0f}", flush=True)
EOF
}
both() {  # case, system, bench json, then the simulator's flags
    local case=$1 system=$2 json=$3; shift 3
    line "$case" "$system" real "$json"
    python3 -m tools.simulate --json --calibrate "$CAL" "$@" > "$OUT/$case.$system.sim.json" \
        && line "$case" "$system" sim "$OUT/$case.$system.sim.json"
    python3 -m tools.simulate --json --calibrate "$json:$system,layer_us=74" "$@" \
        > "$OUT/$case.$system.fit.json" && line "$case" "$system" fit "$OUT/$case.$system.fit.json"
}
run_case() {
    case $1 in
    8b_512_256)
        python3 -m tools.bench --device cuda --gpus 1 --model llama3-8b --workload fixed:512/256 \
            --num-requests 1024 --systems pipemax --json "$OUT/$1.json" >/dev/null 2>&1
        both "$1" pipemax "$OUT/$1.json" --model llama3-8b --workload fixed:512/256 \
            --num-requests 1024 ;;
    chat_24gb)
        python3 -m tools.bench --device cuda --gpus 1 --model llama3-8b --gpu-memory-gb 24 \
            --workload chat --num-requests 200 --systems pipemax-resident,pipemax-offload \
            --pipemax-args "--micro-batches 4" --json "$OUT/$1.json" >/dev/null 2>&1
        for m in resident:off offload:on; do
            both "$1" "pipemax-${m%%:*}" "$OUT/$1.json" --model llama3-8b --gpu-memory-gb 24 \
                --workload chat --num-requests 200 --micro-batches 4 --kv-offload "${m##*:}"
        done ;;
    8b_1024_1024_24gb)
        python3 -m tools.bench --device cuda --gpus 1 --model llama3-8b --gpu-memory-gb 24 \
            --workload fixed:1024/1024 --num-requests 64 --systems pipemax-resident,pipemax-offload \
            --pipemax-args "--micro-batches 4" --json "$OUT/$1.json" >/dev/null 2>&1
        for m in resident:off offload:on; do
            both "$1" "pipemax-${m%%:*}" "$OUT/$1.json" --model llama3-8b --gpu-memory-gb 24 \
                --workload fixed:1024/1024 --num-requests 64 --micro-batches 4 \
                --kv-offload "${m##*:}"
        done ;;
    *) echo "unknown case $1"; return 1 ;;
    esac
}
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(8b_512_256 chat_24gb 8b_1024_1024_24gb)
for c in "${cases[@]}"; do
    start=$(date +%s); run_case "$c"; echo "$c: $(( $(date +%s) - start )) s"
done
