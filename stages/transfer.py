"""Host <-> device copies that never make the host wait for the GPU.

A copy from pageable host memory to the GPU is synchronous in CUDA: the driver first waits for
the stream's earlier work, so the host cannot prepare step k+1 while the GPU runs step k. Every
per-step input therefore goes through page-locked memory (torch's caching host allocator,
which keeps a block until the copies reading it are done), and outputs come back the same way
with an event to wait on. On the CPU these are plain tensors.
"""
from __future__ import annotations

import numpy as np
import torch

from pipemax.ipc.ring import Ring, RingTimeout


def staged(a, device: torch.device) -> torch.Tensor:
    """A numpy array or CPU tensor as a CPU tensor that ``device`` can copy from asynchronously
    (page-locked when ``device`` is CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t


def to_device(a, device: torch.device) -> torch.Tensor:
    """A numpy array or CPU tensor on ``device``, copied without a host sync on CUDA."""
    return staged(a, device).to(device, non_blocking=True)


def host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A copy of a (ring-backed) CPU tensor that outlives the ring slot; page-locked if ``pin``."""
    if not pin:
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


def take(ring: Ring, alive, timeout: float | None, pin: bool) -> tuple[dict, dict] | None:
    """The next message of ``ring``, copied out so that its slot is released at once
    (page-locked copies if ``pin``, so they go on to the GPU without a host sync); None if
    none came within ``timeout`` (0: only if already there; None: wait for it)."""
    try:
        with ring.read(timeout=timeout, alive=alive) as msg:
            return dict(msg.meta), {k: host_copy(v, pin) for k, v in msg.tensors.items()}
    except RingTimeout:
        if timeout is None:
            raise
        return None


def take_while(ring: Ring, alive, pin: bool, busy, poll_s: float) -> tuple[dict, dict] | None:
    """The next message of ``ring`` if it comes while ``busy()`` (the step in flight is still
    computing), waiting for it in bounded slices of ``poll_s``; None once ``busy()`` is false.
    A stage takes step k+1 this way while step k computes, so that k+1's prefetch is issued
    under k's compute instead of after it."""
    while busy():
        msg = take(ring, alive, poll_s, pin)
        if msg is not None:
            return msg
    return None


class Outbound:
    """A step's outputs on their way to the host: ``ready()`` waits, then gives CPU tensors."""

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor]):
        self.meta = meta
        self.event = None
        out = {}
        for k, v in tensors.items():
            if v.is_cuda:
                h = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                h.copy_(v, non_blocking=True)
                out[k] = h
                if self.event is None:
                    self.event = torch.cuda.Event()
            else:
                out[k] = v
        if self.event is not None:
            self.event.record()
        self.tensors = out

    def done(self) -> bool:
        """Whether ``ready()`` would return without waiting."""
        return self.event is None or self.event.query()

    def ready(self) -> tuple[dict, dict[str, torch.Tensor]]:
        if self.event is not None:
            self.event.synchronize()
        return self.meta, self.tensors
