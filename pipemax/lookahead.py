"""The order requests are admitted in: a look-ahead window of requests read from the input,
handed to the scheduler's waiting queue one at a time (pure, no I/O).

A batch file is known in advance, so the engine reads ahead of what the scheduler needs
(``window`` requests, many times the sequences that run at once) and hands them over in the
policy's order:

- ``longest`` (the default): the one with the most tokens left to sample first (its
  ``max_tokens``, within the model's length). A batch ends when its last sequence does; with
  the long ones started first, the sequences left at the end are short ones, and the drain,
  where the micro-batches run nearly empty, is short. (Simulated on 8 x rtx4090, llama3-70b,
  the chat mix: 1.29x fcfs with offload on, 1.14x with it off; docs/benchmarks.md.)
- ``fcfs``: the input's order (the window is only what the scheduler's queue takes).

Nothing else changes with the order: a request's seed is drawn when it is read, in the
input's order (pipemax/engine.py ``prepare``); results are written as they finish, in any
order, and a resume skips the custom_ids answered, wherever they were in the file.
"""
from __future__ import annotations

import heapq

from pipemax.sequence import Sequence

POLICIES = ("longest", "fcfs")


def output_left(s: Sequence, max_model_len: int) -> int:
    """Tokens ``s`` may still sample."""
    return max(0, min(s.params.max_tokens - s.num_output, max_model_len - len(s.token_ids)))


class Lookahead:
    """Requests read and not yet handed to the scheduler, in the policy's order."""

    def __init__(self, policy: str, max_model_len: int):
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, "
                             f"got {policy!r}")
        self.policy = policy
        self.max_model_len = max_model_len
        self._heap: list[tuple[int, int, Sequence]] = []
        self._n = 0                          # pushes so far: ties go in input order
        self.tokens = 0                      # prompt tokens held (the driver's memory)

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, s: Sequence) -> None:
        key = -output_left(s, self.max_model_len) if self.policy == "longest" else 0
        heapq.heappush(self._heap, (key, self._n, s))
        self._n += 1
        self.tokens += len(s.token_ids)

    def pop(self) -> Sequence:
        s = heapq.heappop(self._heap)[2]
        self.tokens -= len(s.token_ids)
        return s

    def remove(self, custom_id: str) -> Sequence | None:
        """Take out the request with this custom_id (a cancel), if it is here."""
        for i, (_, _, s) in enumerate(self._heap):
            if s.req.custom_id == custom_id:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                self.tokens -= len(s.token_ids)
                return s
        return None

    def clear(self) -> int:
        """Drop every request held (a drain, an abandoned job); how many there were."""
        n = len(self._heap)
        self._heap.clear()
        self.tokens = 0
        return n
