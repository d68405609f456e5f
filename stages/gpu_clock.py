"""How long a stage's GPU sat idle between steps, from CUDA events on the compute stream.

Each step records an event before its first GPU work and one after its last. The gap from one
step's end to the next step's start is time the GPU had nothing queued: the host was still
preparing the step, waiting for the ring, or waiting for the GPU itself (a host sync). The
share of such gaps in the span from the first step to the last is the stage's idle share
(pipeline bubbles plus host overhead). On the CPU there is no separate device to idle.
"""
from __future__ import annotations

import torch


class GpuClock:
    def __init__(self, device: torch.device):
        self.on = device.type == "cuda"
        self.idle_s = 0.0
        self.span_s = 0.0
        self._open: list = []          # (start, end) events of steps not yet added up
        self._last_end = None

    def start(self):
        if not self.on:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def end(self, start) -> None:
        if not self.on:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._open.append((start, ev))
        self._settle(block=False)

    def _settle(self, block: bool) -> None:
        while self._open:
            a, b = self._open[0]
            if block:
                b.synchronize()
            elif not b.query():
                return
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
