"""A stage measures its own device once at start: HBM bandwidth, pinned H2D, GEMM rates.

The GEMM rates are those of the model that runs, not of a square matmul: the stage times its
own first layer's four GEMMs (q/k/v, o, gate/up, down, in the weights' own dtype: fp8 with
the activation quantization when quantized) on inputs of a prompt chunk's tokens
(``tflops``) and of a typical decode batch (``decode_tflops``; replayed from a CUDA graph
when the decode steps are, so it leaves out launch costs those steps do not pay). So a run's
measured over predicted says how far it is from what this GPU does at this model. These feed
the planner (pipemax/planner.py). About a second on a GPU; on the CPU the planner uses
nominal figures instead (``gemm_tflops`` also runs on the CPU, timed by the host clock).
"""
from __future__ import annotations

import time

import torch

DECODE_BATCH = 256     # the decode batch the GEMMs are timed at (at most the step's sequences)


def _time(fn, iters: int = 5, device: torch.device | None = None) -> float:
    """Seconds per call of ``fn`` (after one warm-up call): CUDA events on a GPU, else the
    host clock."""
    fn()
    if device is not None and device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def gemm_flops(linears, tokens: int) -> int:
    """Floating-point operations of ``tokens`` rows through each linear layer."""
    return sum(2 * tokens * m.in_features * m.out_features for m in linears)


def _graphed(fn, device: torch.device):
    """``fn`` captured in a CUDA graph (after two warm-up calls on a side stream): its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def gemm_tflops(linears, tokens: int, dtype: torch.dtype, device: torch.device,
                iters: int = 10, graph: bool = False) -> float:
    """TFLOP/s of ``tokens`` rows through the linear layers one after another, as a step runs
    them (their weights, their dtype, their activation quantization); ``graph``: replayed from
    a CUDA graph (on CUDA), as decode steps are."""
    gen = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(tokens, m.in_features, generator=gen, device=device, dtype=dtype)
          for m in linears]

    def run():
        for m, x in zip(linears, xs):
            m(x)

    with torch.inference_mode():
        fn = _graphed(run, device) if graph and device.type == "cuda" else run
        seconds = _time(fn, iters, device)
    return gemm_flops(linears, tokens) / max(seconds, 1e-12) / 1e12


def measure(device: torch.device, dtype: torch.dtype, linears, prefill_tokens: int,
            decode_batch: int, decode_graph: bool = False) -> dict:
    """The device's figures for the planner; ``linears``: one layer's GEMMs (stages/model.py
    ``DecoderLayer.linears``); ``decode_graph``: decode steps replay CUDA graphs."""
    n = 256 << 20
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    hbm = 2 * n / _time(lambda: b.copy_(a)) / 1e9            # bytes read + written
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    h2d = n / _time(lambda: a.copy_(host, non_blocking=True)) / 1e9
    del a, b, host
    torch.cuda.empty_cache()
    decode = min(decode_batch, DECODE_BATCH)
    out = {"hbm_gbs": hbm, "h2d_gbs": h2d,
           "tflops": gemm_tflops(linears, prefill_tokens, dtype, device),
           "decode_tflops": gemm_tflops(linears, decode, dtype, device, graph=decode_graph),
           "gemm_tokens": [prefill_tokens, decode]}
    torch.cuda.empty_cache()
    return out
