"""What the planner needs to know of the requests: their lengths, read from a sample of them,
and (with prefix caching) how much of their prompts the cache would serve."""
from __future__ import annotations

import itertools
from typing import Iterable

import dataclasses

from pipemax.planner import Workload
from pipemax.prefix_cache import cached_tokens
from pipemax.requests import Parser, Request


def estimate(lines: Iterable[tuple[int, bytes]], parser: Parser, max_model_len: int,
             sample: int = 2000, block_size: int = 0) -> Workload:
    """Mean prompt and output lengths of the first ``sample`` good requests (the parser is a
    fresh one: this pass does not count as having seen their ids); with ``block_size`` (prefix
    caching on) the prompt tokens per request a cache of blocks that size would serve."""
    samples = []
    prompts = []
    for index, raw in itertools.islice(lines, sample):
        r = parser.parse(raw, index)
        if isinstance(r, Request):
            n = len(r.prompt_ids)
            samples.append((n, min(r.params.max_tokens, max_model_len - n)))
            if block_size:
                prompts.append(r.prompt_ids)
    if not samples:
        return Workload(1.0, 1.0, 2)
    wl = Workload.of(samples)
    if not block_size:
        return wl
    hit, shared = cached_tokens(prompts, block_size)
    return dataclasses.replace(wl, cached_prompt=hit / len(samples), cached_blocks=shared)
