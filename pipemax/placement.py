"""Where a sequence's KV lives: on the GPU, in the host pool staged for each step, or in the
host pool read in place. The one rule the planner (pipemax/planner.py) sizes memory by and
the scheduler (pipemax/scheduler.py) admits by. Pure: no I/O, no state.

The three placements, and what a sequence needs for each (all in KV blocks; its *extent* is
the blocks of its whole length, prompt and every token it may sample):

- ``RESIDENT``: its blocks are GPU blocks. Taken at admission for the whole prompt, when the
  free blocks hold them above a watermark (or its micro-batch runs nothing yet) and its extent
  fits the resident blocks, so it can finish there.
- ``HOST`` (offloaded): its KV lives in one host extent reserved for its whole length and is
  staged on the GPU for each step of its micro-batch (stages/timetable.py). Taken when KV
  offload is on (staging buffers exist), the micro-batch's staging buffer has room for its
  first chunk and one block to grow into, and its extent fits a staging buffer.
- ``STREAMED``: a host extent as for ``HOST``, never staged: attention reads and writes it in
  the host pool in place (stages/attention.py). Only for a sequence that could never finish
  on the GPU (``Room.fits_gpu`` is false) while a host pool exists; at most
  ``MAX_STREAMED_PER_MB`` per micro-batch, since each of its steps reads its whole context
  over PCIe.

*Preemption.* When a micro-batch's resident sequences outgrow the GPU's blocks, the newest is
preempted. ``swaps`` says whether its KV goes to the host pool instead of being dropped: when
KV offload is on (a host pool and staging buffers exist), or swap-only (offload off with a
host pool kept for swaps, ``swap_share``), and it has computed KV to keep. The
scheduler then moves its computed blocks into a host extent of its whole length (the step
message carries the copies; each stage copies its own layers, stages/timetable.py orders
them), or recomputes it as before when the pool has no free extent for it. A preempted
offloaded sequence swaps too, with nothing to copy: its extent holds its KV already. A swapped
sequence waits at the front of the queue and comes back through ``place`` like any other,
without recomputation: ``RESIDENT`` copies its KV back into GPU blocks, ``HOST`` keeps its
extent and stages it for each step like any offloaded sequence (its first chunk is then its
whole context so far, ``Admission.first``).

A sequence none of them takes now waits (it is admitted later, or, if its extent is beyond
``Room.longest``, the engine gives it an error line before it is queued). The planner uses the
same rule ahead of the run: a sampled request the GPU cannot hold (``fits_gpu``) runs
streamed if the host pool's spare blocks hold it, else it is refused; ``host_pool`` sizes the
pool from the plan (``offload_share`` for the offloaded sequences, ``stream_share`` for the
streamed ones).

Changing the offload policy (which sequences go to the host, migration between GPU and host,
swapping instead of recomputing a preempted sequence) happens here: ``place`` is the decision
for one admission, given what the scheduler sees at that moment (``Admission``) and the
memory of the plan (``Room``), and ``swaps`` the one for a preemption; the scheduler only
carries them out.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_STREAMED_PER_MB = 1


class Placement(enum.Enum):
    RESIDENT = "resident"   # GPU blocks
    HOST = "host"           # a host extent, staged on the GPU for each step (offloaded)
    STREAMED = "streamed"   # a host extent, read in place (too long for the GPU)

    @property
    def on_host(self) -> bool:
        """Its blocks are a host extent (host block ids), not GPU blocks."""
        return self is not Placement.RESIDENT


@dataclass(frozen=True)
class Room:
    """The KV memory of a plan, in blocks: GPU-resident blocks, one staging buffer (0: no
    offload), the host pool (0: none)."""
    resident_blocks: int
    staging_blocks: int = 0
    host_blocks: int = 0
    swap_blocks: int = 0    # of the host pool, kept for preempted sequences with offload off

    def fits_gpu(self, extent: int) -> bool:
        """Could a sequence of ``extent`` blocks finish on the GPU, resident or staged? (A
        staged one needs a block beyond its first chunk to grow into.)"""
        return extent <= max(self.resident_blocks, self.staging_blocks - 1)

    def streams(self, extent: int) -> bool:
        """Does a sequence of ``extent`` blocks run streamed (when there is room for it)?"""
        return self.host_blocks > 0 and not self.fits_gpu(extent)

    @property
    def longest(self) -> int:
        """The most blocks a sequence can ever take (alone): streamed, what the host holds."""
        return max(self.resident_blocks, self.host_blocks)


@dataclass(frozen=True)
class Admission:
    """What the scheduler sees when it admits one sequence into a micro-batch (blocks)."""
    extent: int         # its whole length
    need: int           # free GPU blocks it would take now, resident (its prompt, less cached)
    first: int          # staging blocks its first step takes (its context so far included)
    free: int           # free GPU blocks
    watermark: int      # GPU blocks kept free for the running sequences to grow into
    alone: bool         # its micro-batch runs nothing yet
    staged: int         # staging blocks in use in its micro-batch
    streamed: int       # streamed sequences in its micro-batch
    budget_left: float | None = None   # prefetch tokens its micro-batch's budget has left with
    #                                    it offloaded (pipemax/selection.py; None: first come)


def place(a: Admission, room: Room) -> Placement | None:
    """Where a sequence goes now: resident if the GPU has room for it, else offloaded, else
    streamed (only if the GPU can never hold it); None: it waits. A host placement still needs
    a free host extent of ``a.extent`` blocks, which the scheduler takes (or waits)."""
    if ((a.need + a.watermark <= a.free or a.alone) and a.need <= a.free
            and a.extent <= room.resident_blocks):
        return Placement.RESIDENT
    if (room.staging_blocks > 0 and a.staged + a.first + 1 <= room.staging_blocks
            and a.extent <= room.staging_blocks
            and (a.budget_left is None or a.budget_left >= 0 or a.alone)):
        return Placement.HOST
    if room.streams(a.extent) and a.streamed < MAX_STREAMED_PER_MB:
        return Placement.STREAMED
    return None


def swaps(room: Room, computed_blocks: int) -> bool:
    """Does a preempted resident sequence holding ``computed_blocks`` blocks of computed KV
    go to the host pool (True), or is it recomputed later (False)? With KV offload on (a host
    pool and staging buffers: it may come back staged as well as resident), or swap-only (a
    host pool kept for swaps, no staging: it comes back resident); and only if there is KV
    to keep. (The scheduler still needs a free host extent.)"""
    return (room.host_blocks > 0 and (room.staging_blocks > 0 or room.swap_blocks > 0)
            and computed_blocks > 0)


SWAPPED_PER_MB = 2      # preempted sequences a plan keeps host room for, per micro-batch


def swap_share(host_avail: int, resident_blocks: int, micro_batches: int, extent: int) -> int:
    """Host blocks a plan keeps for preempted sequences: room for ``SWAPPED_PER_MB`` of the
    longest ``extent`` per micro-batch (one preemption frees room for the others, and the
    swapped ones wait only until room frees), at most the GPU's resident blocks, within what
    the host has. (More at once are recomputed.) Every block is pinned host memory, set up
    at start: a pool as large as the GPU's KV would cost a whole-GPU run seconds of it."""
    return min(host_avail, resident_blocks, SWAPPED_PER_MB * micro_batches * extent)


def offload_share(host_avail: int, micro_batches: int, staging_blocks: int) -> int:
    """Host blocks a plan with offload keeps for its offloaded sequences: as many as its
    staging buffers hold in all micro-batches (each buffer stages one micro-batch's
    extents), within what the host has."""
    return min(host_avail, micro_batches * staging_blocks) if staging_blocks else 0


def stream_share(extents: list[int], room: Room, micro_batches: int) -> tuple[int, int, int]:
    """For the sampled requests' ``extents`` under ``room`` (its ``host_blocks``: the host
    blocks spare for streaming): (streamed, refused, host blocks kept for streaming). The
    GPU holds the others; of those it cannot, the spare host blocks hold the streamed ones,
    room for the longest in every micro-batch at once."""
    long = [e for e in extents if not room.fits_gpu(e)]
    held = [e for e in long if e <= room.host_blocks]
    keep = (min(room.host_blocks, micro_batches * MAX_STREAMED_PER_MB * max(held))
            if held else 0)
    return len(held), len(long) - len(held), keep
