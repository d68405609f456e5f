"""Split the model's layers over pipeline stages.

Stages are balanced by the weight bytes each reads per decode step (its layers, plus the lm_head
on the last stage; the embedding is a lookup and reads only a few rows), since in decode every
stage streams its weights once per step: equal bytes mean equal step times and no bubbles.
"""
from __future__ import annotations

from pipemax.model_config import ModelConfig


def split_layers(cfg: ModelConfig, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, one per stage, minimising the largest stage."""
    L = cfg.num_layers
    if num_stages > L:
        raise ValueError(f"{num_stages} stages need at least {num_stages} layers; "
                         f"the model has {L}")
    layer = cfg.layer_params()
    head = cfg.head_params()

    def cost(stage: int, start: int, end: int) -> int:
        return (end - start) * layer + (head if stage == num_stages - 1 else 0)

    # best[s][e]: smallest possible max cost placing layers [0, e) on stages 0..s
    INF = float("inf")
    best = [[INF] * (L + 1) for _ in range(num_stages)]
    cut = [[0] * (L + 1) for _ in range(num_stages)]
    for e in range(1, L + 1):
        best[0][e] = cost(0, 0, e)
    for s in range(1, num_stages):
        for e in range(s + 1, L + 1):
            for b in range(s, e):
                v = max(best[s - 1][b], cost(s, b, e))
                if v < best[s][e]:
                    best[s][e], cut[s][e] = v, b
    ranges = []
    e = L
    for s in range(num_stages - 1, 0, -1):
        b = cut[s][e]
        ranges.append((b, e))
        e = b
    ranges.append((0, e))
    return ranges[::-1]
