"""Time one stage's decode step in-process (no rings), and show where the time goes.

    python -m tools.profile_step --model llama3-8b --batch 128 --context 640

Builds the whole model as one stage with dummy weights, fills the KV cache's block tables for
``--batch`` sequences of ``--context`` tokens, and times decode steps with CUDA events: the
layout build (host), the forward, and the forward + sampling. With ``--profile`` prints the
top kernels of one step from the torch profiler. Prints the roofline time of the step from
the cost model for comparison. ``--graphs`` replays the step from a CUDA graph as the stages
do (stages/decode_graph.py).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pipemax.model_config import BUILTIN_MODELS, apply_overrides
from pipemax.stages import triton_decode
from pipemax.stages.attention import build_layout
from pipemax.stages.decode_graph import DecodeGraphs
from pipemax.stages.kv_cache import KVCache
from pipemax.stages.loader import build_stage_model
from pipemax.stages.sampler import sample


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", choices=sorted(BUILTIN_MODELS))
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--context", type=int, default=640)
    p.add_argument("--uneven", action="store_true", help="contexts spread over [c/2, c]")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--graphs", action="store_true", help="replay decode from a CUDA graph")
    p.add_argument("--prompts", type=int, default=0,
                   help="add this many prompt chunks to the step (a mixed step, run eagerly)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--continued", action="store_true",
                   help="the chunks continue prompts (as much context before them as in them)")
    p.add_argument("--hbm-gbs", type=float, default=3350.0, help="for the roofline (H100)")
    p.add_argument("--tflops", type=float, default=790.0)
    a = p.parse_args(argv)
    cfg = apply_overrides(BUILTIN_MODELS[a.model], a.override)
    dev = torch.device("cuda")
    dtype = getattr(torch, a.dtype)
    model = build_stage_model(cfg, 0, cfg.num_layers, True, True, folder=None, dtype=dtype,
                              device=dev)
    B, C, bs, P, L = a.batch, a.context, a.block_size, a.prompts, a.prompt_len
    pctx = L * (2 if a.continued else 1)
    per_seq = -(-max(C, pctx) // bs)
    rows = B + P
    kv = KVCache(cfg, cfg.num_layers, rows * per_seq + 1, bs, dtype, dev)   # + a scratch block
    graphs = (DecodeGraphs(model, kv.data, rows * per_seq, bs, per_seq, dtype, dev,
                           capture=True, decode_kernel=triton_decode.available(dev))
              if a.graphs and P == 0 else None)
    bt = np.arange(rows * per_seq, dtype=np.int32).reshape(rows, per_seq)
    rng = np.random.default_rng(0)
    ctx = (rng.integers(C // 2, C + 1, size=B) if a.uneven else np.full(B, C)).astype(np.int32)
    ctx = np.concatenate([ctx, np.full(P, pctx, np.int32)])
    q = np.concatenate([np.ones(B, np.int32), np.full(P, L, np.int32)])
    toks = torch.randint(0, cfg.vocab_size, (int(q.sum()),), device=dev)
    ones = torch.ones(rows, device=dev)
    zeros_k = torch.zeros(rows, dtype=torch.int64, device=dev)

    def step():
        if graphs is not None:
            h = graphs.run(toks, ctx, bt)
        else:
            h = model(toks, build_layout(q, ctx, bt, bs, dev), kv.data)
        so = sample(model.logits(h), 0 * ones, ones, zeros_k, 0 * ones, 0)
        return so.token_ids

    with torch.inference_mode():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            build_layout(q, ctx, bt, bs, dev)
        torch.cuda.synchronize()
        layout_ms = (time.perf_counter() - t0) / a.iters * 1e3
        t0 = time.perf_counter()
        for _ in range(a.iters):
            step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / a.iters * 1e3
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
    esize = torch.empty(0, dtype=dtype).element_size()
    w_bytes = (cfg.num_layers * cfg.layer_params() + cfg.head_params()) * esize
    kv_bytes = int(ctx.sum()) * cfg.num_layers * 2 * cfg.kv_size * esize
    flops = 2 * (int(q.sum()) * cfg.num_layers * cfg.layer_params() + rows * cfg.head_params())
    roof_ms = (max(w_bytes / (a.hbm_gbs * 1e9), flops / (a.tflops * 1e12))
               + kv_bytes / (a.hbm_gbs * 1e9)) * 1e3
    res = {"model": a.model, "batch": B, "context": C, "uneven": a.uneven,
           "graphs": graphs is not None, "prompts": P, "prompt_len": L, "continued": a.continued,
           "layout_ms": round(layout_ms, 3), "step_ms": round(step_ms, 3),
           "roofline_ms": round(roof_ms, 3), "of_roofline": round(roof_ms / step_ms, 3),
           "tok_s": round(rows / step_ms * 1e3, 1)}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
