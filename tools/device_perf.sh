#!/usr/bin/env bash
# GPU machine, one GPU: where a decode step's time goes (CUDA graph replay, profiled), end-to-end
# throughput of llama3-8b at 512/256 with the pipeline's GPU idle share, and the share of
# prefetch hidden under compute at 24 GB. STEPS / RUNS choose parts (default: all).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/posix_ipc*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
show() {  # one line of the figures that matter from a bench JSON
    python3 -c "import json; r=json.load(open('$1'))[0]; print('$1'.split('/')[-1], {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k in ('output_tok_s','total_tok_s','seconds','steps','num_blocks','offloaded_admitted','bytes_prefetched','peak_gpu_gb','idle_share','gpu_idle_share','hidden_share','measured_over_predicted','driver_wait_s','error')}); print('  finals', [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in f.items() if k in ('busy_s','wait_s','gpu_idle_share','prefetch_seconds','compute_stall_seconds','transfer_hidden_share','step_kinds','alloc_retries')} for f in r.get('finals', [])]); print('  plan', r.get('plan'))"
}
IFS=';' read -ra steps <<< "${STEPS:---batch 256 --context 640 --uneven --graphs}"
for s in "${steps[@]}"; do
    python3 -m tools.profile_step --model llama3-8b $s ${PROFILE:+--profile} 2>&1 | tail -25
done
for r in ${RUNS:-e2e256 e2e1024 hidden}; do
    case $r in
    e2e*) n=${r#e2e}; n=${n%%@*}; extra=""; [[ $r == *@* ]] && extra=${r#*@}; extra=${extra//_/ }
        name=$(echo "$r" | tr -c 'A-Za-z0-9.\n' '-')
        python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --workload fixed:512/256 \
            --num-requests $n --systems pipemax --pipemax-args "$extra" \
            --json "$OUT/bench_$name.json" >/dev/null 2>&1
        show "$OUT/bench_$name.json" ;;
    hidden)
        python3 -m tools.bench --model llama3-8b --device cuda --gpus 1 --gpu-memory-gb 24 \
            --workload fixed:512/128 --num-requests 96 --systems pipemax-offload \
            --pipemax-args "--micro-batches 4" --json "$OUT/bench_hidden.json" >/dev/null 2>&1
        show "$OUT/bench_hidden.json" ;;
    esac
done
