"""What the planner needs to know of the requests: their lengths, read from a sample of them."""
from __future__ import annotations

import itertools
from typing import Iterable

from pipemax.planner import Workload
from pipemax.requests import Parser, Request


def estimate(lines: Iterable[tuple[int, bytes]], parser: Parser, max_model_len: int,
             sample: int = 2000) -> Workload:
    """Mean prompt and output lengths of the first ``sample`` good requests (the parser is a
    fresh one: this pass does not count as having seen their ids)."""
    samples = []
    for index, raw in itertools.islice(lines, sample):
        r = parser.parse(raw, index)
        if isinstance(r, Request):
            n = len(r.prompt_ids)
            samples.append((n, min(r.params.max_tokens, max_model_len - n)))
    if not samples:
        return Workload(1.0, 1.0, 2)
    return Workload.of(samples)
