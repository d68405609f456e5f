"""A stage measures its own device once at start: HBM bandwidth, pinned H2D, matmul rate.

These feed the planner (pipemax/planner.py). About half a second on a GPU; on the CPU the
planner uses nominal figures instead.
"""
from __future__ import annotations

import torch


def _time(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def measure(device: torch.device, dtype: torch.dtype) -> dict:
    n = 256 << 20
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    hbm = 2 * n / _time(lambda: b.copy_(a)) / 1e9            # bytes read + written
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    h2d = n / _time(lambda: a.copy_(host, non_blocking=True)) / 1e9
    m = 4096
    x = torch.randn(m, m, device=device, dtype=dtype)
    y = torch.randn(m, m, device=device, dtype=dtype)
    tflops = 2 * m ** 3 / _time(lambda: x @ y, 10) / 1e12
    del a, b, host, x, y
    torch.cuda.empty_cache()
    return {"hbm_gbs": hbm, "h2d_gbs": h2d, "tflops": tflops}
