"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step is ~30 small kernels per layer; launching them from Python costs more than the
GPU work at small batches. A bucket's graph is captured once over static input buffers; a step
copies its inputs into the buffers and replays. Rows past the step's batch are padding: their
context length is 0 (attention returns zeros) and their k/v go to a scratch block that no
sequence owns, so padding never touches real KV.

    static buffers of bucket Bp:  x [Bp] (token ids) or [Bp, H] (hidden)
                                  positions, write_blocks, write_offsets [Bp]
                                  table [Bp, W_max] int32, ctx [Bp] int32
    replay -> out [Bp, H]         (the caller keeps the first B rows)

On the CPU the same padded path runs eagerly (no capture), so its bookkeeping is tested.
"""
from __future__ import annotations

import numpy as np
import torch

from pipemax.stages.attention import Group, StepLayout
from pipemax.stages.transfer import staged

BUCKETS = (8, 16, 32, 64, 128, 256, 384, 512, 768, 1024)


class _Bucket:
    def __init__(self, Bp: int, width: int, block_size: int, hidden: int | None, dtype,
                 device, kernel: bool):
        self.Bp = Bp
        self.x = (torch.zeros(Bp, dtype=torch.long, device=device) if hidden is None else
                  torch.zeros(Bp, hidden, dtype=dtype, device=device))
        self.positions = torch.zeros(Bp, dtype=torch.long, device=device)
        self.write_blocks = torch.zeros(Bp, dtype=torch.long, device=device)
        self.write_offsets = torch.zeros(Bp, dtype=torch.long, device=device)
        self.table = torch.zeros(Bp, width, dtype=torch.int32, device=device)
        self.ctx = torch.zeros(Bp, dtype=torch.int32, device=device)
        last = torch.arange(Bp, device=device)
        self.layout = StepLayout(self.positions, self.write_blocks, self.write_offsets, last,
                                 Group(None, Bp, 1, width * block_size, table=self.table,
                                       ctx=self.ctx, kernel=kernel), None)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model, kv: torch.Tensor, scratch_block: int, block_size: int,
                 max_blocks_per_seq: int, dtype, device: torch.device, capture: bool,
                 decode_kernel: bool, quant=None):
        self.model, self.kv = model, kv
        self.quant = quant                 # an fp8 cache's scales (read in place by replays)
        self.scratch = scratch_block
        self.bs = block_size
        self.width = max_blocks_per_seq
        self.dtype, self.device = dtype, device
        self.capture = capture and device.type == "cuda"
        self.kernel = decode_kernel        # the stage's decode path (attention.decode_path)
        self.hidden = None if model.is_first else model.cfg.hidden_size
        self.buckets: dict[int, _Bucket] = {}
        self.pool = None

    def fits(self, B: int, width: int) -> bool:
        return B <= BUCKETS[-1] and width <= self.width

    def _bucket(self, B: int) -> _Bucket:
        Bp = next(b for b in BUCKETS if b >= B)
        bk = self.buckets.get(Bp)
        if bk is None:
            bk = _Bucket(Bp, self.width, self.bs, self.hidden, self.dtype, self.device,
                         self.kernel)
            bk.ctx.zero_()
            bk.write_blocks.fill_(self.scratch)
            if self.capture:
                self._capture(bk)
            self.buckets[Bp] = bk
        return bk

    def _forward(self, bk: _Bucket) -> torch.Tensor:
        return self.model(bk.x, bk.layout, self.kv, self.quant)

    def _capture(self, bk: _Bucket) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):           # compile Triton kernels, warm cuBLAS
                self._forward(bk)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            bk.out = self._forward(bk)
        self.pool = g.pool()
        bk.graph = g

    @torch.inference_mode()
    def run(self, x: torch.Tensor, ctx_lens: np.ndarray, table: np.ndarray) -> torch.Tensor:
        """One decode step of B sequences (each brings one token): the [B, H] output."""
        B = len(ctx_lens)
        bk = self._bucket(B)
        ctx = np.asarray(ctx_lens, dtype=np.int64)
        pos = ctx - 1
        tb = np.asarray(table, dtype=np.int64)
        pad = bk.Bp - B
        t = lambda a: staged(a, self.device)
        full = np.zeros((B, self.width), dtype=np.int32)
        full[:, :tb.shape[1]] = tb
        # whole buffers rewritten each step: padding rows reset to (ctx 0, scratch block)
        bk.x[:B].copy_(x, non_blocking=True)
        bk.positions.copy_(t(np.concatenate([pos, np.zeros(pad, np.int64)])), non_blocking=True)
        bk.write_blocks.copy_(t(np.concatenate([tb[np.arange(B), pos // self.bs],
                                                np.full(pad, self.scratch)])), non_blocking=True)
        bk.write_offsets.copy_(t(np.concatenate([pos % self.bs, np.zeros(pad, np.int64)])),
                               non_blocking=True)
        bk.table[:B].copy_(t(full), non_blocking=True)
        bk.ctx.copy_(t(np.concatenate([ctx, np.zeros(pad, np.int64)]).astype(np.int32)),
                     non_blocking=True)
        if bk.graph is not None:
            bk.graph.replay()
            return bk.out[:B]
        return self._forward(bk)[:B]
