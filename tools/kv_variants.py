"""How far ways of rounding the KV cache move greedy continuations.

    python -m tools.kv_variants --model DIR --num-prompts 64 --max-tokens 40 --first 32 \
        --variants bf16,fp8,fp8-ks,fp8-ks-vs [--device cuda --dtype bfloat16]

Runs the stage model (all layers, float32 on the CPU by default) in this process over the same text
prompts as ``tools/compare_kv.py``: a first step of prompts (up to ``--first-step`` tokens,
as the engine's first micro-batch), the other prompts, then greedy decode steps of all of
them. Each variant rounds every K and V the attention writes (the step's own included) as its
cache would hold them, and the cache keeps the rounded values in the model's dtype, so every
attention path reads what the variant's cache would give back (exactly in float32; in
bfloat16 too for e4m3 with power-of-two scales):

- ``f32``: unrounded (the reference every variant is compared against: the model's dtype);
- ``bf16``: rounded to bfloat16 (the noise floor of a 16-bit cache, for a float32 model);
- ``fp8``: e4m3 with the power-of-two scale per (layer, K|V, KV head) of stages/kv_quant.py,
  fixed from the first step;
- suffixes: ``-ks``: K smoothed (the first step's per-(layer, head, channel) mean subtracted
  before quantizing and never added back: softmax does not see a shift common to a query's
  scores); ``-vs``: V smoothed (its mean added back after the rounding, as to the attention
  output); ``-tok``: one exact scale per (token, head) (amax / 448) instead of the per-head one;
  ``-k16`` / ``-v16``: K / V left in bfloat16 (which of the two costs the tokens);
- ``int8``: for comparison, symmetric int8 with one exact scale per (token, head) (stored
  beside the bytes); ``int8-chan``: one fixed scale per (layer, K|V, head, channel) from the
  first step's maximum with 1.5x headroom (nothing stored per token); ``-vfp8``: V in e4m3
  as ``fp8`` (K alone in int8).

Prints one line per variant: continuations identical to the reference over the first ``--first``
tokens, and the chosen-token logprob |diff| (mean, max) while the tokens agree.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

FP8 = torch.float8_e4m3fn


def e4m3(y: torch.Tensor) -> torch.Tensor:
    return y.clamp(-448.0, 448.0).to(FP8).to(torch.float32)


class Rounding:
    """One variant: rounds a layer's k, v [n, KVH, D] as its cache would hold them; each layer's
    means and scales are fixed by its first call (the first step)."""

    def __init__(self, name: str):
        parts = name.split("-")
        self.name, self.base, self.flags = name, parts[0], set(parts[1:])
        assert self.base in ("f32", "bf16", "fp8", "int8"), name
        self.cal: dict[int, tuple] = {}

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.base == "f32":
            return k, v
        if self.base == "bf16":
            return k.bfloat16().to(k.dtype), v.bfloat16().to(v.dtype)
        from pipemax.stages.kv_quant import prompt_scale
        k32, v32 = k.float(), v.float()
        if layer not in self.cal:
            mk = k32.mean(0) if "ks" in self.flags else torch.zeros_like(k32[0])
            mv = v32.mean(0) if "vs" in self.flags else torch.zeros_like(v32[0])
            if self.base == "int8" and "chan" in self.flags:
                sk = ((k32 - mk).abs().amax(dim=0) * 1.5 / 127).clamp(min=2.0 ** -30)
                sv = ((v32 - mv).abs().amax(dim=0) * 1.5 / 127).clamp(min=2.0 ** -30)
            else:
                sk = prompt_scale((k32 - mk).abs().amax(dim=(0, 2)))[:, None]
                sv = prompt_scale((v32 - mv).abs().amax(dim=(0, 2)))[:, None]
            if "vfp8" in self.flags:
                sv = prompt_scale((v32 - mv).abs().amax(dim=(0, 2)))[:, None]
            self.cal[layer] = (mk, mv, sk, sv)
        mk, mv, sk, sv = self.cal[layer]
        ko = self._round(k32 - mk, sk, "k16" in self.flags)
        vo = (e4m3((v32 - mv) / sv) * sv if "vfp8" in self.flags
              else self._round(v32 - mv, sv, "v16" in self.flags)) + mv
        return ko.to(k.dtype), vo.to(v.dtype)

    def _round(self, x: torch.Tensor, s: torch.Tensor, keep16: bool) -> torch.Tensor:
        if keep16:
            return x.bfloat16().float()
        if self.base == "int8":
            if "chan" in self.flags:       # a fixed scale per (head, channel), 1.5x headroom
                t = s
            else:                          # symmetric, one exact scale per (token, head)
                t = (x.abs().amax(dim=2, keepdim=True) / 127.0).clamp(min=2.0 ** -30)
            return torch.round(x / t).clamp(-127, 127) * t
        if "tok" in self.flags:
            t = (x.abs().amax(dim=2, keepdim=True) / 448.0).clamp(min=2.0 ** -30)
            return e4m3(x / t) * t
        return e4m3(x / s) * s


def generate(model, cfg, prompts, max_new: int, first_step: int, rounding: Rounding,
             block_size: int = 16):
    """Greedy continuations [(token ids, their logprobs)] with ``rounding`` on every k/v."""
    from pipemax.stages import model as model_mod
    from pipemax.stages.attention import build_layout, paged_attention
    n = len(prompts)
    width = max(-(-(len(p) + max_new) // block_size) for p in prompts)
    table = np.arange(n * width, dtype=np.int64).reshape(n, width)
    dev = model.inv_freq.device
    kv = torch.zeros(n * width, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim,
                     dtype=model.lm_head.weight.dtype, device=dev)

    def attn(q, k, v, kv, layer, lay, scale, quant=None):
        k, v = rounding(layer, k, v)
        return paged_attention(q, k, v, kv, layer, lay, scale, None)

    groups, cur, size = [], [], 0          # prompt steps: whole prompts, first-step tokens each
    for i, p in enumerate(prompts):
        if cur and size + len(p) > first_step:
            groups.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += len(p)
    groups.append(cur)
    toks = [[] for _ in range(n)]
    lps = [[] for _ in range(n)]

    def take(rows, logits):
        lp = torch.log_softmax(logits.float(), dim=-1)
        ch = lp.argmax(dim=-1)
        for r, c, l in zip(rows, ch.tolist(), lp.gather(1, ch[:, None])[:, 0].tolist()):
            toks[r].append(c)
            lps[r].append(l)

    saved = model_mod.paged_attention
    model_mod.paged_attention = attn
    try:
        with torch.inference_mode():
            for rows in groups:
                ql = np.array([len(prompts[r]) for r in rows])
                lay = build_layout(ql, ql, table[rows], block_size, dev, decode_kernel=False)
                x = torch.tensor([t for r in rows for t in prompts[r]], dtype=torch.long,
                                 device=dev)
                take(rows, model.logits(model(x, lay, kv)))
            rows = list(range(n))
            for step in range(1, max_new):
                ctx = np.array([len(prompts[r]) + step for r in rows])
                lay = build_layout(np.ones(n, dtype=np.int64), ctx, table, block_size, dev,
                                   decode_kernel=False)
                x = torch.tensor([toks[r][-1] for r in rows], dtype=torch.long, device=dev)
                take(rows, model.logits(model(x, lay, kv)))
    finally:
        model_mod.paged_attention = saved
    return list(zip(toks, lps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder with a tokenizer")
    p.add_argument("--dtype", default="float32",
                   help="the model's (and the reference cache's) dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--first", type=int, default=32)
    p.add_argument("--first-step", type=int, default=2048,
                   help="tokens of the first step (the one that fixes scales and means)")
    p.add_argument("--variants", default="bf16,fp8,fp8-ks,fp8-ks-vs")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--reference", default=None,
                   help="a file keeping the f32 reference (read when there, else written)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from pipemax.model_config import ModelConfig
    from pipemax.stages.loader import build_stage_model
    from tools.compare_hf import text_prompts
    from tools.compare_kv import compare
    cfg = ModelConfig.from_dir(a.model)
    model = build_stage_model(cfg, 0, cfg.num_layers, True, True, folder=Path(a.model),
                              dtype=getattr(torch, a.dtype), device=torch.device(a.device))
    prompts = text_prompts(a.model, a.num_prompts, np.random.default_rng(0))
    t0 = time.time()
    ref = Path(a.reference) if a.reference else None
    if ref is not None and ref.is_file():
        base = [tuple(x) for x in json.loads(ref.read_text())]
    else:
        base = generate(model, cfg, prompts, a.max_tokens, a.first_step, Rounding("f32"))
        if ref is not None:
            ref.write_text(json.dumps(base))
    print(f"kv_variants: {a.num_prompts} prompts x {a.max_tokens} tokens, {a.dtype} model on "
          f"{a.device}, reference ({a.dtype} KV) in {time.time() - t0:.0f} s", flush=True)
    rows = {}
    for name in a.variants.split(","):
        t0 = time.time()
        s = compare(base, generate(model, cfg, prompts, a.max_tokens, a.first_step,
                                   Rounding(name)), a.first)
        rows[name] = s
        print(f"  {name:12s} identical over {a.first}: {s['identical_first']:3d}/{s['prompts']} "
              f"({100 * s['identical_share']:5.1f}%)  logprob |diff| mean "
              f"{s['logprob_mean_abs_diff']:.4f} max {s['logprob_max_abs_diff']:.3f} over "
              f"{s['positions_compared']} positions  ({time.time() - t0:.0f} s)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "variants": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
