"""Paged-attention DECODE kernel in Triton (one query token per sequence), flash-decoding style.

Reads K and V straight out of the stage's block-table cache::

    kv[num_blocks, L_stage, 2 (k|v), block_size, n_kv_heads, head_dim]

so a decode step moves each context byte once (the torch path in ``attention._attend`` first
gathers every sequence's context into a padded [B, KVH, C, D] copy: ~3x the bytes).

Work split: one program per (sequence, kv head, context chunk). A program loads the G = H/KVH
query heads that share its kv head, walks its chunk BLOCK_N tokens at a time (block-table
lookup per token, so any block_size works and a tile may span several cache blocks), and keeps
an online softmax (running max, sum, fp32 accumulator) for the G heads at once, so each K/V
tile is loaded once for all of them. With one chunk the program writes the output itself;
with several, each writes (log-sum-exp, normalised partial output) and a second small kernel
merges the chunks of each (sequence, head). Chunks past a sequence's end return at once.

The chunk count is picked on the host from (B, KVH, max_ctx, number of SMs) only: no device
value is read, so a launch is CUDA-graph capturable for fixed shapes and fixed max_ctx.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except Exception:                       # pragma: no cover - no triton: torch path only
    triton = None
    tl = None
    _HAVE_TRITON = False

# Tunables (see the report in the module's benchmark; picked on an H100).
BLOCK_N = 64          # context tokens per inner-loop tile
NUM_WARPS = 4
NUM_STAGES = 2
MIN_CHUNK = 256       # never split the context into chunks shorter than this many tokens
MAX_CHUNK = 4096      # ... nor leave chunks longer than this (keeps long-context batches balanced)
WAVES = 4             # aim for B*KVH*splits >= WAVES * number of SMs
MAX_SPLITS = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str) -> bool:
    """True when paged_decode can run on ``device`` compiled (CUDA with triton)."""
    device = torch.device(device)
    return _HAVE_TRITON and device.type == "cuda" and torch.cuda.is_available()


if _HAVE_TRITON:

    @triton.jit
    def _decode_kernel(
        Q, KV, BT, CTX, OUT, LSE, ACC,
        kv_base,                                   # element offset of kv[0, layer, 0, 0, 0, 0]
        s_blk, s_kv, s_tok, s_head, s_d,           # kv strides (elements)
        s_bt,                                      # block_tables row stride
        s_qb, s_qh,                                # q strides (d stride is 1)
        chunk,                                     # tokens per split (a multiple of BLOCK_N)
        qk_scale,                                  # scale * log2(e)
        NUM_SPLITS,
        G: tl.constexpr, G_PAD: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr,
        BS: tl.constexpr, BLOCK: tl.constexpr,
        USE_DOT: tl.constexpr, IEEE: tl.constexpr, DIRECT: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        ctx = tl.load(CTX + b)
        start = sp * chunk
        if start < ctx:
            end = tl.minimum(start + chunk, ctx)
            offs_g = tl.arange(0, G_PAD)
            offs_d = tl.arange(0, D_PAD)
            offs_n = tl.arange(0, BLOCK)
            mask_g = offs_g < G
            mask_d = offs_d < D
            heads = kvh * G + offs_g
            q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :],
                        mask=mask_g[:, None] & mask_d[None, :], other=0.0)
            if not USE_DOT:
                q = q.to(tl.float32)
            m_i = tl.full([G_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([G_PAD], tl.float32)
            acc = tl.zeros([G_PAD, D_PAD], tl.float32)
            k_ptr = KV + kv_base + kvh * s_head
            v_ptr = k_ptr + s_kv
            bt_row = BT + b.to(tl.int64) * s_bt
            d_off = offs_d[None, :] * s_d
            for n0 in range(start, end, BLOCK):
                pos = n0 + offs_n
                mask_n = pos < end
                blk = tl.load(bt_row + pos // BS, mask=mask_n, other=0).to(tl.int64)
                tok = blk * s_blk + (pos % BS) * s_tok                       # [BLOCK] int64
                kv_mask = mask_n[:, None] & mask_d[None, :]
                k = tl.load(k_ptr + tok[:, None] + d_off, mask=kv_mask, other=0.0)
                if USE_DOT:
                    if IEEE:
                        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
                    else:
                        qk = tl.dot(q, tl.trans(k))
                else:
                    qk = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
                qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))  # [G_PAD, BLOCK]
                m_new = tl.maximum(m_i, tl.max(qk, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(qk - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(v_ptr + tok[:, None] + d_off, mask=kv_mask, other=0.0)
                if USE_DOT:
                    if IEEE:
                        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
                    else:
                        pv = tl.dot(p.to(v.dtype), v)
                else:
                    pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
            acc = acc / l_i[:, None]
            omask = mask_g[:, None] & mask_d[None, :]
            if DIRECT:
                o_ptr = OUT + (b * (G * tl.num_programs(1)) + heads)[:, None] * D + offs_d[None, :]
                tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=omask)
            else:
                row = (b * (G * tl.num_programs(1)) + heads) * NUM_SPLITS + sp   # [G_PAD]
                tl.store(ACC + row[:, None] * D + offs_d[None, :], acc, mask=omask)
                tl.store(LSE + row, m_i + tl.log2(l_i), mask=mask_g)

    @triton.jit
    def _combine_kernel(OUT, LSE, ACC, CTX, chunk, NUM_SPLITS,
                        D: tl.constexpr, D_PAD: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        row0 = (b * tl.num_programs(1) + h) * NUM_SPLITS
        n = tl.cdiv(tl.load(CTX + b), chunk)           # splits that hold tokens (>= 1)
        offs_d = tl.arange(0, D_PAD)
        mask_d = offs_d < D
        m = tl.load(LSE + row0)
        acc = tl.load(ACC + row0 * D + offs_d, mask=mask_d, other=0.0)
        s = tl.zeros_like(m) + 1.0
        for i in range(1, n):
            lse = tl.load(LSE + row0 + i)
            a = tl.load(ACC + (row0 + i) * D + offs_d, mask=mask_d, other=0.0)
            m_new = tl.maximum(m, lse)
            c_old = tl.exp2(m - m_new)
            c_new = tl.exp2(lse - m_new)
            acc = acc * c_old + a * c_new
            s = s * c_old + c_new
            m = m_new
        tl.store(OUT + (b * tl.num_programs(1) + h) * D + offs_d, (acc / s).to(OUT.dtype.element_ty),
                 mask=mask_d)


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_splits(B: int, KVH: int, max_ctx: int, num_sms: int) -> tuple[int, int]:
    """(splits, chunk): chunk a multiple of BLOCK_N, splits * chunk >= max_ctx."""
    max_ctx = max(1, max_ctx)
    most = max(1, min(MAX_SPLITS, -(-max_ctx // MIN_CHUNK)))           # chunks >= MIN_CHUNK
    least = -(-max_ctx // MAX_CHUNK)                                    # chunks <= MAX_CHUNK
    want = -(-WAVES * num_sms // max(1, B * KVH))                       # fill the SMs
    splits = max(1, min(most, max(want, least)))
    chunk = -(-max_ctx // splits)
    chunk = -(-chunk // BLOCK_N) * BLOCK_N
    splits = -(-max_ctx // chunk)
    return splits, chunk


def paged_decode(q: torch.Tensor, kv: torch.Tensor, layer: int, block_tables: torch.Tensor,
                 ctx_lens: torch.Tensor, scale: float, max_ctx: int | None = None, *,
                 splits: int | None = None) -> torch.Tensor:
    """Decode attention over the paged cache: q [B, H, D] -> [B, H*D] (q's dtype).

    kv: the stage's cache [nb, L, 2, bs, KVH, D]; block_tables [B, max_blocks] int32/int64;
    ctx_lens [B] (>= 1 each, <= max_blocks * bs). ``max_ctx``: host-known bound on ctx_lens
    (default: max_blocks * bs). ``splits``: force the number of context chunks (tests/tuning).
    No host synchronisation; capturable in a CUDA graph for fixed shapes and max_ctx.
    """
    assert _HAVE_TRITON, "triton is not installed"
    B, H, D = q.shape
    nb, L, two, bs, KVH, Dk = kv.shape
    assert two == 2 and Dk == D and H % KVH == 0, (q.shape, kv.shape)
    assert bs & (bs - 1) == 0, "block_size must be a power of two"
    G = H // KVH
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(B, H * D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if max_ctx is None:
        max_ctx = block_tables.shape[1] * bs
    if block_tables.dtype not in (torch.int32, torch.int64):
        block_tables = block_tables.to(torch.int32)
    if ctx_lens.dtype not in (torch.int32, torch.int64):
        ctx_lens = ctx_lens.to(torch.int32)
    if splits is None:
        n_split, chunk = plan_splits(B, KVH, max_ctx, _num_sms(q.device))
    else:
        chunk = -(-max(1, max_ctx) // splits)
        chunk = -(-chunk // BLOCK_N) * BLOCK_N
        n_split = -(-max(1, max_ctx) // chunk)
    direct = n_split == 1
    if direct:
        lse = acc = out          # unused
    else:
        lse = torch.empty(B * H * n_split, dtype=torch.float32, device=q.device)
        acc = torch.empty(B * H * n_split * D, dtype=torch.float32, device=q.device)
    use_dot = G >= 2          # MHA (G == 1): elementwise products, no padding to 16 rows
    G_PAD = max(16, _pow2(G)) if use_dot else _pow2(G)
    s = kv.stride()
    _decode_kernel[(B, KVH, n_split)](
        q, kv, block_tables, ctx_lens, out, lse, acc,
        layer * s[1], s[0], s[2], s[3], s[4], s[5],
        block_tables.stride(0), q.stride(0), q.stride(1),
        chunk, scale * math.log2(math.e), n_split,
        G=G, G_PAD=G_PAD, D=D, D_PAD=_pow2(D), BS=bs, BLOCK=BLOCK_N,
        USE_DOT=use_dot, IEEE=q.dtype == torch.float32, DIRECT=direct,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if not direct:
        _combine_kernel[(B, H)](out, lse, acc, ctx_lens, chunk, n_split,
                                D=D, D_PAD=_pow2(D), num_warps=1 if D <= 64 else 2)
    return out


def _bench() -> None:                          # pragma: no cover - CUDA only
    import argparse
    from triton.testing import do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also sweep splits")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "the benchmark needs CUDA"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    H, KVH, D, bs, dt = 32, 8, 128, 16, torch.bfloat16
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    print(f"Llama-3-8B decode layer: H={H} KVH={KVH} D={D} bf16 block_size={bs}")
    for B, ctx in ((128, 640), (256, 2048), (8, 8192), (1, 32768)):
        nbs = -(-ctx // bs)
        nb = B * nbs + 16
        L = 2
        kv = torch.randn(nb, L, 2, bs, KVH, D, device=dev, dtype=dt)
        bt = torch.randperm(nb - 16, device=dev)[:B * nbs].view(B, nbs).to(torch.int32)
        cl = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(B, H, D, device=dev, dtype=dt)
        sc = D ** -0.5
        nbytes = B * ctx * KVH * D * 2 * kv.element_size() + 2 * q.numel() * q.element_size()
        options = [None] + ([1, 2, 4, 8, 16] if args.sweep else [])
        for sp in options:
            f = lambda: paged_decode(q, kv, 1, bt, cl, sc, ctx, splits=sp)
            ms = do_bench(f, warmup=50, rep=300, return_mode="median")
            n_split = plan_splits(B, KVH, ctx, _num_sms(dev))[0] if sp is None else sp
            print(f"B={B:4d} ctx={ctx:6d} splits={n_split:3d}{'*' if sp is None else ' '} "
                  f"{ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s  ({nbytes / 1e6:.0f} MB)")
        if B * ctx <= 256 * 2048:       # compare with the torch gather + SDPA path
            from stages.attention import _attend, build_layout
            import numpy as np
            lay = build_layout(np.ones(B, np.int64), np.full(B, ctx), bt.cpu().numpy(), bs, dev)
            f = lambda: _attend(q, kv[:, 1, 0], kv[:, 1, 1], lay.decode, sc)
            ms = do_bench(f, warmup=20, rep=200, return_mode="median")
            print(f"B={B:4d} ctx={ctx:6d} torch gather+SDPA  {ms * 1e3:8.1f} us  "
                  f"{nbytes / ms / 1e6:7.0f} GB/s")
        del kv


if __name__ == "__main__":
    _bench()
