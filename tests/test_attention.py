"""Paged attention against dense causal attention, for a step mixing decode tokens, fresh
prompts and continued prompt chunks, with blocks scattered over the cache."""
import numpy as np
import pytest
import torch

from pipemax.stages.attention import build_layout, paged_attention


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


MIXED = [9, 7, 3, 12, 6]    # context after the step: rows 3 and 4 continue earlier chunks
FRESH = [9, 7, 3, 5, 3]     # every prompt chunk is a whole fresh prompt


def make_step(seed, dtype=torch.float32, device="cpu", ctx=MIXED, D=8):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    H, KVH, bs, L = 4, 2, 4, 2
    q_lens = np.array([1, 7, 1, 5, 3], dtype=np.int64)       # decode, fresh, decode, continued x2
    ctx_lens = np.array(ctx, dtype=np.int64)
    width = -(-int(ctx_lens.max()) // bs)
    nb = len(q_lens) * width + 3
    perm = rng.permutation(nb)
    bt = perm[:len(q_lens) * width].reshape(len(q_lens), width)
    N = int(q_lens.sum())
    kv, q, k, v = (torch.randn(*shape, generator=g).to(device, dtype) for shape in
                   [(nb, L, 2, bs, KVH, D), (N, H, D), (N, KVH, D), (N, KVH, D)])
    lay = build_layout(q_lens, ctx_lens, bt, bs, torch.device(device))
    return q_lens, ctx_lens, bt, bs, kv, q, k, v, lay


@pytest.mark.parametrize("ctx", [MIXED, FRESH])
@pytest.mark.parametrize("seed", range(4))
def test_mixed_step_matches_dense_attention(seed, ctx):
    q_lens, ctx_lens, bt, bs, kv, q, k, v, lay = make_step(seed, ctx=ctx)
    layer, scale = 1, q.shape[-1] ** -0.5
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash path is CUDA-only")
@pytest.mark.parametrize("ctx", [MIXED, FRESH])
@pytest.mark.parametrize("seed", range(4))
def test_varlen_prefill_matches_the_per_sequence_path_on_cuda(seed, ctx):
    q_lens, ctx_lens, bt, bs, kv, q, k, v, lay = make_step(seed, torch.bfloat16, "cuda", ctx, D=64)
    assert lay.prefill.cu_q is not None
    layer, scale = 1, q.shape[-1] ** -0.5
    fused = paged_attention(q, k, v, kv.clone(), layer, lay, scale)
    lay.prefill.cu_q = None                 # the per-sequence SDPA path
    loop = paged_attention(q, k, v, kv.clone(), layer, lay, scale)
    torch.testing.assert_close(fused, loop, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("seed", range(4))
def test_streamed_rows_read_and_write_the_host_pool(seed):
    """Streamed sequences (a decode, a fresh prompt, a continued chunk) keep their KV in the
    host pool: their k/v land there, attention reads it there, the cache is left alone."""
    q_lens, ctx_lens, bt, bs, kv, q, k, v, _ = make_step(seed)
    streamed = np.array([False, True, True, True, False])
    host = torch.randn(kv.shape, generator=torch.Generator().manual_seed(seed + 100))
    lay = build_layout(q_lens, ctx_lens, bt, bs, torch.device("cpu"), streamed, host)
    assert lay.host is not None and lay.host.decode is not None and lay.host.prefill is not None
    layer, scale = 1, q.shape[-1] ** -0.5
    gpu_before, host_before = kv.clone(), host.clone()
    out = paged_attention(q, k, v, kv, layer, lay, scale)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    for b in range(len(q_lens)):
        c, m = int(ctx_lens[b]), int(q_lens[b])
        blocks = torch.as_tensor(bt[b, :-(-c // bs)])
        mem, other, other_before = (host, kv, gpu_before) if streamed[b] else (kv, host, host_before)
        K = mem[blocks, layer, 0].flatten(0, 1)[:c]
        V = mem[blocks, layer, 1].flatten(0, 1)[:c]
        sl = slice(int(cu[b]), int(cu[b + 1]))
        assert torch.equal(K[c - m:], k[sl]) and torch.equal(V[c - m:], v[sl])   # written
        written = other[blocks, layer].flatten(1, 2)[:, :, :c]
        assert torch.equal(written, other_before[blocks, layer].flatten(1, 2)[:, :, :c])
        torch.testing.assert_close(out[sl], dense(q[sl], K, V, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pool's device mapping is CUDA-only")
@pytest.mark.parametrize("seed", range(3))
def test_streamed_rows_through_the_registered_pool_on_cuda(seed, run_id):
    """On CUDA the kernels (Triton decode, varlen flash prefill, the k/v writes) read and write
    the registered host pool in place: the same results, bit for bit, as over a GPU copy."""
    import posix_ipc
    from pipemax.ipc.names import shm_name
    from pipemax.stages.offload import HostPool
    q_lens, ctx_lens, bt, bs, kv, q, k, v, _ = make_step(seed, torch.bfloat16, "cuda", D=64)
    name = shm_name(run_id, "hostkv0")
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=kv.numel() * kv.element_size())
    shm.close_fd()
    pool = HostPool(name, tuple(kv.shape), torch.bfloat16, pin=True)
    try:
        pool.data.copy_(torch.randn(kv.shape, generator=torch.Generator().manual_seed(seed)))
        view = pool.device_view(torch.device("cuda"))
        assert view.is_cuda and view.data_ptr() == pool.data.data_ptr()
        copy = pool.data.to("cuda")
        streamed = np.array([False, True, True, True, False])
        layer, scale = 1, q.shape[-1] ** -0.5
        outs = []
        for host in (view, copy):
            lay = build_layout(q_lens, ctx_lens, bt, bs, torch.device("cuda"), streamed, host)
            outs.append(paged_attention(q, k, v, kv.clone(), layer, lay, scale))
        torch.cuda.synchronize()
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(pool.data, copy.cpu())       # the writes landed in the pool
    finally:
        view = None
        pool.close()
        posix_ipc.unlink_shared_memory(name)
