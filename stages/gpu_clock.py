"""How long a stage's GPU sat idle between steps, from CUDA events on the compute stream.

Each step records an event before its first GPU work and one after its last. The gap from one
step's end to the next step's start is time the GPU had nothing queued: the host was still
preparing the step, waiting for the ring, or waiting for the GPU itself (a host sync). The
share of such gaps in the span from the first step to the last is the stage's idle share
(pipeline bubbles plus host overhead). On the CPU there is no separate device to idle.

Steps are also added up by kind (decode only, prompt only, mixed): count, GPU milliseconds
from start to end event, tokens and sequences, so a run's report says where its time went.
"""
from __future__ import annotations

import torch


class GpuClock:
    def __init__(self, device: torch.device):
        self.on = device.type == "cuda"
        self.idle_s = 0.0
        self.span_s = 0.0
        self._open: list = []          # (start, end, kind, tokens, seqs) not yet added up
        self._last_end = None
        self.kinds: dict[str, dict] = {}

    def start(self):
        if not self.on:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def end(self, start, kind: str = "step", tokens: int = 0, seqs: int = 0) -> None:
        if not self.on:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._open.append((start, ev, kind, tokens, seqs))
        self._settle(block=False)

    def _settle(self, block: bool) -> None:
        while self._open:
            a, b, kind, tokens, seqs = self._open[0]
            if block:
                b.synchronize()
            elif not b.query():
                return
            k = self.kinds.setdefault(kind, {"steps": 0, "gpu_s": 0.0, "tokens": 0, "seqs": 0})
            k["steps"] += 1
            k["gpu_s"] += a.elapsed_time(b) / 1e3
            k["tokens"] += tokens
            k["seqs"] += seqs
            if self._last_end is not None:
                self.idle_s += max(0.0, self._last_end.elapsed_time(a) / 1e3)
                self.span_s += self._last_end.elapsed_time(b) / 1e3
            self._last_end = b
            self._open.pop(0)

    def idle_share(self) -> float | None:
        if not self.on:
            return None
        self._settle(block=True)
        return self.idle_s / self.span_s if self.span_s > 0 else None

    def by_kind(self) -> dict[str, dict]:
        self._settle(block=True)
        return self.kinds
