"""Benchmark workloads: seeded request files with token-id prompts, EOS ignored.

    fixed:512/256   every request has 512 prompt tokens and 256 output tokens
    chat            log-normal prompt and output lengths, like chat logs (seeded)
    shared:P/U/O    every request a common P-token prefix, then U tokens of its own; O output
    fewshot[:K]     K (default 4) different prefixes of 500-1500 tokens (instructions and
                    examples), each request one of them (seeded) and a log-normal part of its
                    own (median 200) and output (median 150)
    SPEC+4x7900/100 SPEC's requests, with 4 more of 7900 / 100 spread evenly among them
                    (long outliers: they run streamed when the GPU cannot hold them)
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def lengths(spec: str, n: int, seed: int, max_len: int) -> list[tuple[int, int]]:
    """(prompt, output) tokens per request."""
    return [(p, o) for p, o, _, _ in layout(spec, n, seed, max_len)]


def layout(spec: str, n: int, seed: int, max_len: int) -> list[tuple[int, int, int, int]]:
    """(prompt, output, prefix id (-1: none), prefix tokens) per request: requests with the
    same prefix id begin with the same tokens."""
    spec, _, extra = spec.partition("+")
    out = _layout(spec, n, seed, max_len)
    if extra:
        try:
            k, size = extra.split("x")
            i, o = (int(x) for x in size.split("/"))
            k = int(k)
        except ValueError:
            raise ValueError(f"bad extra requests {extra!r}: COUNTxIN/OUT") from None
        for j in range(k):           # evenly spread: positions of the final list
            out.insert((j + 1) * (len(out) + 1) // (k + 1), (i, o, -1, 0))
    return out


def _layout(spec: str, n: int, seed: int, max_len: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    try:
        if spec.startswith("fixed:"):
            i, o = (int(x) for x in spec[len("fixed:"):].split("/"))
            return [(i, o, -1, 0)] * n
        if spec.startswith("shared:"):
            pre, own, o = (int(x) for x in spec[len("shared:"):].split("/"))
            return [(pre + own, o, 0, pre)] * n
        if spec == "fewshot" or spec.startswith("fewshot:"):
            k = int(spec.partition(":")[2] or 4)
            heads = np.linspace(500, 1500, k).astype(int) if k > 1 else np.array([1000])
            which = rng.integers(0, k, n)
            own = np.clip(rng.lognormal(np.log(200), 0.7, n), 8, max_len // 4).astype(int)
            outs = np.clip(rng.lognormal(np.log(150), 0.6, n), 8, max_len // 4).astype(int)
            return [(int(heads[w] + u), int(o), int(w), int(heads[w]))
                    for w, u, o in zip(which, own, outs)]
    except ValueError:
        pass
    else:
        if spec == "chat":
            # medians ~ 600 in / 250 out, long tails, clipped to the context
            ins = np.clip(rng.lognormal(np.log(600), 0.8, n), 16, max_len // 2).astype(int)
            outs = np.clip(rng.lognormal(np.log(250), 0.7, n), 8, max_len // 2).astype(int)
            return [(i, o, -1, 0) for i, o in zip(ins.tolist(), outs.tolist())]
    raise ValueError(f"unknown workload {spec!r}: fixed:IN/OUT, chat, shared:PREFIX/OWN/OUT or "
                     "fewshot[:K] (+COUNTxIN/OUT)")


def requests(spec: str, n: int, vocab_size: int, seed: int = 0, max_len: int = 4096) -> list[dict]:
    rng = np.random.default_rng(seed + 1)
    rows = []
    heads: dict[int, list[int]] = {}
    for k, (i, o, w, pre) in enumerate(layout(spec, n, seed, max_len)):
        if w >= 0 and w not in heads:
            heads[w] = rng.integers(10, vocab_size - 10, size=pre).tolist()
        ids = (heads[w] if w >= 0 else []) + rng.integers(10, vocab_size - 10,
                                                          size=i - pre).tolist()
        rows.append({"custom_id": f"b{k}", "method": "POST", "url": "/v1/completions",
                     "body": {"prompt": ids, "max_tokens": o, "temperature": 0,
                              "ignore_eos": True}})
    return rows


def write(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workload", default="fixed:512/256")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    a = p.parse_args()
    write(a.output, requests(a.workload, a.num_requests, a.vocab_size, a.seed))


if __name__ == "__main__":
    main()
