"""A stage's side of KV offload: the host pool mapping and the copies of the timetable.

The host pool (one POSIX shared-memory segment per stage, created by the KV pool process,
pipemax/kv_pool.py) has the same block layout as the GPU cache::

    host[num_host_blocks, L_stage, 2, block_size, n_kv_heads, head_dim]

On CUDA the mapping is registered with the driver (cudaHostRegister, mapped), so copies are DMA
and kernels can read and write it in place (``HostPool.device_view``: the streamed sequences'
attention, stages/attention.py);
prefetches run on their own stream, offloads on another, and CUDA events carry the
timetable's dependencies (stages/timetable.py). The swap copies of preempted sequences go
the same way: swap-out on the offload stream, swap-in with the prefetch; they move raw
blocks, whatever the cache's dtype. On the CPU the same copies are plain memcpy,
done at once, so every path runs in the tests.
"""
from __future__ import annotations

import mmap

import posix_ipc
import torch

from pipemax.stages.timetable import Staging, Timetable

EVENT_WINDOW = 1024     # steps of CUDA events kept (more than any micro-batch count)
HOST_REGISTER_PORTABLE_MAPPED = 1 | 2   # cudaHostRegisterPortable | cudaHostRegisterMapped


class _CudaArray:
    """The host pool's bytes as a CUDA array (``__cuda_array_interface__``): with unified
    addressing a registered host pointer is also its device pointer."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3, "strides": None,
                                         "stream": None}


class HostPool:
    """The stage's view of its host KV segment."""

    def __init__(self, name: str, shape: tuple, dtype: torch.dtype, pin: bool):
        shm = posix_ipc.SharedMemory(name)
        try:
            self._mm = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        raw = torch.frombuffer(self._mm, dtype=torch.uint8)
        esize = torch.empty(0, dtype=dtype).element_size()
        n = 1
        for d in shape:
            n *= d
        self.data = raw[:n * esize].view(dtype).view(shape)
        self.registered = False
        if pin:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(self.data.data_ptr(), n * esize,
                                          HOST_REGISTER_PORTABLE_MAPPED)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of the host KV pool failed ({err}); "
                                   "check `ulimit -l` (LimitMEMLOCK=infinity)")
            self.registered = True

    def device_view(self, device: torch.device) -> torch.Tensor:
        """The pool as a tensor kernels on ``device`` read and write in place (over PCIe); on
        the CPU, the pool itself."""
        if not self.registered:
            return self.data
        nbytes = self.data.numel() * self.data.element_size()
        raw = torch.as_tensor(_CudaArray(self.data.data_ptr(), nbytes), device=device)
        return raw.view(self.data.dtype).view(self.data.shape)

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self.registered = False
        self.data = None
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the process


class Offloader:
    """Issues one stage's prefetches and offloads in timetable order; counts bytes moved."""

    def __init__(self, gpu_kv: torch.Tensor, host: HostPool, overlap: bool):
        self.gpu = gpu_kv
        self.host = host.data
        self.overlap = overlap
        self.cuda = gpu_kv.is_cuda
        self.tt = Timetable()
        self.block_bytes = gpu_kv[0].numel() * gpu_kv.element_size()
        self.bytes_prefetched = 0
        self.bytes_offloaded = 0
        self.bytes_swapped_out = 0
        self.bytes_swapped_in = 0
        self._last_swapout = None     # the latest swap-out's event (CUDA)
        self.prefetched: set[int] = set()
        self._spans: list = []        # (kind, start event, end event) not yet added up
        self.copy_s = self.stall_s = 0.0
        if self.cuda:
            self.h2d = torch.cuda.Stream(gpu_kv.device)
            self.d2h = torch.cuda.Stream(gpu_kv.device)
            self.events: dict[tuple[str, int], torch.cuda.Event] = {}

    # ---- events (CUDA only; on the CPU every copy is done when issued) ------------------
    def _record(self, key, stream) -> None:
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(stream)
            self.events[key] = ev
            # a prefetch may wait for its micro-batch's last offload, M steps back: keep a
            # window far wider than any number of micro-batches
            if len(self.events) > 3 * EVENT_WINDOW:
                for old in [k for k in self.events if k[1] < key[1] - EVENT_WINDOW]:
                    del self.events[old]

    def _wait(self, stream, waits) -> None:
        if self.cuda:
            for key in waits:
                ev = self.events.get(key)
                if ev is not None:
                    stream.wait_event(ev)

    # ---- the three operations ------------------------------------------------------------
    def prefetch(self, k: int, mb: int, st: Staging) -> None:
        if k in self.prefetched:
            return
        self.tt.begin(k, mb)
        if st.swap_out:
            self._swap_out(k, st)
        stream = self.h2d if self.cuda else None
        self._wait(stream, self.tt.prefetch_waits(k, st.swap_in + st.prefetch))
        if self.cuda and self._last_swapout is not None:
            stream.wait_event(self._last_swapout)
        start = self._timing_event(stream)
        with torch.cuda.stream(stream) if self.cuda else _nothing():
            for r in st.swap_in:
                self.gpu[r.dst:r.dst + r.n].copy_(self.host[r.src:r.src + r.n],
                                                  non_blocking=True)
            for r in st.prefetch:
                self.gpu[r.dst:r.dst + r.n].copy_(self.host[r.src:r.src + r.n],
                                                  non_blocking=True)
        self._record(("prefetch", k), stream)
        self.bytes_swapped_in += sum(r.n for r in st.swap_in) * self.block_bytes
        if start is not None:
            self._spans.append(("copy", start, self._timing_event(stream)))
        self.bytes_prefetched += st.prefetch_blocks * self.block_bytes
        self.prefetched.add(k)

    def _swap_out(self, k: int, st: Staging) -> None:
        """Copy the blocks of the sequences preempted in step k to their host extents, after
        the compute issued so far; step k's compute (reusing those blocks) waits for it."""
        stream = self.d2h if self.cuda else None
        if self.cuda:
            stream.wait_stream(torch.cuda.current_stream(self.gpu.device))
        with torch.cuda.stream(stream) if self.cuda else _nothing():
            for r in st.swap_out:
                self.host[r.dst:r.dst + r.n].copy_(self.gpu[r.src:r.src + r.n],
                                                   non_blocking=True)
        self._record(("swapout", k), stream)
        if self.cuda:
            self._last_swapout = self.events[("swapout", k)]
        self.bytes_swapped_out += sum(r.n for r in st.swap_out) * self.block_bytes

    def before_compute(self, k: int, streamed: bool = False) -> None:
        """Make the compute stream wait until step k's data is on the GPU (and, ``streamed``:
        in the host extents it reads in place)."""
        if self.cuda:
            compute = torch.cuda.current_stream(self.gpu.device)
            start = self._timing_event(compute)
            self._wait(compute, self.tt.compute_waits(k, streamed))
            self._spans.append(("stall", start, self._timing_event(compute)))
            self._settle(block=False)

    def after_compute(self, k: int) -> None:
        self._record(("compute", k), torch.cuda.current_stream(self.gpu.device)
                     if self.cuda else None)

    def offload(self, k: int, st: Staging) -> None:
        stream = self.d2h if self.cuda else None
        self._wait(stream, self.tt.offload_waits(k))
        with torch.cuda.stream(stream) if self.cuda else _nothing():
            for r in st.offload:
                self.host[r.dst:r.dst + r.n].copy_(self.gpu[r.src:r.src + r.n],
                                                   non_blocking=True)
        self._record(("offload", k), stream)
        self.tt.offloaded(k, st.offload)
        self.bytes_offloaded += st.offload_blocks * self.block_bytes
        self.prefetched.discard(k)

    # ---- how much of the transfer time compute waited for ---------------------------------
    def _timing_event(self, stream):
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def _settle(self, block: bool) -> None:
        """Add up the finished (start, end) spans: prefetch copies, and compute stalls."""
        keep = []
        for kind, a, b in self._spans:
            if block:
                b.synchronize()
            if b.query():
                ms = a.elapsed_time(b)
                if kind == "copy":
                    self.copy_s += ms / 1e3
                else:
                    self.stall_s += ms / 1e3
            else:
                keep.append((kind, a, b))
        self._spans = keep

    def hidden_share(self) -> float | None:
        """Share of the prefetch time that compute did not wait for (CUDA, overlapped only: the
        plain schedule waits on the host, so nothing of it is hidden by construction)."""
        if not self.cuda or not self.overlap:
            return None
        self._settle(block=True)
        if self.copy_s <= 0:
            return None
        return max(0.0, 1.0 - self.stall_s / self.copy_s)

    def synchronize(self) -> None:
        if self.cuda:
            self.h2d.synchronize()
            self.d2h.synchronize()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
