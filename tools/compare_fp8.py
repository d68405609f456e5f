"""pipemax with fp8 weights against the same model in its 16-bit dtype, greedy, on any device.

    python -m tools.compare_fp8 --model DIR --device cuda --num-prompts 64 --max-tokens 64

Runs the same greedy requests twice through the command line (``--quantization none`` and
``fp8``, both with ``--dtype``) and reports the share of identical continuations and, over
the tokens both runs chose from the same context (up to where they first differ), the mean
and largest difference of the chosen token's logprob; at each first difference, the 16-bit
run's gap between its top two logprobs there (small: a near-tie that rounding tipped).
Prompts as in tools/compare_hf.py (``--prompts text``: slices of English text).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from tools.compare_hf import make_prompts, pipemax_completions


def compare(ref: list[dict], got: list[dict]) -> dict:
    """Identical share, chosen-token logprob differences over the common prefix of each pair
    of continuations, and the reference's top-2 gap at each first difference."""
    diffs, gaps, same = [], [], 0
    for r, g in zip(ref, got):
        a, b = r["token_ids"], g["token_ids"]
        first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        same += first is None
        upto = len(a) if first is None else first
        la, lb = r["logprobs"]["token_logprobs"], g["logprobs"]["token_logprobs"]
        diffs += [abs(la[k] - lb[k]) for k in range(upto)]
        if first is not None and first < len(a):
            top = sorted(r["logprobs"]["top_logprobs"][first].values(), reverse=True)
            if len(top) >= 2:
                gaps.append(top[0] - top[1])
    n = len(ref)
    return {"prompts": n, "identical": same, "identical_share": same / n if n else 0.0,
            "tokens_compared": len(diffs),
            "logprob_diff_mean": float(np.mean(diffs)) if diffs else None,
            "logprob_diff_max": float(np.max(diffs)) if diffs else None,
            "gap_at_first_diff_median": float(np.median(gaps)) if gaps else None,
            "gap_at_first_diff_max": float(np.max(gaps)) if gaps else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts", choices=("ids", "text"), default="text")
    p.add_argument("--pipemax-args", default="", help="extra pipemax flags, one string")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    prompts = make_prompts(a.prompts, a.model, a.num_prompts)
    runs = {}
    for q in ("none", "fp8"):
        try:
            runs[q] = pipemax_completions(a.model, prompts, device=a.device, dtype=a.dtype,
                                          gpus=a.gpus, max_tokens=a.max_tokens, logprobs=2,
                                          extra=["--quantization", q, *a.pipemax_args.split()])
        except RuntimeError as e:
            print(f"compare_fp8: the --quantization {q} run failed:\n{e}", file=sys.stderr)
            return 1
    s = compare(runs["none"], runs["fp8"])
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    print(f"compare_fp8: device {a.device} dtype {a.dtype} gpus {a.gpus}: {s['prompts']} "
          f"prompts x {a.max_tokens} tokens, fp8 weights against {a.dtype}: {s['identical']} "
          f"identical ({100 * s['identical_share']:.1f}%); chosen-token logprob difference "
          f"over {s['tokens_compared']} tokens of common context: mean "
          f"{fmt(s['logprob_diff_mean'])}, max {fmt(s['logprob_diff_max'])}; {a.dtype} top-2 "
          f"gap at the first differences: median {fmt(s['gap_at_first_diff_median'])}, max "
          f"{fmt(s['gap_at_first_diff_max'])}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "summary": s}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
