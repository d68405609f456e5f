"""KV block allocation, owned by the driver: which cache block holds which tokens of a sequence.

Every stage has the same number of blocks (the minimum of what each can hold), so one block id
means the same slot on every stage; a stage only ever writes where the driver's plan says.
"""
from __future__ import annotations

from pipemax.prefix_cache import PrefixCache


class BlockManager:
    """GPU blocks with reference counts: a block is held by every sequence whose table names
    it (more than one only for a prefix-cache block, pipemax/prefix_cache.py). A released
    block goes back to the free list, or, if it is cached, stays cached and idle until a
    new block is needed and no free one is left (the least recently used goes first)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False,
                 keep_evicted: bool = False):
        if num_blocks < 0:
            raise ValueError("a negative number of KV blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() hands out low ids first
        self.refs = [0] * num_blocks
        self.cache = PrefixCache() if prefix_caching else None
        # (block, key) of the cached blocks evicted since the owner last took them that were
        # hits while cached (only with ``keep_evicted``: the scheduler copies them to the host
        # tier)
        self.keep_evicted = keep_evicted
        self.evicted: list[tuple[int, bytes]] = []

    @property
    def num_free(self) -> int:
        """Blocks a sequence may take: free ones and idle cached ones."""
        return len(self._free) + (len(self.cache.idle) if self.cache is not None else 0)

    @property
    def num_idle_cached(self) -> int:
        return len(self.cache.idle) if self.cache is not None else 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, blocks: list[int], num_tokens: int) -> bool:
        """Extend ``blocks`` in place to cover ``num_tokens``; False (and no change) if short."""
        need = self.blocks_for(num_tokens) - len(blocks)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            if self._free:
                b = self._free.pop()
            else:
                b, key, reused = self.cache.evict()
                if self.keep_evicted and reused:
                    self.evicted.append((b, key))
            self.refs[b] = 1
            blocks.append(b)
        return True

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of ``keys`` (no reference taken)."""
        return self.cache.lookup(keys) if self.cache is not None else []

    def idle_among(self, hit: list[int]) -> int:
        """How many of ``hit`` (cached blocks) no sequence holds: taking them uses free room."""
        return sum(1 for b in hit if self.refs[b] == 0)

    def share(self, blocks: list[int], hit: list[int]) -> None:
        """Start ``blocks`` (empty) with the cached blocks ``hit``, one more reference each."""
        assert not blocks
        for b in hit:
            if self.refs[b] == 0:
                self.cache.take(b)
            self.cache.mark_reused(b)
            self.refs[b] += 1
            blocks.append(b)

    def register(self, key: bytes, block: int) -> None:
        """Cache held, full ``block`` under ``key`` (a no-op if the key is cached already)."""
        assert self.refs[block] > 0
        self.cache.insert(key, block)

    def release(self, blocks: list[int]) -> None:
        """Drop one reference on each of ``blocks`` (last first: a sequence's tail is the
        first of its cached blocks to be evicted) and clear the list."""
        cached = self.cache.key_of if self.cache is not None else {}
        for b in reversed(blocks):
            self.refs[b] -= 1
            assert self.refs[b] >= 0, "a block released more often than taken"
            if self.refs[b] == 0:
                if b in cached:
                    self.cache.park(b)
                else:
                    self._free.append(b)
        blocks.clear()


class ExtentAllocator:
    """Host KV blocks handed out as one contiguous extent per sequence (first fit), so that a
    sequence's KV moves in one copy each way per step."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: list[tuple[int, int]] = [(0, num_blocks)] if num_blocks > 0 else []
        self.used = 0

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.used

    def alloc(self, n: int) -> int | None:
        """Start of a free extent of ``n`` blocks, or None."""
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                self.used += n
                return start
        return None

    def free(self, start: int, n: int) -> None:
        """Give back an extent that ``alloc`` handed out (freeing one twice raises)."""
        free = self._free
        lo, hi = 0, len(free)
        while lo < hi:                       # keep the list sorted by start
            mid = (lo + hi) // 2
            if free[mid][0] < start:
                lo = mid + 1
            else:
                hi = mid
        if (lo > 0 and free[lo - 1][0] + free[lo - 1][1] > start
                or lo < len(free) and free[lo][0] < start + n):
            raise AssertionError(f"host extent ({start}, {n}) freed but not in use")
        self.used -= n
        free.insert(lo, (start, n))
        if lo + 1 < len(free) and free[lo][0] + free[lo][1] == free[lo + 1][0]:
            free[lo] = (start, n + free[lo + 1][1])
            del free[lo + 1]
        if lo > 0 and free[lo - 1][0] + free[lo - 1][1] == free[lo][0]:
            free[lo - 1] = (free[lo - 1][0], free[lo - 1][1] + free[lo][1])
            del free[lo]
