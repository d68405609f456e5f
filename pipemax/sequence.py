"""A request while it is being served: its tokens, how many of them are in the KV cache, its blocks."""
from __future__ import annotations

import numpy as np

from pipemax.placement import Placement
from pipemax.requests import SEED_MODULUS, Request


class Sequence:
    def __init__(self, req: Request, seed: int):
        """``seed``: any integer; the generator is keyed by ``seed mod 2**64`` (so a negative
        int64 seed is its two's-complement pattern). The sampling values are converted here
        to the types the driver sends (float32, int64), so a value they cannot hold fails
        this one request, not a whole step."""
        self.req = req
        self.params = req.params
        self.token_ids: list[int] = list(req.prompt_ids)
        self.num_prompt = len(req.prompt_ids)
        self.num_computed = 0          # tokens whose KV is in the cache
        self.blocks: list[int] = []    # GPU block ids, or its host extent (placement.on_host)
        self.placement = Placement.RESIDENT   # where its KV lives (pipemax/placement.py)
        self.staged_blocks = 0         # staging blocks its context takes (offloaded only)
        self.gpu_prefix = 0            # offloaded: its first blocks are cached GPU blocks
        self.swapped = False           # preempted, waiting: its computed KV is in its host extent
        self.mb = -1                   # micro-batch it runs in; -1 while waiting
        self.rng = np.random.Generator(np.random.Philox(int(seed) % SEED_MODULUS))
        p = req.params
        self.temperature = np.float32(p.temperature)
        self.top_p = np.float32(p.top_p)
        self.top_k = np.int64(p.top_k)
        self.logprobs: list | None = [] if req.params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.detok = None              # its IncrementalDetokenizer, when the run has a tokenizer
        self.num_preemptions = 0
        # prefix caching (pipemax/prefix_cache.py)
        self.block_keys: list[bytes] = []   # keys of its full blocks of tokens, as far as known
        self.num_registered = 0        # of its blocks, those offered to the cache
        self.num_cached = 0            # tokens its latest admission took from the cache

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def remaining(self) -> int:
        """Tokens to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed
