"""Continuous batching in micro-batches: which sequences run in a micro-batch's next step.

Pure planning, no I/O. Sequences are bound to one micro-batch while they run. A step of a
micro-batch gives each of its running sequences its next tokens (one when decoding, a chunk of
the prompt while prefilling) within a token budget, then admits waiting sequences into free
places. A sequence samples a token in the step that brings all its tokens into the cache.

When a running sequence needs a block and none is free, the newest sequence of the same
micro-batch is preempted: its blocks are freed and it goes back to the front of the queue, to
be recomputed (prompt and output so far) later. Only the micro-batch being planned is touched,
so blocks in use by micro-batches in flight are never given away.

With KV offload on (``placement.swaps``), a preempted resident sequence is *swapped* instead,
when the host pool has a free extent for its whole length: the step carries the copies of its
computed blocks into that extent (``StepPlan.swap_out``, GPU -> host on every stage, before
the step computes, so its freed blocks may be reused at once), and it waits at the front of
the queue with its KV kept. It comes back without recomputation, wherever ``place`` puts it:
offloaded (its extent staged for each step like any offloaded sequence), or resident again
(``StepPlan.swap_in``: host -> GPU into new blocks, before the step computes; its extent is
freed when that step has come back). Without a host
pool, or with no free extent in it, it is recomputed as before. Copies of a preemption whose
planning gave no step ride on the next step planned. A preempted *offloaded* sequence (its
staging buffer outgrown) already has its KV in its extent, written back by its last step's
offload: it keeps the extent and waits the same way, nothing copied (unless it maps a cached
GPU prefix, which it lets go of: then it is recomputed).

Where an admitted sequence's KV lives is decided by pipemax/placement.py (``place``), the
rule the planner sizes memory by; this module carries it out. *Resident*: GPU blocks.
*Offloaded* (``Placement.HOST``, with KV offload: ``staging_blocks`` > 0): one contiguous host
extent reserved for its whole length (prompt + max_tokens), its context staged on the GPU for
each step of its micro-batch (stages/timetable.py). The context of a micro-batch's offloaded
sequences must fit one staging buffer, which is how the plan bounds the bytes prefetched per
step; when it outgrows the buffer, the newest sequence is preempted, as for resident blocks.
*Streamed* (too long to ever finish on the GPU, when a host pool exists): a host extent like
an offloaded one, never staged: attention reads and writes it in the host pool in place
(stages/attention.py), its prompt chunk by chunk. Nothing that fits the host pool is refused.

With prefix caching (``prefix_caching``, pipemax/prefix_cache.py), a sequence admitted
resident starts with the longest run of cached full blocks of its tokens (shared, never
written while shared: its own tokens go to blocks of its own) and computes only the rest, at
least its last token, whose step samples. Its blocks are offered to the cache as they fill.
A sequence whose next block is being computed right now by another running sequence waits
(the queue's later sequences may go first), so a common prefix is computed once before its
sharers are admitted; and a new sequence joins the queue behind the last waiting one that
begins with the same block, so sharers run together. A released block stays cached until its room
is needed (least recently used first), so a preempted or finished sequence's blocks remain
for whoever comes next with the same tokens, the preempted sequence itself included.

An offloaded sequence uses the cache too: its block table begins with the cached GPU blocks
of its prompt (``Sequence.gpu_prefix`` of them, shared like a resident sequence's, never
staged nor copied: stages/timetable.py keeps them) and goes on with its host extent, which
covers only the rest. So the offloaded sharers of a micro-batch move their common prefix over
PCIe not once per sequence but never. It takes idle cached blocks only above the watermark.
(It does not fill the cache: what it computes lives in its extent. Streamed sequences
neither use nor fill it.)

With KV offload on, the host pool is the cache's second tier (``host_cache_blocks`` slots
after the extents' blocks, pipemax/prefix_cache.py ``HostTier``): an idle cached block
evicted for room, if it was a hit while cached, is copied to a slot with its key (the step's ``swap_out`` copies, before it
computes, so the block is reused at once), and a later admission whose prompt goes on past
the GPU's cached blocks into the tier's keys gets new GPU blocks filled from those slots by
the step's ``swap_in`` copies (before it computes) instead of computing them; they are
cached on the GPU again at once. A slot being read is not reused until its step has come
back.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from pipemax.block_manager import BlockManager, ExtentAllocator
from pipemax.placement import Admission, Placement, Room, place, swaps
from pipemax.prefix_cache import HostTier, extend_keys, shareable_blocks
from pipemax.selection import Budget, Candidate, StepModel, micro_batch_loads, select
from pipemax.sequence import Sequence

MAX_WAITING_PASSED = 256     # waiting sequences an admission may pass (they wait for a prefix)
SETTLE_STEPS = 8             # steps of its own a sequence the selection moved stays put


@dataclass(frozen=True)
class SchedulerConfig:
    num_micro_batches: int
    max_seqs_per_mb: int
    max_tokens_per_step: int
    block_size: int
    num_blocks: int               # GPU-resident blocks
    staging_blocks: int = 0       # per staging buffer (0: no offload)
    host_blocks: int = 0
    prefix_caching: bool = False
    swap_blocks_per_step: int | None = None   # most blocks a step's swap copies move each way
    offload_policy: str = "selection"         # or "first-come" (pipemax/selection.py)
    step_model: StepModel | None = None       # the selection's cost model (None: nominal)
    host_cache_blocks: int = 0    # host tier of the prefix cache: host ids after host_blocks
    swap_blocks: int = 0          # of host_blocks, kept for preempted sequences (swap-only)

    def __post_init__(self):
        for f in ("num_micro_batches", "max_seqs_per_mb", "max_tokens_per_step", "block_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be at least 1")
        if self.num_blocks < (0 if self.staging_blocks > 0 else 1):
            raise ValueError("no KV blocks: neither resident blocks nor staging")


@dataclass
class StepPlan:
    mb: int
    seqs: list[Sequence]
    q_lens: np.ndarray        # [B] int32, tokens each sequence brings this step
    ctx_lens: np.ndarray      # [B] int32, context after the step
    block_tables: np.ndarray  # [B, max blocks] int32
    tokens: np.ndarray        # [N] int64
    sample_rows: np.ndarray   # [n] int64, rows of seqs that sample a token this step
    offloaded: np.ndarray     # [B] bool, rows whose block table holds host block ids (staged)
    streamed: np.ndarray      # [B] bool, rows whose KV stays in the host pool (host ids too)
    swap_out: np.ndarray = None   # [n, 2] int32 (GPU block, host block) copied before compute
    swap_in: np.ndarray = None    # [n, 2] int32 (host block, GPU block) copied before compute
    gpu_prefix: np.ndarray = None  # [B] int32, offloaded rows: leading GPU blocks (cached), kept

    @property
    def num_tokens(self) -> int:
        return int(self.q_lens.sum())


class Scheduler:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.caching = cfg.prefix_caching
        self.tier = (HostTier(cfg.host_blocks, cfg.host_cache_blocks)
                     if self.caching and cfg.host_cache_blocks > 0 and cfg.staging_blocks > 0
                     else None)
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.prefix_caching,
                                   keep_evicted=self.tier is not None)
        self.computing: dict[bytes, Sequence] = {}  # block keys being computed, and by whom
        self._group_tail: dict[bytes, Sequence] = {}  # first block key -> last such queued
        self.waiting: deque[Sequence] = deque()
        self.running: list[list[Sequence]] = [[] for _ in range(cfg.num_micro_batches)]
        self.num_preemptions = 0
        self.watermark = max(1, cfg.num_blocks // 100)
        self.room = Room(cfg.num_blocks, cfg.staging_blocks, cfg.host_blocks, cfg.swap_blocks)
        self.offload = cfg.staging_blocks > 0
        self.host = ExtentAllocator(cfg.host_blocks) if cfg.host_blocks > 0 else None
        self.staged = [0] * cfg.num_micro_batches     # staging blocks in use per mb
        self.streaming = [0] * cfg.num_micro_batches  # streamed sequences per mb
        self.num_offloaded_admitted = 0
        self.num_streamed_admitted = 0
        # preemption: swapped to the host pool (placement.swaps) or recomputed
        self.num_swapped_out = 0         # preemptions that kept the KV in the host pool
        self.num_kept_on_host = 0        # of them offloaded sequences (their extent kept)
        self.blocks_swapped_out = 0
        self.blocks_swapped_in = 0       # (swapped sequences resumed offloaded copy nothing)
        self.tokens_recomputed = 0       # computed tokens whose KV a preemption dropped
        self._copies_out: list[tuple[int, int]] = []   # copies for the next step planned
        self._copies_in: list[tuple[int, int]] = []
        self._swapped: dict[int, Sequence] = {}      # swapped out, not yet resumed
        # the offload selection (pipemax/selection.py): moves of running sequences
        self.selecting = (cfg.offload_policy == "selection" and self.offload
                          and self.host is not None)
        self.num_to_host = self.num_to_gpu = self.num_moved = 0
        self._budget_left: float | None = None      # the planned micro-batch's, admitting
        self._tick = 0                              # schedule() calls
        self._moved_at: dict[int, int] = {}         # id(seq) -> tick the selection moved it
        # host extents of sequences swapped back in, freed once their step came back
        self._freed_after: list[list[tuple[int, int]]] = [[] for _ in range(cfg.num_micro_batches)]
        # prefix caching with offload: offloaded admissions that mapped cached GPU blocks; the
        # host tier's blocks copied in (evicted GPU blocks) and brought back (not computed)
        self.num_offloaded_cached = 0
        self.tier_blocks_out = 0
        self.tier_blocks_in = 0
        self._unpin_after: list[list[int]] = [[] for _ in range(cfg.num_micro_batches)]

    def max_tokens_servable(self) -> int:
        """The longest sequence that can ever run (alone): streamed, what the host pool holds."""
        return self.room.longest * self.cfg.block_size

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``: at the end, or with prefix caching right behind the last waiting
        sequence that begins with the same block (sharers run together)."""
        key = self._first_key(seq)
        if key is not None:
            tail = self._group_tail.get(key)
            self._group_tail[key] = seq
            if (tail is not None and tail.mb == -1 and self.waiting
                    and tail is not self.waiting[-1]):          # (at the end: append)
                try:
                    self.waiting.insert(self.waiting.index(tail) + 1, seq)
                    return
                except ValueError:        # admitted, finished or cancelled meanwhile
                    pass
        self.waiting.append(seq)

    def _first_key(self, s: Sequence) -> bytes | None:
        if not self.caching or shareable_blocks(len(s.token_ids), self.cfg.block_size) < 1:
            return None
        return extend_keys(s.block_keys, s.token_ids, self.cfg.block_size, 1)[0]

    def _shareable_keys(self, s: Sequence) -> list[bytes]:
        """Keys of the blocks of ``s`` that may come from the cache (s.block_keys may hold
        more: the blocks it filled)."""
        n = shareable_blocks(len(s.token_ids), self.cfg.block_size)
        return extend_keys(s.block_keys, s.token_ids, self.cfg.block_size, n)[:n]

    def num_running(self) -> int:
        return sum(len(r) for r in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(self.running)

    # ---- the queue's verbs (control commands, a failed job) ---------------------------------
    def by_custom_id(self) -> dict[str, Sequence]:
        """The waiting and running sequences by custom_id."""
        where = {s.req.custom_id: s for s in self.waiting}
        for run in self.running:
            where.update((s.req.custom_id, s) for s in run)
        return where

    def remove_waiting(self, seq: Sequence) -> bool:
        """Take ``seq`` out of the waiting queue; False if it is not there."""
        try:
            self.waiting.remove(seq)
        except ValueError:
            return False
        return True

    def drop_waiting(self) -> int:
        """Empty the waiting queue; how many sequences it held."""
        n = len(self.waiting)
        self.waiting.clear()
        return n

    def drop_running(self) -> None:
        """Finish every running sequence (their blocks released), with no result."""
        for run in self.running:
            for s in list(run):
                self.finish(s)

    def kv_usage(self) -> dict:
        """KV blocks in use and in all, on the GPU and in the host pool (None without one)."""
        b, host = self.blocks, self.host
        return {"block_size": self.cfg.block_size, "gpu_total": b.num_blocks,
                "gpu_used": b.num_blocks - b.num_free, "gpu_cached_idle": b.num_idle_cached,
                "host_cached": len(self.tier) if self.tier is not None else None,
                "host_total": host.num_blocks if host is not None else None,
                "host_used": host.used if host is not None else None}

    def _release(self, seq: Sequence) -> None:
        self.running[seq.mb].remove(seq)
        if seq.placement.on_host:
            h = seq.gpu_prefix
            self.host.free(seq.blocks[h], len(seq.blocks) - h)
            if h:
                self.blocks.release(seq.blocks[:h])
                seq.gpu_prefix = 0
            self._unstage(seq)
            if seq.placement is Placement.STREAMED:
                self.streaming[seq.mb] -= 1
            seq.blocks.clear()
            seq.placement = Placement.RESIDENT
        else:
            self._release_resident(seq)

    def _unstage(self, seq: Sequence) -> None:
        """``seq`` no longer takes room in its micro-batch's staging buffer."""
        self.staged[seq.mb] -= seq.staged_blocks
        seq.staged_blocks = 0

    def _release_resident(self, seq: Sequence) -> None:
        """Let go of resident ``seq``'s GPU blocks; the keys it was computing are nobody's."""
        if self.caching:
            for k in seq.block_keys[seq.num_registered:]:
                if self.computing.get(k) is seq:
                    del self.computing[k]
            seq.num_registered = 0
        self.blocks.release(seq.blocks)

    def finish(self, seq: Sequence) -> None:
        self._release(seq)
        seq.mb = -1

    def _preempt(self, seq: Sequence) -> None:
        computed = self.blocks.blocks_for(seq.num_computed)
        cap = self.cfg.swap_blocks_per_step
        if (seq.placement is Placement.HOST and not seq.gpu_prefix
                and swaps(self.room, computed)):
            # offloaded: its KV is in its extent already (each step's offload wrote it back),
            # so it keeps the extent and waits, nothing copied and nothing recomputed
            self._unstage(seq)
            self.running[seq.mb].remove(seq)
            self.num_kept_on_host += 1
            self._swapped_out(seq, 0)
            return
        start = (self._host_alloc(self._extent(seq))
                 if seq.placement is Placement.RESIDENT and swaps(self.room, computed)
                 and (cap is None or len(self._copies_out) + computed <= cap) else None)
        if start is not None:                   # swap: its computed blocks to the extent
            self._copies_out.extend(zip(seq.blocks[:computed], range(start, start + computed)))
            self._release(seq)
            seq.blocks = list(range(start, start + self._extent(seq)))
            seq.placement = Placement.HOST      # (its blocks are a host extent)
            self._swapped_out(seq, computed)
            return
        self._release(seq)
        self.tokens_recomputed += seq.num_computed
        seq.num_computed = 0
        self._requeue(seq)

    def _swapped_out(self, seq: Sequence, copied: int) -> None:
        """Preempted ``seq`` waits with its KV in its host extent (``copied`` blocks of it
        copied there by this step)."""
        seq.swapped = True
        self._swapped[id(seq)] = seq
        self.num_swapped_out += 1
        self.blocks_swapped_out += copied
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Preempted ``seq`` goes back to the front of the queue."""
        seq.mb = -1
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _host_alloc(self, n: int) -> int | None:
        """A free host extent of ``n`` blocks, or None. When there is none, the extents of
        swapped sequences that left the queue without resuming (dropped by a control
        command) are taken back first."""
        start = self.host.alloc(n)
        if start is None and self._swapped:
            queued = {id(s) for s in self.waiting}
            for key, s in list(self._swapped.items()):
                if key not in queued:
                    del self._swapped[key]
                    self.host.free(s.blocks[0], len(s.blocks))
                    s.blocks = []
                    s.swapped = False
                    s.placement = Placement.RESIDENT
                    s.num_computed = 0
            start = self.host.alloc(n)
        return start

    def _swap_in(self, s: Sequence, mb: int) -> None:
        """Resume swapped ``s`` resident: new blocks for its tokens, its computed blocks
        copied back from its extent (freed once this step of ``mb`` has come back)."""
        host, s.blocks = s.blocks, []
        grown = self.blocks.grow(s.blocks, len(s.token_ids))
        assert grown, "room was checked"
        computed = self.blocks.blocks_for(s.num_computed)
        self._copies_in.extend(zip(host[:computed], s.blocks[:computed]))
        self._freed_after[mb].append((host[0], len(host)))
        self.blocks_swapped_in += computed
        s.placement = Placement.RESIDENT
        s.num_registered = 0                    # (its full blocks are offered as it runs)

    def _free_swapped_in(self, mb: int) -> None:
        """Free the host extents of the sequences that ``mb``'s last step swapped back in, and
        the host tier's slots it read (that step has come back: every stage's copy out of
        them is done)."""
        for start, n in self._freed_after[mb]:
            self.host.free(start, n)
        self._freed_after[mb].clear()
        for slot in self._unpin_after[mb]:
            self.tier.unpin(slot)
        self._unpin_after[mb].clear()

    def _resume(self, s: Sequence, mb: int, where: Placement, n: int) -> None:
        """Swapped ``s`` comes back at ``where`` (resident or offloaded), nothing recomputed."""
        del self._swapped[id(s)]
        s.swapped = False
        s.mb = mb
        if where is Placement.RESIDENT:
            self._swap_in(s, mb)
        elif where is Placement.HOST:           # offloaded: its extent, staged from now on
            grown = self._grow_staged(s, n)
            assert grown, "place() found room for its first step"
            self.num_offloaded_admitted += 1
        else:           # streamed: its extent read in place (one a staging buffer's size
            s.placement = where                 # that was offloaded: not fits_gpu)
            self.streaming[mb] += 1
            self.num_streamed_admitted += 1

    def schedule(self, mb: int) -> StepPlan | None:
        cfg = self.cfg
        self._free_swapped_in(mb)     # (complete() did, unless its last step was dropped)
        if self.selecting:
            self._reselect(mb)
        run = self.running[mb]
        budget = cfg.max_tokens_per_step
        items: list[tuple[Sequence, int]] = []
        i = 0
        while i < len(run) and budget > 0:
            s = run[i]
            n = min(s.remaining, budget)
            if self._make_room(run, s, n):
                items.append((s, n))
                budget -= n
                i += 1
            # else s itself was preempted and left ``run``: run[i] is the next one
        w = 0                       # waiting sequences passed (waiting for a prefix)
        while (w < len(self.waiting) and w < MAX_WAITING_PASSED
               and len(run) < cfg.max_seqs_per_mb and budget > 0):
            s = self.waiting[w]
            hit, fetch = [], []     # cached GPU blocks, host tier slots, of its prompt
            if self.caching and not s.swapped:
                keys = self._shareable_keys(s)
                hit = self.blocks.match(keys)
                if self.tier is not None and len(hit) < len(keys):
                    fetch = self.tier.lookup(keys[len(hit):])[:self._fetch_room()]
                nxt = len(hit) + len(fetch)
                if nxt < len(keys) and self.computing.get(keys[nxt], s) is not s:
                    w += 1          # its next block is being computed: take it from the cache
                    continue
            need = (self.blocks.blocks_for(len(s.token_ids)) - len(hit)
                    + self.blocks.idle_among(hit))           # free room taking it uses
            hh, hf = self._host_prefix(hit, fetch)      # what it maps if offloaded
            h = len(hh) + len(hf)
            c0 = s.num_computed + h * cfg.block_size
            where = place(Admission(
                self._extent(s), need,
                self.blocks.blocks_for(c0 + min(len(s.token_ids) - c0, cfg.max_tokens_per_step))
                - h, self.blocks.num_free, self.watermark, not run, self.staged[mb],
                self.streaming[mb], None if self._budget_left is None else
                self._budget_left - self._cost(len(s.token_ids))), self.room)
            # resident: the whole prompt's blocks are taken now, not the first chunk's, so
            # the other micro-batches cannot take them before its prefill is done
            if s.swapped and where is not None:
                self._resume(s, mb, where, min(s.remaining, budget))
            elif where is Placement.RESIDENT:
                self._admit_resident(s, hit, fetch, mb)
            elif where is None or not self._admit_to_host(
                    s, mb, where, budget, *((hh, hf) if where is Placement.HOST else ([], []))):
                break
            if where is Placement.HOST and self._budget_left is not None:
                self._budget_left -= self._cost(len(s.token_ids))
            del self.waiting[w]
            key = self._first_key(s)
            if key is not None and self._group_tail.get(key) is s:
                del self._group_tail[key]
            n = min(s.remaining, budget)
            s.mb = mb
            run.append(s)
            items.append((s, n))
            budget -= n
        if not items:
            return None
        return self._plan(mb, items)

    # ---- the offload selection (pipemax/selection.py) -----------------------------------
    def _budget(self, short: int, room: int) -> Budget:
        cfg = self.cfg
        return Budget(cfg.step_model or StepModel(1.0, 0.0, 0.0, 0.0), cfg.block_size, room,
                      cfg.staging_blocks, cfg.max_seqs_per_mb, cfg.num_micro_batches, short,
                      overhead_tokens=cfg.block_size)

    def _cost(self, ctx: int) -> float:
        return self._budget(0, 0).cost(ctx)

    def _reselect(self, mb: int) -> None:
        """Re-choose where the decoding sequences of ``mb`` (its last step has come back) run
        next: on the host or the GPU, in ``mb`` or another micro-batch, and carry the moves
        out (copies on this step, like a swap's). Then note ``mb``'s prefetch budget left
        for the sequences it admits."""
        run, P = self.running[mb], Placement
        self._tick += 1
        settle = SETTLE_STEPS * self.cfg.num_micro_batches
        self._moved_at = {k: t for k, t in self._moved_at.items() if self._tick - t < settle}
        cands, seqs = [], {}
        for m, r in enumerate(self.running):
            for s in r:
                movable = (m == mb and s.placement in (P.RESIDENT, P.HOST)
                           and s.remaining == 1 and s.num_computed > 0
                           and not s.gpu_prefix)    # (mapping a cached GPU prefix: stays)
                cands.append(Candidate(id(s), m, s.num_computed + 1,
                                       s.placement is not P.RESIDENT, movable,
                                       recent=id(s) in self._moved_at))
                seqs[id(s)] = s
        grow = sum(max(0, self.blocks.blocks_for(s.num_computed + 1) - len(s.blocks))
                   for s in run if s.placement is P.RESIDENT)
        head = (self.blocks.blocks_for(len(self.waiting[0].token_ids))
                if self.waiting and len(run) < self.cfg.max_seqs_per_mb else 0)
        free = self.blocks.num_free - self.watermark
        held = sum(len(seqs[c.key].blocks) for c in cands if c.movable and not c.on_host)
        b = self._budget(max(0, grow + head - free), held + free)
        where = select(cands, b)
        for c in cands:
            to_mb, host = where[c.key]
            s = seqs[c.key]
            done = False
            if host != c.on_host:       # (its copies ride on this step: it stays in mb)
                done = self._to_host(s) if host else self._to_gpu(s, mb)
            elif to_mb != c.mb:         # (not the others: a move to its own list reorders it)
                done = self._move(s, to_mb)
            if done:
                self._moved_at[c.key] = self._tick
        loads = micro_batch_loads(cands, {id(s): (s.mb, s.placement is not P.RESIDENT)
                               for r in self.running for s in r}, b)
        self._budget_left = b.admission_tokens(loads, mb) - loads[mb].host_cost

    def _to_host(self, s: Sequence) -> bool:
        """Running resident ``s`` keeps its KV in the host pool from this step on: its
        computed blocks copied to a new host extent before the step's prefetch reads them."""
        computed = self.blocks.blocks_for(s.num_computed)
        cap = self.cfg.swap_blocks_per_step
        if cap is not None and len(self._copies_out) + computed > cap:
            return False
        start = self._host_alloc(self._extent(s))
        if start is None:
            return False
        self._copies_out.extend(zip(s.blocks[:computed], range(start, start + computed)))
        self._release_resident(s)
        s.blocks = list(range(start, start + self._extent(s)))
        s.placement = Placement.HOST
        s.staged_blocks = 0
        self.num_to_host += 1
        return True

    def _to_gpu(self, s: Sequence, mb: int) -> bool:
        """Running offloaded ``s`` comes back to GPU blocks (copied from its extent, freed
        once this step of ``mb`` has come back), if they are free beyond the watermark."""
        if self.blocks.blocks_for(len(s.token_ids)) + self.watermark > self.blocks.num_free:
            return False
        self._unstage(s)
        self._swap_in(s, mb)
        self.num_to_gpu += 1
        return True

    def _move(self, s: Sequence, mb: int) -> bool:
        """``s`` runs in micro-batch ``mb`` from now on (nothing is copied), if that one's
        staging buffer has room for it."""
        if s.placement is Placement.HOST:
            if self.staged[mb] + s.staged_blocks + 1 > self.cfg.staging_blocks:
                return False
            self.staged[s.mb] -= s.staged_blocks
            self.staged[mb] += s.staged_blocks
        self.running[s.mb].remove(s)
        self.running[mb].append(s)
        s.mb = mb
        self.num_moved += 1
        return True

    def _admit_resident(self, s: Sequence, hit: list[int], fetch: list[int], mb: int) -> None:
        """Give ``s`` its blocks: the cached ones of ``hit`` shared, the rest of its tokens'
        new, the first of those filled from the host tier's ``fetch``; its computation
        starts after the cached tokens."""
        self.blocks.share(s.blocks, hit)
        grown = self.blocks.grow(s.blocks, len(s.token_ids))
        assert grown, "room was checked"
        self._fetch(s, len(hit), fetch, mb)
        h = len(hit) + len(fetch)
        s.num_computed = s.num_cached = h * self.cfg.block_size
        s.num_registered = h
        if self.caching:
            for k in s.block_keys[h:shareable_blocks(len(s.token_ids), self.cfg.block_size)]:
                self.computing.setdefault(k, s)

    def _fetch(self, s: Sequence, start: int, fetch: list[int], mb: int) -> None:
        """Fill blocks ``start ..`` of ``s`` (new, its own) from the host tier's slots
        ``fetch`` (copied in before the step computes) and cache them on the GPU again."""
        for i, slot in enumerate(fetch):
            b = s.blocks[start + i]
            self._copies_in.append((slot, b))
            self.tier.pin(slot)
            self._unpin_after[mb].append(slot)
            self.blocks.register(s.block_keys[start + i], b)
        self.tier_blocks_in += len(fetch)

    def _fetch_room(self) -> int:
        """Blocks the host tier may still bring back in the step being planned."""
        cap = self.cfg.swap_blocks_per_step
        return len(self.tier) if cap is None else max(0, cap - len(self._copies_in))

    def _host_prefix(self, hit: list[int], fetch: list[int]) -> tuple[list[int], list[int]]:
        """The part of a prompt's cached prefix (GPU ``hit``, host tier ``fetch``) that an
        offloaded admission maps: the GPU blocks it takes from the free room (idle cached
        ones, new ones for the fetched) stay within the room above the watermark."""
        room = self.blocks.num_free - self.watermark
        i = 0
        for b in hit:
            if self.blocks.refs[b] == 0:
                if room <= 0:
                    return hit[:i], []
                room -= 1
            i += 1
        return hit, fetch[:max(0, room)]

    def _register(self, s: Sequence) -> None:
        """Offer the blocks ``s`` has filled to the cache."""
        bs = self.cfg.block_size
        full = s.num_computed // bs
        if full <= s.num_registered:
            return
        keys = extend_keys(s.block_keys, s.token_ids, bs, full)
        for i in range(s.num_registered, full):
            self.blocks.register(keys[i], s.blocks[i])
            if self.computing.get(keys[i]) is s:
                del self.computing[keys[i]]
        s.num_registered = full

    def _make_room(self, run: list[Sequence], s: Sequence, n: int) -> bool:
        """Memory for ``s`` to take ``n`` more tokens, preempting the newest sequences that hold
        the same kind of memory (GPU-resident blocks or staging); False if ``s`` itself went.
        A streamed sequence's extent already covers its whole length."""
        if s.placement is Placement.STREAMED:
            return True
        while not (self._grow_staged(s, n) if s.placement is Placement.HOST else
                   self.blocks.grow(s.blocks, s.num_computed + n)):
            victim = next(x for x in reversed(run) if x.placement is s.placement)
            self._preempt(victim)
            if victim is s:
                return False
        return True

    def _grow_staged(self, s: Sequence, n: int) -> bool:
        """Room in its micro-batch's staging buffer for ``s`` with ``n`` more tokens?"""
        need = self.blocks.blocks_for(s.num_computed + n) - s.gpu_prefix - s.staged_blocks
        if self.staged[s.mb] + need > self.cfg.staging_blocks:
            return False
        self.staged[s.mb] += need
        s.staged_blocks += need
        return True

    def _admit_to_host(self, s: Sequence, mb: int, where: Placement, budget: int,
                       hit: list[int], fetch: list[int]) -> bool:
        """Admit ``s`` into ``mb`` at ``where`` (offloaded or streamed), taking up to
        ``budget`` tokens now, if the host has a free extent for its whole length past the
        cached prefix it maps (offloaded only: GPU ``hit``, host tier ``fetch``); True if it
        did."""
        h = len(hit) + len(fetch)
        whole = self._extent(s) - h
        start = self._host_alloc(whole)
        if start is None:
            return False
        prefix: list[int] = []
        if h:
            self.blocks.share(prefix, hit)
            grown = self.blocks.grow(prefix, h * self.cfg.block_size)
            assert grown, "room was checked"
            s.blocks = prefix
            self._fetch(s, len(hit), fetch, mb)
            self.num_offloaded_cached += 1
        s.blocks = prefix + list(range(start, start + whole))
        s.gpu_prefix = h
        s.mb = mb
        s.placement = where
        s.num_computed = s.num_cached = h * self.cfg.block_size
        s.num_registered = h
        n = min(s.remaining, budget)
        if where is Placement.HOST:
            grown = self._grow_staged(s, n)
            assert grown, "place() found room for the first chunk"
            self.num_offloaded_admitted += 1
        else:
            self.streaming[mb] += 1
            self.num_streamed_admitted += 1
        return True

    def _extent(self, s: Sequence) -> int:
        """Blocks ``s`` needs for its whole length (prompt and every token it may sample)."""
        return self.blocks.blocks_for(len(s.token_ids) + s.params.max_tokens - s.num_output)

    def _plan(self, mb: int, items: list[tuple[Sequence, int]]) -> StepPlan:
        B = len(items)
        q_lens = np.fromiter((n for _, n in items), dtype=np.int32, count=B)
        ctx = np.fromiter((s.num_computed + n for s, n in items), dtype=np.int32, count=B)
        width = max(len(s.blocks) for s, _ in items)
        bt = np.zeros((B, width), dtype=np.int32)
        toks = []
        rows = []
        for r, (s, n) in enumerate(items):
            bt[r, :len(s.blocks)] = s.blocks
            toks.extend(s.token_ids[s.num_computed:s.num_computed + n])
            if s.num_computed + n == len(s.token_ids):
                rows.append(r)
        offl = np.fromiter((s.placement is Placement.HOST for s, _ in items), dtype=bool,
                           count=B)
        streamed = np.fromiter((s.placement is Placement.STREAMED for s, _ in items),
                               dtype=bool, count=B)
        prefix = np.fromiter((s.gpu_prefix if s.placement is Placement.HOST else 0
                              for s, _ in items), dtype=np.int32, count=B)
        self._to_tier()
        pairs = lambda xs: np.asarray(xs, dtype=np.int32).reshape(-1, 2)
        plan = StepPlan(mb, [s for s, _ in items], q_lens, ctx, bt,
                        np.asarray(toks, dtype=np.int64), np.asarray(rows, dtype=np.int64), offl,
                        streamed, pairs(self._copies_out), pairs(self._copies_in), prefix)
        self._copies_out, self._copies_in = [], []
        return plan

    def _to_tier(self) -> None:
        """The cached GPU blocks evicted while planning go to the host tier: copied out before
        the step computes (their new holders write them only in it or later)."""
        if self.tier is None or not self.blocks.evicted:
            return
        cap = self.cfg.swap_blocks_per_step
        for b, key in self.blocks.evicted:
            if cap is not None and len(self._copies_out) >= cap:
                break
            slot = self.tier.put(key)
            if slot is not None:
                self._copies_out.append((b, slot))
                self.tier_blocks_out += 1
        self.blocks.evicted.clear()

    def complete(self, plan: StepPlan, new_tokens: list[int]) -> list[Sequence]:
        """Account for a finished step; returns the sequences that got a new token."""
        self._free_swapped_in(plan.mb)
        for s, n in zip(plan.seqs, plan.q_lens):
            s.num_computed += int(n)
            if self.caching and s.placement is Placement.RESIDENT:
                self._register(s)
        sampled = [plan.seqs[r] for r in plan.sample_rows]
        for s, t in zip(sampled, new_tokens):
            s.token_ids.append(int(t))
        return sampled
