"""Paged attention against dense causal attention, for a step mixing decode tokens, fresh
prompts and continued prompt chunks, with blocks scattered over the cache."""
import numpy as np
import pytest
import torch

from stages.attention import build_layout, paged_attention


def dense(q, k, v, scale):
    """q [m, H, D] the last m queries over k, v [c, KVH, D], causal, aligned to the end."""
    m, H, _ = q.shape
    c, KVH, _ = k.shape
    G = H // KVH
    K, V = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.einsum("mhd,chd->hmc", q, K) * scale
    allowed = torch.arange(c)[None, :] <= (c - m + torch.arange(m))[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hmc,chd->mhd", s.softmax(-1), V).reshape(m, -1)


@pytest.mark.parametrize("seed", range(4))
def test_mixed_step_matches_dense_attention(seed):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    H, KVH, D, bs, L = 4, 2, 8, 4, 2
    q_lens = np.array([1, 7, 1, 5, 3], dtype=np.int64)       # decode, fresh, decode, continued x2
    ctx_lens = np.array([9, 7, 3, 12, 6], dtype=np.int64)
    width = -(-int(ctx_lens.max()) // bs)
    nb = len(q_lens) * width + 3
    perm = rng.permutation(nb)
    bt = perm[:len(q_lens) * width].reshape(len(q_lens), width)
    kv = torch.randn(nb, L, 2, bs, KVH, D, generator=g)
    N = int(q_lens.sum())
    q = torch.randn(N, H, D, generator=g)
    k = torch.randn(N, KVH, D, generator=g)
    v = torch.randn(N, KVH, D, generator=g)
    layer, scale = 1, D ** -0.5
    lay = build_layout(q_lens, ctx_lens, bt, bs, torch.device("cpu"))
    out = paged_attention(q, k, v, kv, layer, lay, scale)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    for b in range(len(q_lens)):
        c, m = int(ctx_lens[b]), int(q_lens[b])
        blocks = torch.as_tensor(bt[b, :-(-c // bs)])
        K = kv[blocks, layer, 0].flatten(0, 1)[:c]
        V = kv[blocks, layer, 1].flatten(0, 1)[:c]
        sl = slice(int(cu[b]), int(cu[b + 1]))
        assert torch.equal(K[c - m:], k[sl]) and torch.equal(V[c - m:], v[sl])   # written
        torch.testing.assert_close(out[sl], dense(q[sl], K, V, scale), atol=1e-5, rtol=1e-5)
