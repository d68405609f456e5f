"""Token sampling on the last stage, batched, with per-row parameters.

Randomness comes from the driver: each row brings one uniform number ``u`` drawn from its
request's own generator, so a seeded request samples the same token alone or in any batch.
Sampling is inverse-CDF over the temperature-scaled, top-k / top-p filtered distribution,
sorted by probability (ties broken by token id), so it is a pure function of (logits, params, u).
Logprobs are those of the raw distribution (before temperature), like OpenAI's. A row whose
scaled distribution is not finite (a temperature so small that logits / t overflows; the parser
makes those greedy, pipemax/requests.py) takes the greedy token: a NaN never chooses one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleOut:
    token_ids: torch.Tensor   # [n] int64
    logprobs: torch.Tensor    # [n] float32, logprob of the chosen token
    top_ids: torch.Tensor     # [n, k] int64 (k = 0 when no row asked for logprobs)
    top_logprobs: torch.Tensor  # [n, k] float32


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           top_k: torch.Tensor, u: torch.Tensor, num_top: int, *,
           all_greedy: bool | None = None) -> SampleOut:
    """logits [n, V] float32; temperature, top_p, u float32 [n]; top_k int64 [n] (0 = off).

    ``all_greedy``: whether every row is greedy, if the caller knows it (saves a device sync).
    """
    n, V = logits.shape
    greedy = temperature <= 0
    token = logits.argmax(dim=-1)
    if all_greedy is None:
        all_greedy = bool(greedy.all())
    if not all_greedy:
        t = torch.where(greedy, torch.ones_like(temperature), temperature)
        probs, order = torch.sort(torch.softmax(logits / t[:, None], dim=-1), dim=-1,
                                  descending=True, stable=True)
        rank = torch.arange(V, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
        keep = rank < k[:, None]
        before = torch.cumsum(probs, dim=-1) - probs          # mass of strictly better tokens
        keep &= before < top_p[:, None]
        keep[:, 0] = True
        probs = probs * keep
        cdf = torch.cumsum(probs, dim=-1)
        greedy = greedy | ~torch.isfinite(cdf[:, -1]) | (cdf[:, -1] <= 0)
        target = (u * cdf[:, -1]).unsqueeze(1)
        idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
        idx = torch.minimum(idx, keep.sum(dim=-1) - 1)        # kept tokens are a prefix
        sampled = order.gather(1, idx[:, None]).squeeze(1)
        token = torch.where(greedy, token, sampled)
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, token[:, None]).squeeze(1)
    if num_top > 0:
        top_lp, top_ids = logp.topk(num_top, dim=-1)
    else:
        top_lp = logp.new_empty(n, 0)
        top_ids = token.new_empty(n, 0)
    return SampleOut(token, chosen, top_ids, top_lp)
