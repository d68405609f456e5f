"""The token-level timetable of KV offload on one stage: pure functions, no devices.

A stage's GPU KV cache is split in two regions::

    gpu block ids:  [0, R)              resident blocks (sequences that never leave the GPU)
                    [R, R+S)            staging buffer 0
                    [R+S, R+2S)         staging buffer 1

An offloaded sequence's KV lives in the host pool (host block ids, one contiguous extent per
sequence). Step k of the stage (the k-th micro-batch message it handles) uses staging buffer
k % 2: before it computes, the context of its offloaded sequences is *prefetched* host->GPU
into that buffer; after it computes, the blocks holding the tokens written in the step are
*offloaded* GPU->host. ``staging_for`` says which blocks move where in one step. An
offloaded row may begin with GPU blocks (``gpu_prefix``: cached prompt blocks it shares,
pipemax/scheduler.py): they are kept as they are, neither staged nor copied, and only the
rest of its row (host ids) is staged.

``Timetable`` says what each copy and compute must wait for, so that the overlapped schedule
(prefetch of step k+1 during compute of step k) is exactly as correct as the plain one:

    swapout(k)   waits for  the compute issued so far
    prefetch(k)  waits for  offload(k-2)           its buffer was last used by step k-2
                            offload(j)             j = the last step of the same micro-batch:
                                                   the host copy must hold what j wrote
                            offload(k-1)           if it wrote host blocks prefetch(k) reads:
                                                   a sequence that left step k-1's
                                                   micro-batch (moved, or preempted with its
                                                   extent kept) and is in step k's
                            the last swapout       its copies read host extents a swap-out
                                                   wrote, and write GPU blocks it read
    compute(k)   waits for  prefetch(k), swapout(k) (its blocks may be reused in step k),
                            offload(k-1) if it reads host extents in place (streamed rows)
    offload(k)   waits for  compute(k)

(offload(k-1) has always been issued when that happens: the driver plans a sequence into
another micro-batch's step only after the step it left came back, and a stage issues a
step's offload before it hands the step on. Earlier offloads are covered by offload(k-2):
offloads run in order on one stream.)

A step may also carry *swap* copies of preempted sequences (pipemax/scheduler.py): swap-out
(GPU blocks -> host extent, on the offload stream) and swap-in (host extent -> GPU blocks,
with the prefetch). ``swapout(k)`` is issued first, as part of prefetch(k). A later step
never reuses a swapped-out block before the copy: every compute follows compute(k) on the
stream. A host extent a swap-in read is freed by the driver only once its step has come back.

The stage issues, per step k: prefetch(k) unless issued early; (overlapped only) prefetch(k+1)
if the next message is already in its ring and ``prefetch_ready`` says its waits have all been
issued; compute(k); offload(k). Prefetching k+1 before compute(k) is launched lets the copy run
under the whole of step k, host-side preparation included.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Run:
    """Copy ``n`` consecutive blocks from ``src`` to ``dst`` (block ids)."""
    src: int
    dst: int
    n: int


@dataclass
class Staging:
    table: np.ndarray                      # [B, W] block table in GPU block ids
    prefetch: list[Run] = field(default_factory=list)   # host -> GPU
    offload: list[Run] = field(default_factory=list)    # GPU -> host
    blocks_used: int = 0                   # staging blocks this step occupies
    swap_out: list[Run] = field(default_factory=list)   # GPU -> host, preempted sequences
    swap_in: list[Run] = field(default_factory=list)    # host -> GPU, resumed resident

    @property
    def prefetch_blocks(self) -> int:
        return sum(r.n for r in self.prefetch)

    @property
    def offload_blocks(self) -> int:
        return sum(r.n for r in self.offload)


def swap_runs(pairs: np.ndarray) -> list[Run]:
    """Runs of a step's swap copies, given as [n, 2] (from, to) block pairs."""
    pairs = np.asarray(pairs).reshape(-1, 2)
    return _runs(pairs[:, 0], pairs[:, 1])


def _runs(src: np.ndarray, dst: np.ndarray) -> list[Run]:
    """Coalesce parallel block lists into runs where both sides are consecutive."""
    runs = []
    i = 0
    n = len(src)
    while i < n:
        j = i + 1
        while j < n and src[j] == src[j - 1] + 1 and dst[j] == dst[j - 1] + 1:
            j += 1
        runs.append(Run(int(src[i]), int(dst[i]), j - i))
        i = j
    return runs


def staging_for(q_lens: np.ndarray, ctx_lens: np.ndarray, block_tables: np.ndarray,
                offloaded: np.ndarray, block_size: int, resident_blocks: int,
                staging_blocks: int, buffer: int, gpu_prefix: np.ndarray | None = None) -> Staging:
    """Where the blocks of one step go. Resident rows of ``block_tables`` hold GPU ids and are
    kept; offloaded rows hold host ids and are remapped into staging buffer ``buffer``, but
    for their first ``gpu_prefix[b]`` blocks (GPU ids, kept; the step never writes them).
    Streamed rows (not ``offloaded``) keep their host ids: attention reads them in the host
    pool, and nothing of theirs is copied."""
    table = np.array(block_tables, dtype=np.int64, copy=True)
    if not offloaded.any():
        return Staging(table)
    base = resident_blocks + buffer * staging_blocks
    cursor = 0
    pre_src, pre_dst, off_src, off_dst = [], [], [], []
    for b in np.flatnonzero(offloaded):
        ctx, q = int(ctx_lens[b]), int(q_lens[b])
        g = int(gpu_prefix[b]) if gpu_prefix is not None else 0
        nblk = -(-ctx // block_size)
        old = -(-(ctx - q) // block_size)             # blocks holding context from before
        first_dirty = (ctx - q) // block_size         # first block the step writes into
        if first_dirty < g:
            raise ValueError(f"row {b} writes into its GPU prefix ({g} blocks)")
        host = table[b, g:nblk].copy()
        gpu = np.arange(base + cursor, base + cursor + nblk - g)
        table[b, g:nblk] = gpu
        table[b, nblk:] = 0        # the rest of its extent is not read (masked) but must be a GPU id
        pre_src.append(host[:old - g])
        pre_dst.append(gpu[:old - g])
        off_src.append(gpu[first_dirty - g:])
        off_dst.append(host[first_dirty - g:])
        cursor += nblk - g
    if cursor > staging_blocks:
        raise ValueError(f"step needs {cursor} staging blocks, the buffer holds {staging_blocks}")
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)
    return Staging(table, _runs(cat(pre_src), cat(pre_dst)), _runs(cat(off_src), cat(off_dst)),
                   cursor)


class Timetable:
    """Dependencies between a stage's copies and computes, step by step (see module doc)."""

    def __init__(self):
        self.last_step_of: dict[int, int] = {}   # micro-batch -> last step that offloaded it
        self.mb_of: dict[int, int] = {}
        self.open: dict[int, int] = {}           # micro-batch -> its step begun, not offloaded
        self.offloaded_upto = -1                 # offloads are issued in step order
        self.wrote: dict[int, list[Run]] = {}    # step -> the host blocks its offload wrote

    def prefetch_ready(self, k: int, mb: int) -> bool:
        """Whether every copy step k's prefetch must wait for has been issued, so it may be
        issued now, ahead of its turn (it never may while its micro-batch's previous step is
        still open: the host copy would not yet hold what that step writes)."""
        return mb not in self.open and self.offloaded_upto >= k - 2

    def begin(self, k: int, mb: int) -> None:
        """Step k (of micro-batch mb) is known: call before asking for its waits."""
        self.mb_of[k] = mb
        self.open[mb] = k

    def prefetch_waits(self, k: int, reads: list[Run] = ()) -> list[tuple[str, int]]:
        """What prefetch(k) waits for; ``reads``: the runs it copies from the host (their
        ``src``: host block ids), prefetch and swap-in."""
        waits = [("offload", k - 2)] if k >= 2 else []
        j = self.last_step_of.get(self.mb_of[k])
        if j is not None and j != k - 2:
            waits.append(("offload", j))
        if j != k - 1 and _overlap(reads, self.wrote.get(k - 1, ())):
            waits.append(("offload", k - 1))
        return waits

    @staticmethod
    def compute_waits(k: int, streamed: bool = False) -> list[tuple[str, int]]:
        """What compute(k) waits for; ``streamed``: the step reads host extents in place
        (attention over PCIe), which offload(k-1) may have written (a swapped sequence that
        comes back streamed; the earlier offloads are behind prefetch(k)'s waits)."""
        return [("prefetch", k), ("swapout", k)] + ([("offload", k - 1)] if streamed else [])

    @staticmethod
    def offload_waits(k: int) -> list[tuple[str, int]]:
        return [("compute", k)]

    def offloaded(self, k: int, writes: list[Run] = ()) -> None:
        """Offload of step k is issued (``writes``: its runs, ``dst`` host block ids): later
        prefetches of its micro-batch wait for it, and the next step's if it reads them."""
        mb = self.mb_of[k]
        self.wrote[k] = list(writes)
        self.wrote.pop(k - 2, None)
        self.last_step_of[mb] = k
        if self.open.get(mb) == k:
            del self.open[mb]
        self.offloaded_upto = max(self.offloaded_upto, k)
        self.mb_of.pop(k - 3, None)


def _overlap(reads, writes) -> bool:
    """Do any host blocks read (``src`` of ``reads``) lie in those written (``dst`` of
    ``writes``, disjoint runs: one step's offloads)?"""
    if not reads or not writes:
        return False
    spans = sorted((w.dst, w.dst + w.n) for w in writes)
    starts = [a for a, _ in spans]
    for r in reads:
        i = bisect.bisect_right(starts, r.src + r.n - 1) - 1   # the last span starting in
        if i >= 0 and spans[i][1] > r.src:                     # or before the read's end
            return True
    return False
