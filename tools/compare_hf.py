"""pipemax against transformers on one checkpoint, on any device and dtype.

    python -m tools.compare_hf --device cuda --dtype bfloat16 --gpus 1

Builds a random Llama checkpoint (or takes ``--model DIR``), runs greedy requests through the
pipemax CLI and through transformers ``generate`` (one prompt at a time, same device and
dtype), and reports, per prompt, whether the tokens are equal and, where they first differ,
transformers' gap between its top two logits there. In float32 every prompt must match; in
bfloat16 a difference is expected only where the top two logits are within bfloat16 rounding
of each other (a gap under a few units in the last place of the logit), and it is reported.
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


def bf16_ulp(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - 7)


def hf_reference(folder: str, prompts, max_new: int, device: str, dtype):
    from transformers import AutoModelForCausalLM, GenerationConfig
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                          eos_token_id=None, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            g = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)
            toks = g.sequences[0, len(ids):].tolist()
            scores = torch.stack(g.scores)[:, 0].float()          # [steps, vocab]
            top2 = scores.topk(2, dim=-1).values
            out.append((toks, top2[:, 0].tolist(), (top2[:, 0] - top2[:, 1]).tolist()))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


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
        vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
        rng = np.random.default_rng(0)
        prompts = [rng.integers(10, vocab - 10, size=int(n)).tolist()
                   for n in rng.integers(4, 300, size=a.num_prompts)]
        req = Path(d) / "in.jsonl"
        with open(req, "w") as f:
            for i, ids in enumerate(prompts):
                f.write(json.dumps({"custom_id": f"p{i}", "prompt": ids, "temperature": 0,
                                    "max_tokens": a.max_tokens, "ignore_eos": True,
                                    "return_token_ids": True}) + "\n")
        out = Path(d) / "out.jsonl"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "pipemax.launch", "--device", a.device, "--dtype", a.dtype,
               "--gpus", str(a.gpus), "--model", folder, "--input", str(req), "--output",
               str(out), *a.pipemax_args.split()]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        got = {}
        for line in out.read_text().split("\n")[:-1]:
            d_ = json.loads(line)
            got[d_["custom_id"]] = d_["response"]["body"]["choices"][0]["token_ids"]
        ref = hf_reference(folder, prompts, a.max_tokens, a.device, dtype)
    rows = []
    for i, (toks, top1, gaps) in enumerate(ref):
        mine = got[f"p{i}"]
        first = next((k for k, (x, y) in enumerate(zip(mine, toks)) if x != y), None)
        row = {"prompt": i, "len": len(prompts[i]), "equal": first is None}
        if first is not None:
            row.update(first_diff=first, hf_gap=gaps[first], ulp=bf16_ulp(top1[first]),
                       near_tie=gaps[first] <= 4 * bf16_ulp(top1[first]))
        rows.append(row)
    n_eq = sum(r["equal"] for r in rows)
    n_tie = sum(1 for r in rows if not r["equal"] and r["near_tie"])
    n_bad = len(rows) - n_eq - n_tie
    print(f"compare_hf: device {a.device} dtype {a.dtype} gpus {a.gpus}: {len(rows)} prompts x "
          f"{a.max_tokens} tokens; {n_eq} identical, {n_tie} differ first at a near-tie "
          f"(top-2 gap <= 4 bf16 ulp), {n_bad} differ elsewhere")
    for r in rows:
        if not r["equal"]:
            print(f"  prompt {r['prompt']} (len {r['len']}): first differs at token "
                  f"{r['first_diff']}, transformers' top-2 gap {r['hf_gap']:.4f} "
                  f"(ulp {r['ulp']:.4f})")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if n_bad == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
