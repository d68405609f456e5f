"""One workload through several systems, side by side, on one machine, in one invocation.

    python -m tools.bench --model llama3-8b --device cuda --gpus 1 \
        --workload fixed:512/256 --num-requests 256 --systems pipemax,transformers

Each system runs in a fresh process (so each starts with an empty GPU). Prints a table and
writes the figures as JSON (``--json``).

Systems:
    pipemax          pipemax with --gpus G and the flags after ``--pipemax-args`` (offload auto)
    pipemax-offload  the same with --kv-offload on
    pipemax-resident the same with --kv-offload off (GPU-resident KV: vLLM's pipeline policy)
    pipemax-1gpu     one stage with --kv-offload on (FlexGen's setting)
    pipemax-cache    the same as pipemax with --prefix-caching on (the default)
    pipemax-nocache  the same with --prefix-caching off (every prompt token computed)
    pipemax-hostcache  the same with --prefix-cache-host on (the host tier of the cache)
    pipemax-kv16     the same as pipemax with --kv-cache-dtype auto (KV in the model's dtype)
    pipemax-fp8kv    the same with --kv-cache-dtype fp8 (e4m3: half the KV bytes)
    pipemax-bf16     the same with --quantization none (16-bit weights: the default)
    pipemax-fp8      the same with --quantization fp8 (e4m3 linear weights, stages/fp8.py)
    transformers     HuggingFace ``generate`` at each of ``--hf-batch-sizes`` (best one counts),
                     where transformers is installed
    roofline         the cost model's whole-run prediction for the plan pipemax chose
                     (pipemax/planner.py), read from the first pipemax run

Figures per run: output and total tokens/s, requests/s, peak GPU memory per stage, host KV
bytes, PCIe bytes moved, the share of prompt tokens taken from the prefix cache, the share of stage time spent waiting for work (pipeline bubbles),
and measured over predicted. ``--chart FILE.png`` draws output tokens/s (matplotlib, if
installed). While a pipemax system runs, its own lines pass through to stderr: the plan, and
its progress (a bar on a terminal, else a line every ``--progress-interval`` seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipemax.model_config import BUILTIN_MODELS, apply_overrides
from tools.workload import requests, write

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run_teed(cmd: list[str]) -> tuple[int, str]:
    """Run pipemax with its stderr (progress, plan, errors) shown as it comes and kept."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    kept = bytearray()
    while True:
        chunk = os.read(p.stderr.fileno(), 65536)
        if not chunk:
            break
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        kept += chunk
    p.stderr.close()
    return p.wait(), kept.decode(errors="replace")


def run_pipemax(a, name: str, gpus: int, extra: list[str], req_file: str, tmp: Path) -> dict:
    out = tmp / f"{name}.out.jsonl"
    stats = tmp / f"{name}.stats.json"
    cmd = [sys.executable, "-m", "pipemax.launch", "--device", a.device, "--gpus", str(gpus),
           "--load-format", "dummy", "--model", a.model, "--input", req_file, "--output",
           str(out), "--stats-json", str(stats), *sum((["--override", o] for o in a.override),
                                                      []), *extra]
    if a.gpu_memory_gb:
        cmd += ["--gpu-memory-gb", str(a.gpu_memory_gb)]
    if sys.stderr.isatty():
        cmd += ["--progress", "bar"]      # drawn through the pipe below
    print(f"[bench] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    rc, err = _run_teed(cmd)
    if rc != 0:
        return {"system": name, "error": (err.strip().splitlines() or ["?"])[-1]}
    s = json.loads(stats.read_text())
    s.update(system=name, gpus=gpus, wall_seconds=time.monotonic() - t0)
    return s


PIPEMAX_SYSTEMS = {"pipemax": (None, []), "pipemax-offload": (None, ["--kv-offload", "on"]),
                   "pipemax-resident": (None, ["--kv-offload", "off"]),
                   "pipemax-1gpu": (1, ["--kv-offload", "on"]),
                   "pipemax-cache": (None, ["--prefix-caching", "on"]),
                   "pipemax-nocache": (None, ["--prefix-caching", "off"]),
                   "pipemax-hostcache": (None, ["--prefix-cache-host", "on"]),
                   "pipemax-kv16": (None, ["--kv-cache-dtype", "auto"]),
                   "pipemax-fp8kv": (None, ["--kv-cache-dtype", "fp8"]),
                   "pipemax-bf16": (None, ["--quantization", "none"]),
                   "pipemax-fp8": (None, ["--quantization", "fp8"])}


def derive(r: dict) -> dict:
    """The figures the table shows that a run's stats hold only implicitly."""
    finals = r.get("finals") or []
    busy = sum(f.get("busy_s", 0.0) for f in finals)
    wait = sum(f.get("wait_s", 0.0) for f in finals)
    plan = r.get("plan") or {}
    pred = plan.get("predicted_tok_s")
    shares = [f["transfer_hidden_share"] for f in finals
              if f.get("transfer_hidden_share") is not None]
    gpu_idle = [f["gpu_idle_share"] for f in finals if f.get("gpu_idle_share") is not None]
    return {"weights": ",".join(sorted({st.get("weights", "?") for st in r.get("stages", [])})),
            "idle_share": wait / (busy + wait) if busy + wait > 0 else None,
            "gpu_idle_share": max(gpu_idle) if gpu_idle else None,
            "hidden_share": min(shares) if shares else None,
            "pcie_gb": (r.get("bytes_prefetched", 0) + r.get("bytes_offloaded", 0)) / 1e9,
            "host_kv_gb": (plan.get("host_blocks", 0) * sum(
                st.get("block_bytes", 0) for st in r.get("stages", []))) / 2**30,
            "predicted_tok_s": pred,
            "measured_over_predicted": r["output_tok_s"] / pred if pred else None}


def roofline(results: list[dict]) -> dict:
    for r in results:
        if r.get("plan"):
            return {"system": "roofline", "output_tok_s": r["plan"]["predicted_tok_s"],
                    "bound": r["plan"]["bound"], "of": r["system"]}
    return {"system": "roofline", "error": "no pipemax run to take the plan from"}


def run_transformers(a, name: str) -> dict:
    cmd = [sys.executable, "-m", "tools.hf_baseline", "--model", a.model, "--workload",
           a.workload, "--num-requests", str(a.num_requests), "--batch-sizes",
           a.hf_batch_sizes, "--device", a.device, "--dtype", a.dtype,
           *sum((["--override", o] for o in a.override), [])]
    print(f"[bench] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    rows = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    ok = [r for r in rows if "output_tok_s" in r]
    if not ok:
        err = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"system": name, "error": err, "tries": rows}
    best = max(ok, key=lambda r: r["output_tok_s"])
    return {**best, "system": name, "tries": rows}


def table(results: list[dict]) -> str:
    cols = ["system", "gpus", "weights", "kv_cache_dtype", "output_tok_s", "total_tok_s",
            "requests_s", "seconds", "num_blocks",
            "peak_gpu_gb", "host_kv_gb", "pcie_gb", "prompt_cache_hit_share", "idle_share",
            "gpu_idle_share",
            "hidden_share",
            "measured_over_predicted",
            "batch"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, float):
                v = f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
            elif v is None:
                v = ""
            elif isinstance(v, list):
                v = ",".join(f"{x:.1f}" for x in v)
            cells.append(str(v))
        if "error" in r:
            cells[cols.index("output_tok_s")] = f"error: {r['error']}"
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(BUILTIN_MODELS))
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory-gb", type=float, default=None)
    p.add_argument("--workload", default="fixed:512/256")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--systems", default="pipemax,transformers,roofline")
    p.add_argument("--hf-batch-sizes", default="64,256")
    p.add_argument("--pipemax-args", default="", help="extra flags for pipemax, one string")
    p.add_argument("--json", default=None)
    p.add_argument("--chart", default=None, help="write a PNG bar chart here")
    a = p.parse_args(argv)
    cfg = apply_overrides(BUILTIN_MODELS[a.model], a.override)
    results = []
    with tempfile.TemporaryDirectory(prefix="pipemax-bench-") as d:
        tmp = Path(d)
        req_file = str(tmp / "requests.jsonl")
        write(req_file, requests(a.workload, a.num_requests, cfg.vocab_size))
        names = a.systems.split(",")
        for k, name in enumerate(names):
            print(f"[bench] {k + 1}/{len(names)} {name} ...", file=sys.stderr, flush=True)
            if name in PIPEMAX_SYSTEMS:
                gpus, flags = PIPEMAX_SYSTEMS[name]
                r = run_pipemax(a, name, gpus or a.gpus, flags + a.pipemax_args.split(),
                                req_file, tmp)
                if "error" not in r:
                    r.update(derive(r))
            elif name == "transformers":
                r = run_transformers(a, name)
            elif name == "roofline":
                r = roofline(results)
            else:
                raise SystemExit(f"unknown system {name!r}; one of "
                                 f"{', '.join([*PIPEMAX_SYSTEMS, 'transformers', 'roofline'])}")
            r.update(model=a.model, workload=a.workload, num_requests=a.num_requests)
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    if a.chart:
        chart(results, a.chart, f"{a.model}, {a.workload}, {a.num_requests} requests")
    return 0


def chart(results: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed: no chart", file=sys.stderr)
        return
    ok = [r for r in results if "output_tok_s" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["system"] for r in ok], [r["output_tok_s"] for r in ok])
    ax.set_xlabel("output tokens/s")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
