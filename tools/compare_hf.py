"""pipemax against transformers on one checkpoint, on any device and dtype.

    python -m tools.compare_hf --device cuda --dtype bfloat16 --gpus 1

Builds a random Llama checkpoint (or takes ``--model DIR``), runs greedy requests through the
pipemax CLI and through transformers ``generate`` (one prompt at a time, same device and
dtype), and reports the share of identical continuations and, for every prompt whose tokens
differ, where they first differ and transformers' gap between its top two logits there, also
in units in the last place of the dtype at the top logit's magnitude. In float32 every prompt
must match (exit 3 otherwise); in bfloat16 a difference is expected only where the top two
logits are within rounding of each other (``--tie-ulps`` units, default 4), else exit 3.

``--prompts text`` takes the prompts from English text through the model's tokenizer (for a
trained model), ``ids`` (the default) draws random token ids. Extra pipemax flags go in
``--pipemax-args`` (e.g. "--stage-devices 0,0,0" with ``--gpus 3``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_SHAPE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
                 "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
                 "num_attention_heads": 16, "num_key_value_heads": 4,
                 "max_position_embeddings": 4096, "rope_theta": 500000.0}


MANTISSA_BITS = {"bfloat16": 7, "float16": 10, "float32": 23}


def ulp(x: float, dtype: str = "bfloat16") -> float:
    """The spacing of ``dtype``'s numbers at the magnitude of ``x`` (one unit in the last place)."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - MANTISSA_BITS[dtype])


def top2(logits: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per row of ``logits`` [steps, vocab]: the top logit and its gap to the second."""
    t = logits.float().topk(2, dim=-1).values
    return t[:, 0].tolist(), (t[:, 0] - t[:, 1]).tolist()


def compare_rows(prompt_lens, got, ref, dtype: str = "bfloat16", tie_ulps: float = 4.0):
    """One row per prompt: equal or not and, at the first differing token, transformers' top-2
    gap there, in logits and in ``dtype`` units at the top logit (``near_tie``: within
    ``tie_ulps`` units). ``got``: pipemax's tokens per prompt; ``ref``: (tokens, top1, gaps)."""
    rows = []
    for i, (mine, (toks, top1, gaps)) in enumerate(zip(got, ref)):
        first = next((k for k, (x, y) in enumerate(zip(mine, toks)) if x != y), None)
        if first is None and len(mine) != len(toks):
            first = min(len(mine), len(toks))
        row = {"prompt": i, "len": prompt_lens[i], "equal": first is None}
        if first is not None:
            u = ulp(top1[first], dtype)
            row.update(first_diff=first, hf_gap=gaps[first], hf_top1=top1[first], ulp=u,
                       gap_ulps=gaps[first] / u, near_tie=gaps[first] <= tie_ulps * u)
        rows.append(row)
    return rows


def summarize(rows) -> dict:
    n = len(rows)
    diff = [r for r in rows if not r["equal"]]
    ties = sum(1 for r in diff if r["near_tie"])
    return {"prompts": n, "identical": n - len(diff), "identical_share": (n - len(diff)) / n,
            "differ_at_near_tie": ties, "differ_elsewhere": len(diff) - ties,
            "max_gap_ulps": max((r["gap_ulps"] for r in diff), default=None)}


def text_prompts(folder: str, n: int, rng) -> list[list[int]]:
    """Slices of English text through the model's tokenizer, 4 to 300 tokens long."""
    from transformers import AutoTokenizer
    from pipemax.tiny import CORPUS, DEFAULT_PROMPTS
    ids = AutoTokenizer.from_pretrained(folder)(" ".join([CORPUS, *DEFAULT_PROMPTS]))["input_ids"]
    out = []
    for length in rng.integers(4, min(300, len(ids)), size=n):
        start = int(rng.integers(0, len(ids) - length + 1))
        out.append(list(ids[start:start + int(length)]))
    return out


def make_prompts(kind: str, folder: str, n: int) -> list[list[int]]:
    """``n`` prompts, the same on every call: slices of English text (``kind`` "text") or
    random token ids of 4 to 300 tokens ("ids")."""
    rng = np.random.default_rng(0)
    if kind == "text":
        return text_prompts(folder, n, rng)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    return [rng.integers(10, vocab - 10, size=int(k)).tolist()
            for k in rng.integers(4, 300, size=n)]


def hf_reference(folder: str, prompts, max_new: int, device: str, dtype):
    """transformers' greedy continuation of each prompt, as a plain argmax loop over the model's
    forward with its KV cache: no logits processors (``generate`` with ``min_new_tokens`` sets
    EOS to -inf, so a trained model that would say EOS is made to say its second choice, while
    pipemax with ``ignore_eos`` takes the argmax and goes on)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            past, toks, logits = None, [], []
            for _ in range(max_new):
                o = model(input_ids=x, past_key_values=past, use_cache=True)
                past, last = o.past_key_values, o.logits[0, -1].float()
                logits.append(last)
                toks.append(int(last.argmax()))
                x = torch.tensor([[toks[-1]]], device=device)
            out.append((toks, *top2(torch.stack(logits))))                 # [steps, vocab]
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def pipemax_completions(folder: str, prompts: list[list[int]], *, device: str, dtype: str,
                        gpus: int, max_tokens: int, extra: list[str] = (),
                        logprobs: int | None = None) -> list[dict]:
    """pipemax's greedy completion choice of each prompt (token ids, and its logprobs with
    ``logprobs``), EOS ignored, through the command line; RuntimeError with its stderr if the
    run fails."""
    with tempfile.TemporaryDirectory(prefix="pipemax-run-") as d:
        req = Path(d) / "in.jsonl"
        with open(req, "w") as f:
            for i, ids in enumerate(prompts):
                body = {"custom_id": f"p{i}", "prompt": ids, "temperature": 0,
                        "max_tokens": max_tokens, "ignore_eos": True, "return_token_ids": True}
                if logprobs is not None:
                    body["logprobs"] = logprobs
                f.write(json.dumps(body) + "\n")
        out = Path(d) / "out.jsonl"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "pipemax.launch", "--device", device, "--dtype", dtype,
               "--gpus", str(gpus), "--model", folder, "--input", str(req), "--output",
               str(out), *extra]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        got = {}
        for line in out.read_text().split("\n")[:-1]:
            d_ = json.loads(line)
            got[d_["custom_id"]] = d_["response"]["body"]["choices"][0]
    return [got[f"p{i}"] for i in range(len(prompts))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder (default: build a random Llama)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--std", type=float, default=0.05, help="weight scale of the random model")
    p.add_argument("--prompts", choices=("ids", "text"), default="ids",
                   help="random token ids, or slices of English text (needs a tokenizer)")
    p.add_argument("--tie-ulps", type=float, default=4.0,
                   help="a first difference within this many units of the top-2 gap is a near-tie")
    p.add_argument("--json", default=None)
    p.add_argument("--pipemax-args", default="",
                   help="extra pipemax flags, one string (e.g. a small --max-num-batched-tokens "
                        "to split prompts into chunks)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory(prefix="pipemax-cmp-") as d:
        folder = a.model
        if folder is None:
            from pipemax.tiny import write_random_checkpoint
            folder = str(Path(d) / "model")
            write_random_checkpoint(folder, DEFAULT_SHAPE, seed=0, shards=2, dtype=a.dtype,
                                    std=a.std)
        prompts = make_prompts(a.prompts, folder, a.num_prompts)
        try:
            choices = pipemax_completions(folder, prompts, device=a.device, dtype=a.dtype,
                                          gpus=a.gpus, max_tokens=a.max_tokens,
                                          extra=a.pipemax_args.split())
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        got = {f"p{i}": c["token_ids"] for i, c in enumerate(choices)}
        ref = hf_reference(folder, prompts, a.max_tokens, a.device, dtype)
    rows = compare_rows([len(x) for x in prompts], [got[f"p{i}"] for i in range(len(prompts))],
                        ref, a.dtype, a.tie_ulps)
    summ = summarize(rows)
    print(f"compare_hf: device {a.device} dtype {a.dtype} gpus {a.gpus} {a.pipemax_args}: "
          f"{summ['prompts']} prompts x {a.max_tokens} tokens; {summ['identical']} identical "
          f"({100 * summ['identical_share']:.1f}%), {summ['differ_at_near_tie']} differ first at "
          f"a near-tie (top-2 gap <= {a.tie_ulps:g} {a.dtype} ulp), {summ['differ_elsewhere']} "
          "differ elsewhere")
    for r in rows:
        if not r["equal"]:
            print(f"  prompt {r['prompt']} (len {r['len']}): first differs at token "
                  f"{r['first_diff']}, transformers' top-2 gap {r['hf_gap']:.4f} at logit "
                  f"{r['hf_top1']:.3f} = {r['gap_ulps']:.2f} ulp (ulp {r['ulp']:.4g})")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "summary": summ, "rows": rows},
                                           indent=1) + "\n")
    strict = a.dtype == "float32"
    return 3 if summ["differ_elsewhere"] or (strict and summ["identical"] < summ["prompts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
