"""One model, two KV cache dtypes: how far an fp8 KV cache moves greedy continuations.

    python -m tools.compare_kv --model DIR --device cuda --dtype bfloat16 \
        --num-prompts 128 --max-tokens 64 --first 32

Runs the same greedy requests (slices of English text through the model's tokenizer, as
``tools/compare_hf.py --prompts text``) through pipemax twice, with ``--kv-cache-dtype auto``
(the model's dtype) and with ``--kv-cache-dtype fp8``, and reports:

- the share of continuations identical over their first ``--first`` tokens;
- the mean and max absolute difference of the chosen tokens' logprobs, over the positions
  where both runs chose the same tokens so far (the same context: after a first difference the
  two continuations are different texts).

Prints one ``compare_kv:`` line and the figures as JSON (``--json``); exit 3 when the share is
under ``--min-identical`` or the mean difference over ``--max-mean-diff``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def compare(base: list[tuple[list[int], list[float]]], other: list[tuple[list[int], list[float]]],
            first: int) -> dict:
    """base, other: per prompt (token ids, their logprobs). The identical share over the first
    ``first`` tokens, and the logprob differences while the tokens agree."""
    same, diffs = 0, []
    for (ta, la), (tb, lb) in zip(base, other):
        same += ta[:first] == tb[:first]
        for x, y, lx, ly in zip(ta, tb, la, lb):
            if x != y:
                break
            diffs.append(abs(lx - ly))
    n = len(base)
    return {"prompts": n, "identical_first": same, "identical_share": same / n if n else 0.0,
            "first": first, "positions_compared": len(diffs),
            "logprob_mean_abs_diff": float(np.mean(diffs)) if diffs else None,
            "logprob_max_abs_diff": float(np.max(diffs)) if diffs else None}


def run(a, folder: str, prompts, kv_dtype: str, tmp: Path) -> list[tuple[list[int], list[float]]]:
    req, out = tmp / "in.jsonl", tmp / f"out-{kv_dtype}.jsonl"
    with open(req, "w") as f:
        for i, ids in enumerate(prompts):
            f.write(json.dumps({"custom_id": f"p{i}", "prompt": ids, "temperature": 0,
                                "max_tokens": a.max_tokens, "ignore_eos": True, "logprobs": 0,
                                "return_token_ids": True}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "pipemax.launch", "--device", a.device, "--dtype", a.dtype,
           "--gpus", str(a.gpus), "--model", folder, "--input", str(req), "--output", str(out),
           "--kv-cache-dtype", kv_dtype, *a.pipemax_args.split()]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"pipemax --kv-cache-dtype {kv_dtype} failed:\n{r.stderr[-2000:]}")
    got = {}
    for line in out.read_text().split("\n")[:-1]:
        d = json.loads(line)
        ch = d["response"]["body"]["choices"][0]
        got[d["custom_id"]] = (ch["token_ids"], ch["logprobs"]["token_logprobs"])
    return [got[f"p{i}"] for i in range(len(prompts))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder with a tokenizer")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--first", type=int, default=32, help="identical over this many tokens")
    p.add_argument("--min-identical", type=float, default=0.0)
    p.add_argument("--max-mean-diff", type=float, default=float("inf"))
    p.add_argument("--pipemax-args", default="", help="extra pipemax flags for both runs")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from tools.compare_hf import text_prompts
    prompts = text_prompts(a.model, a.num_prompts, np.random.default_rng(0))
    with tempfile.TemporaryDirectory(prefix="pipemax-kv-") as d:
        base = run(a, a.model, prompts, "auto", Path(d))
        fp8 = run(a, a.model, prompts, "fp8", Path(d))
    s = compare(base, fp8, a.first)
    mean, worst = s["logprob_mean_abs_diff"], s["logprob_max_abs_diff"]
    print(f"compare_kv: {a.dtype} on {a.device}, {a.gpus} stage(s) {a.pipemax_args}: "
          f"{s['prompts']} prompts x {a.max_tokens} tokens; fp8 KV against {a.dtype} KV: "
          f"{s['identical_first']} identical over the first {a.first} tokens "
          f"({100 * s['identical_share']:.1f}%); chosen-token logprob |diff| mean "
          f"{mean if mean is None else f'{mean:.4f}'}, max "
          f"{worst if worst is None else f'{worst:.4f}'} over {s['positions_compared']} "
          "positions with the same context")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "summary": s}, indent=1) + "\n")
    bad = s["identical_share"] < a.min_identical or (mean is not None and mean > a.max_mean_diff)
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
