"""Attention over a block-table KV cache, for any mix of prefill chunks and decode tokens.

A step carries B sequences; sequence b brings ``q_lens[b]`` new tokens and, after the step, has
``ctx_lens[b]`` tokens of context (the new ones included). Tokens are laid out flat ``[N, ...]``
(N = sum of q_lens) for every matmul; only attention needs the per-sequence shape.

KV cache of one stage (block-major, so one block of one sequence is one contiguous run of bytes
across all the stage's layers, which is what offload moves)::

    kv[num_blocks, L_stage, 2 (k|v), block_size, n_kv_heads, head_dim]

``StepLayout`` is everything attention needs, derived once per step from
(q_lens, ctx_lens, block_tables) and shared by all layers of the stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class StepLayout:
    num_seqs: int
    max_q: int
    max_ctx: int
    positions: torch.Tensor       # [N] int64, absolute position of each new token
    write_blocks: torch.Tensor    # [N] int64, cache block the new token's k/v goes to
    write_offsets: torch.Tensor   # [N] int64, slot inside that block
    read_blocks: torch.Tensor     # [B, C] int64, block of context position c of sequence b
    read_offsets: torch.Tensor    # [C] int64
    q_gather: torch.Tensor        # [B, Q] int64, flat token index (N = padding row)
    out_gather: torch.Tensor      # [N] int64, index into the [B*Q] padded layout
    mask: torch.Tensor | None     # [B, Q, C] bool, True where a query may attend; None: decode with no padding
    last_index: torch.Tensor      # [B] int64, flat index of each sequence's last new token


def build_layout(q_lens: np.ndarray, ctx_lens: np.ndarray, block_tables: np.ndarray,
                 block_size: int, device: torch.device) -> StepLayout:
    q_lens = np.asarray(q_lens, dtype=np.int64)
    ctx_lens = np.asarray(ctx_lens, dtype=np.int64)
    bt = np.asarray(block_tables, dtype=np.int64)
    B = len(q_lens)
    N = int(q_lens.sum())
    Q = int(q_lens.max())
    C = int(ctx_lens.max())
    starts = ctx_lens - q_lens
    cu = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    seq_of = np.repeat(np.arange(B), q_lens)
    offs = np.arange(N) - cu[seq_of]
    positions = starts[seq_of] + offs
    write_blocks = bt[seq_of, positions // block_size]
    write_offsets = positions % block_size
    c = np.arange(C)
    read_blocks = bt[:, np.minimum(c // block_size, bt.shape[1] - 1)]
    read_offsets = c % block_size
    q_gather = np.full((B, Q), N, dtype=np.int64)
    q_gather[seq_of, offs] = np.arange(N)
    out_gather = seq_of * Q + offs
    if Q == 1 and bool((ctx_lens == C).all()):
        mask = None
    else:
        qpos = starts[:, None] + np.arange(Q)[None, :]                       # [B, Q]
        m = (c[None, None, :] <= qpos[:, :, None]) & (c[None, None, :] < ctx_lens[:, None, None])
        mask = torch.from_numpy(m).to(device)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return StepLayout(B, Q, C, t(positions), t(write_blocks), t(write_offsets), t(read_blocks),
                      t(read_offsets), t(q_gather), t(out_gather), mask, t(cu[1:] - 1))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                    layer: int, lay: StepLayout, scale: float) -> torch.Tensor:
    """Write the step's k/v into the cache, then attend. q [N, H, D]; k, v [N, KVH, D].

    Returns [N, H*D]. Batched over sequences: no Python loop over them.
    """
    N, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    B, Q, C = lay.num_seqs, lay.max_q, lay.max_ctx
    kc = kv[:, layer, 0]      # [nb, bs, KVH, D] view
    vc = kv[:, layer, 1]
    kc[lay.write_blocks, lay.write_offsets] = k
    vc[lay.write_blocks, lay.write_offsets] = v
    K = kc[lay.read_blocks, lay.read_offsets]          # [B, C, KVH, D]
    V = vc[lay.read_blocks, lay.read_offsets]
    K = K.permute(0, 2, 1, 3)                           # [B, KVH, C, D]
    V = V.permute(0, 2, 1, 3)
    if Q == 1 and N == B:
        qp = q.view(B, KVH, G, D)                       # rows are the G query heads of each kv head
        mask = None if lay.mask is None else lay.mask.view(B, 1, 1, C)
    else:
        qpad = torch.cat([q, q.new_zeros(1, H, D)])[lay.q_gather]            # [B, Q, H, D]
        qp = qpad.view(B, Q, KVH, G, D).permute(0, 2, 3, 1, 4).reshape(B, KVH, G * Q, D)
        mask = lay.mask[:, None, None].expand(B, 1, G, Q, C).reshape(B, 1, G * Q, C)
    o = F.scaled_dot_product_attention(qp, K, V, attn_mask=mask, scale=scale)  # [B, KVH, G*Q, D]
    if Q == 1 and N == B:
        return o.reshape(B, H * D)
    o = o.view(B, KVH, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B * Q, H * D)
    return o[lay.out_gather]
