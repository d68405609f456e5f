"""The planner's choice and prediction for a model on N GPUs, without any GPU.

    python -m tools.plan --model llama3-70b --gpus 8 --gpu-memory-gb 48 \
        --figures hbm_gbs=4300,h2d_gbs=46,tflops=780 --prompt 1024 --output 1024
    python -m tools.plan --model llama3-8b --gpus 1 --gpu-memory-gb 141 --prompt 1152 \
        --output 128 --cached-prompt 1024          # a 1024-token prefix every request shares
    python -m tools.plan --model llama3-8b --gpus 1 --gpu-memory-gb 24 --kv-cache-dtype fp8

Stage memory is estimated from the weights (each stage's layers, the embedding on the first,
the lm_head on the last) and a fixed activation reserve; the run itself measures it. With
``--quantization fp8`` the layers' linear weights count 1 byte each (the embedding, norms
and lm_head stay in the 16-bit dtype); ``--figures`` then gives the fp8 GEMM rates.
"""
from __future__ import annotations

import argparse
import json

from pipemax.model_config import BUILTIN_MODELS, apply_overrides
from pipemax.partition import split_layers
from pipemax.planner import DeviceFigures, StageShape, Workload, plan

GiB = 1 << 30


def shapes(cfg, gpus: int, gpu_gb: float, esize: int, block_size: int,
           reserve_gb: float, kv_esize: int | None = None,
           quantization: str = "none") -> list[StageShape]:
    out = []
    for i, (a, b) in enumerate(split_layers(cfg, gpus)):
        params = StageShape.params_read(cfg, b - a, i == gpus - 1)
        read = params * esize
        if quantization == "fp8":          # linear weights: 1 byte instead of esize
            read -= (b - a) * cfg.layer_linear_params() * (esize - 1)
        weights = read + (cfg.embed_params() * esize if i == 0 else 0)
        block = (b - a) * 2 * block_size * cfg.kv_size * (kv_esize or esize)
        free = gpu_gb * GiB - weights - reserve_gb * GiB
        out.append(StageShape(b - a, params, block, max(0, int(free // block)), read))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(BUILTIN_MODELS))
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=48)
    p.add_argument("--reserve-gb", type=float, default=2.0, help="activations, CUDA context")
    p.add_argument("--figures", default="hbm_gbs=4300,h2d_gbs=46,tflops=780",
                   help="device figures (decode_tflops: the GEMM rate at a decode batch; "
                        "default tflops)")
    p.add_argument("--quantization", choices=("none", "fp8"), default="none",
                   help="fp8: linear weights of 1 byte")
    p.add_argument("--prompt", type=float, default=1024)
    p.add_argument("--output", type=float, default=1024)
    p.add_argument("--cached-prompt", type=float, default=0,
                   help="mean prompt tokens per request from the prefix cache")
    p.add_argument("--prefixes", type=int, default=1,
                   help="distinct shared prefixes (of --cached-prompt tokens) the cache holds")
    p.add_argument("--micro-batches", type=int, default=None, help="default: gpus + 1")
    p.add_argument("--max-seqs", type=int, default=4096)
    p.add_argument("--host-gb", type=float, default=400)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="auto: 16-bit KV, like the weights; fp8: one byte per K/V element")
    a = p.parse_args(argv)
    kv_esize = 1 if a.kv_cache_dtype == "fp8" else 2
    cfg = apply_overrides(BUILTIN_MODELS[a.model], a.override)
    figs = DeviceFigures(**{k: float(v) for k, v in
                            (item.split("=") for item in a.figures.split(","))})
    st = shapes(cfg, a.gpus, a.gpu_memory_gb, 2, a.block_size, a.reserve_gb, kv_esize,
                a.quantization)
    if not 0 <= a.cached_prompt < a.prompt:
        p.error("--cached-prompt must be at least 0 and less than --prompt")
    wl = Workload(a.prompt, a.output, int(a.prompt + a.output), cached_prompt=a.cached_prompt,
                  cached_blocks=a.prefixes * int(-(-a.cached_prompt // a.block_size)))
    host_blocks = int(a.host_gb * GiB // sum(s.block_bytes for s in st))
    M = a.micro_batches or a.gpus + 1
    rows = {}
    for mode in ("off", "swap", "on", "auto"):
        try:
            pl = plan(cfg, st, figs, 2, wl, mode=mode, micro_batches=M, max_seqs=a.max_seqs,
                      block_size=a.block_size, host_blocks=host_blocks, kv_esize=kv_esize)
            rows[mode] = json.loads(pl.to_json())
            print(f"{mode:>4}: {pl.describe()}")
        except ValueError as e:
            rows[mode] = {"error": str(e)}
            print(f"{mode:>4}: {e}")
    print(json.dumps({"model": a.model, "gpus": a.gpus, "gpu_memory_gb": a.gpu_memory_gb,
                      "kv_cache_dtype": a.kv_cache_dtype,
                      "kv_bytes_per_token": sum(s.block_bytes for s in st) // a.block_size,
                      "quantization": a.quantization,
                      "figures": figs.as_dict(), "plans": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
