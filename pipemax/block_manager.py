"""KV block allocation, owned by the driver: which cache block holds which tokens of a sequence.

Every stage has the same number of blocks (the minimum of what each can hold), so one block id
means the same slot on every stage; a stage only ever writes where the driver's plan says.
"""
from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 0:
            raise ValueError("a negative number of KV blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, blocks: list[int], num_tokens: int) -> bool:
        """Extend ``blocks`` in place to cover ``num_tokens``; False (and no change) if short."""
        need = self.blocks_for(num_tokens) - len(blocks)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        for _ in range(need):
            blocks.append(self._free.pop())
        return True

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
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
        self.used -= n
        free = self._free
        lo, hi = 0, len(free)
        while lo < hi:                       # keep the list sorted by start
            mid = (lo + hi) // 2
            if free[mid][0] < start:
                lo = mid + 1
            else:
                hi = mid
        free.insert(lo, (start, n))
        if lo + 1 < len(free) and free[lo][0] + free[lo][1] == free[lo + 1][0]:
            free[lo] = (start, n + free[lo + 1][1])
            del free[lo + 1]
        if lo > 0 and free[lo - 1][0] + free[lo - 1][1] == free[lo][0]:
            free[lo - 1] = (free[lo - 1][0], free[lo - 1][1] + free[lo][1])
            del free[lo]
