"""One workload through several systems, side by side, on one machine, in one invocation.

    python -m tools.bench --model llama3-8b --device cuda --gpus 1 \
        --workload fixed:512/256 --num-requests 256 --systems pipemax,transformers

Each system runs in a fresh process (so each starts with an empty GPU). Prints a table and
writes the figures as JSON (``--json``).

Systems:
    pipemax        pipemax with --gpus G and the flags after ``--pipemax-args``
    transformers   HuggingFace ``generate`` at each of ``--hf-batch-sizes`` (best one counts)
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


def run_pipemax(a, name: str, gpus: int, extra: list[str], req_file: str, tmp: Path) -> dict:
    out = tmp / f"{name}.out.jsonl"
    stats = tmp / f"{name}.stats.json"
    cmd = [sys.executable, "-m", "pipemax.launch", "--device", a.device, "--gpus", str(gpus),
           "--load-format", "dummy", "--model", a.model, "--input", req_file, "--output",
           str(out), "--stats-json", str(stats), *sum((["--override", o] for o in a.override),
                                                      []), *extra]
    if a.gpu_memory_gb:
        cmd += ["--gpu-memory-gb", str(a.gpu_memory_gb)]
    print(f"[bench] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if p.returncode != 0:
        return {"system": name, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    s = json.loads(stats.read_text())
    s.update(system=name, gpus=gpus, wall_seconds=time.monotonic() - t0)
    return s


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
    cols = ["system", "gpus", "output_tok_s", "total_tok_s", "requests_s", "seconds",
            "peak_gpu_gb", "batch"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, float):
                v = f"{v:.1f}"
            elif isinstance(v, list):
                v = ",".join(f"{x:.1f}" for x in v)
            cells.append(str(v))
        if "error" in r:
            cells[2] = f"error: {r['error']}"
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
    p.add_argument("--systems", default="pipemax,transformers")
    p.add_argument("--hf-batch-sizes", default="64,256")
    p.add_argument("--pipemax-args", default="", help="extra flags for pipemax, one string")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cfg = apply_overrides(BUILTIN_MODELS[a.model], a.override)
    results = []
    with tempfile.TemporaryDirectory(prefix="pipemax-bench-") as d:
        tmp = Path(d)
        req_file = str(tmp / "requests.jsonl")
        write(req_file, requests(a.workload, a.num_requests, cfg.vocab_size))
        for name in a.systems.split(","):
            if name == "pipemax":
                r = run_pipemax(a, name, a.gpus, a.pipemax_args.split(), req_file, tmp)
            elif name == "transformers":
                r = run_transformers(a, name)
            else:
                raise SystemExit(f"unknown system {name!r}")
            r.update(model=a.model, workload=a.workload, num_requests=a.num_requests)
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
