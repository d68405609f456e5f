"""The prefix cache: full KV blocks found by their content, so that sequences whose prompts
begin alike share the blocks of that beginning, computed once.

A full block's key is a hash of (the key of the block before it, its tokens), so one key names
a whole prefix: two sequences whose i-th block keys are equal have the same first (i+1) blocks
of tokens. Only full blocks are cached and a cached block is never written again (the tokens
after it go to blocks of the sequence's own), so a block can be shared by any number of
sequences. A block no sequence holds any more stays cached, *idle*, until its room is needed:
the least recently released goes first.

Pure bookkeeping, no I/O: the block manager (pipemax/block_manager.py) owns the block ids and
their reference counts; the scheduler decides when a block is full.

With KV offload on, the host pool is the cache's second tier (``HostTier``): an idle cached
GPU block evicted for room that was a hit while cached (mapped by a sequence other than the
one that computed it: a shared prefix, not a request's unique part) is copied, with its key, into a slot of the host pool's own region
for the tier (least recently used slots go first when it is full), and a later sequence whose
prompt reaches that key gets a new GPU block filled by a host -> GPU copy instead of
computing it. A key brought back stays in the tier too (its slot still holds the tokens), so
the next eviction of the same prefix copies nothing.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Iterable, Sequence


def extend_keys(keys: list[bytes], tokens: Sequence[int], block_size: int,
                num_blocks: int | None = None) -> list[bytes]:
    """Extend ``keys`` (those of the first ``len(keys)`` full blocks of ``tokens``) to the
    first ``num_blocks`` blocks (default: every full block of ``tokens``), in place; returns
    ``keys``."""
    parent = keys[-1] if keys else b""
    top = len(tokens) // block_size if num_blocks is None else num_blocks
    for i in range(len(keys), top):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


def shareable_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks of a sequence of ``num_tokens`` tokens that may come from the cache: full blocks
    before its last token, which is always computed (its step samples the next one)."""
    return max(0, num_tokens - 1) // block_size


class PrefixCache:
    def __init__(self):
        self.block_of: dict[bytes, int] = {}     # key -> block holding those tokens
        self.key_of: dict[int, bytes] = {}       # block -> its key
        self.idle: OrderedDict[int, None] = OrderedDict()   # cached, no holder: LRU first
        self.reused: set[int] = set()            # cached blocks a later sequence has mapped
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.key_of)

    def lookup(self, keys: Iterable[bytes]) -> list[int]:
        """The blocks of the longest run of ``keys`` (from the first) that are cached."""
        out = []
        for k in keys:
            b = self.block_of.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def insert(self, key: bytes, block: int) -> bool:
        """Cache ``block`` (full, held) under ``key``; False if that key is cached already
        (another sequence computed the same tokens: ``block`` stays its holder's own)."""
        if key in self.block_of or block in self.key_of:
            return False
        self.block_of[key] = block
        self.key_of[block] = key
        self.reused.discard(block)
        return True

    def mark_reused(self, block: int) -> None:
        """A sequence other than the one that computed it maps cached ``block`` (a hit)."""
        self.reused.add(block)

    def park(self, block: int) -> None:
        """The last holder of cached ``block`` let it go: idle, the most recently used."""
        self.idle[block] = None

    def take(self, block: int) -> None:
        """Idle cached ``block`` gets a holder again."""
        del self.idle[block]

    def evict(self) -> tuple[int, bytes, bool]:
        """Forget the least recently used idle block and hand it out, with the key it had and
        whether it was ever a hit (only those are worth keeping in a second tier: a block no
        later prompt mapped while it was cached, a request's unique part, is rarely wanted)."""
        block, _ = self.idle.popitem(last=False)
        key = self.key_of.pop(block)
        del self.block_of[key]
        reused = block in self.reused
        self.reused.discard(block)
        self.evictions += 1
        return block, key, reused


class HostTier:
    """The second tier: keys of evicted GPU blocks and the host slots holding their tokens.

    Slots are host block ids ``base .. base + num_slots - 1``. A slot a step is reading
    (``pin``, for a copy back to the GPU) is not reused until that step is done (``unpin``);
    the others are kept least recently used first and the first of them goes when a new key
    needs a slot and none is free."""

    def __init__(self, base: int, num_slots: int):
        self.base, self.num_slots = base, num_slots
        self.slot_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()   # held, not pinned: LRU first
        self.pins: dict[int, int] = {}                      # slot -> steps reading it
        self._free = list(range(base + num_slots - 1, base - 1, -1))
        self.stored = 0          # keys copied in
        self.dropped = 0         # keys forgotten for room

    def __len__(self) -> int:
        return len(self.key_of)

    def lookup(self, keys: Iterable[bytes]) -> list[int]:
        """The slots of the longest run of ``keys`` (from the first) that the tier holds."""
        out = []
        for k in keys:
            s = self.slot_of.get(k)
            if s is None:
                break
            out.append(s)
        return out

    def put(self, key: bytes) -> int | None:
        """A slot to copy the block of ``key`` into (the tier holds it from now on); None if
        the tier holds the key already (nothing to copy) or every slot is pinned."""
        if key in self.slot_of:
            self.touch(self.slot_of[key])
            return None
        if self._free:
            slot = self._free.pop()
        elif self.lru:
            slot, _ = self.lru.popitem(last=False)
            del self.slot_of[self.key_of.pop(slot)]
            self.dropped += 1
        else:
            return None
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.lru[slot] = None
        self.stored += 1
        return slot

    def touch(self, slot: int) -> None:
        if slot in self.lru:
            self.lru.move_to_end(slot)

    def pin(self, slot: int) -> None:
        """A step reads ``slot``: it stays until ``unpin``."""
        self.pins[slot] = self.pins.get(slot, 0) + 1
        self.lru.pop(slot, None)

    def unpin(self, slot: int) -> None:
        n = self.pins[slot] - 1
        if n:
            self.pins[slot] = n
        else:
            del self.pins[slot]
            self.lru[slot] = None          # the most recently used


def cached_tokens(prompts: Iterable[Sequence[int]], block_size: int) -> tuple[int, int]:
    """(prompt tokens an unbounded cache would serve, distinct blocks served from the
    cache: the shared prefixes') when ``prompts`` run in this order: what the
    planner counts (pipemax/workload.py)."""
    seen: set[bytes] = set()
    shared: set[bytes] = set()
    hit = 0
    for p in prompts:
        keys = extend_keys([], p, block_size, shareable_blocks(len(p), block_size))
        i = 0
        while i < len(keys) and keys[i] in seen:
            i += 1
        hit += i * block_size
        shared.update(keys[:i])
        seen.update(keys)
    return hit, len(shared)
