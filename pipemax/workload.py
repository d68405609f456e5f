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
    prompts, outputs, longest = [], [], 0
    for index, raw in itertools.islice(lines, sample):
        r = parser.parse(raw, index)
        if isinstance(r, Request):
            n, m = len(r.prompt_ids), min(r.params.max_tokens, max_model_len - len(r.prompt_ids))
            prompts.append(n)
            outputs.append(m)
            longest = max(longest, n + m)
    if not prompts:
        return Workload(1.0, 1.0, 2)
    return Workload(sum(prompts) / len(prompts), sum(outputs) / len(outputs), longest)
