"""KV block allocation, owned by the driver: which cache block holds which tokens of a sequence.

Every stage has the same number of blocks (the minimum of what each can hold), so one block id
means the same slot on every stage; a stage only ever writes where the driver's plan says.
"""
from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError("the KV cache has no blocks")
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
