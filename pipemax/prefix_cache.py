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
        return True

    def park(self, block: int) -> None:
        """The last holder of cached ``block`` let it go: idle, the most recently used."""
        self.idle[block] = None

    def take(self, block: int) -> None:
        """Idle cached ``block`` gets a holder again."""
        del self.idle[block]

    def evict(self) -> int:
        """Forget the least recently used idle block and hand it out."""
        block, _ = self.idle.popitem(last=False)
        del self.block_of[self.key_of.pop(block)]
        self.evictions += 1
        return block


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
