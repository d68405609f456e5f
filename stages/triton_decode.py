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

An fp8 cache (stages/kv_quant.py) is read as bytes and converted in registers to the query's
dtype (exact: e4m3 values fit in 16 bits); its per-(layer, K|V, head) scales are constant in a
program, so the K scale is folded into the softmax scale and the V scale into the output, and
the scales are read from a device tensor (updated in place: graphs see the current ones).

The chunk count is picked on the host from (B, KVH, max_ctx, number of SMs) only: no device
value is read, so a launch is CUDA-graph capturable for fixed shapes and fixed max_ctx.
"""
from __future__ import annotations

import math

import torch

from pipemax.stages.triton_import import HAVE_TRITON as _HAVE_TRITON, tl, triton

# Tunables, picked on an H100 (python -m pipemax.stages.triton_decode --tune): with these, the
# Llama-3-8B shapes read K/V at 2.6-2.9 TB/s. BLOCK_N 32..128, num_warps 2..4 and num_stages
# 3..4 are all within ~2% of each other; num_stages 1-2 lose up to 10% on split contexts.
BLOCK_N = 64          # context tokens per inner-loop tile
NUM_WARPS = 4
NUM_STAGES = 3
MIN_CHUNK = 256       # never split the context into chunks shorter than this many tokens
MAX_CHUNK = 4096      # ... nor leave chunks longer than this (keeps long-context batches balanced)
WAVES = 2             # aim for B*KVH*splits >= WAVES * number of SMs (more only adds combine work)
MAX_SPLITS = 128


def _interpreted() -> bool:
    """The kernels were built by Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return _HAVE_TRITON and type(_decode_kernel).__name__ == "InterpretedFunction"


def available(device: torch.device | str) -> bool:
    """True when paged_decode can run on ``device`` compiled (CUDA with triton)."""
    device = torch.device(device)
    return (_HAVE_TRITON and device.type == "cuda" and torch.cuda.is_available()
            and not _interpreted())


MAX_HEAD_DIM = 256


def unsupported(head_dim: int, block_size: int, dtype: torch.dtype,
                device: torch.device | str, kv_dtype: torch.dtype | None = None) -> str | None:
    """Why paged_decode cannot take this shape on ``device`` (None: it can). Head sizes under
    16 are padded to 16 (``tl.dot`` needs K >= 16) and others to a power of two; whether the
    tiles of a large head fit the device's shared memory only a launch tells
    (``pipemax.stages.attention.decode_path`` tries one)."""
    if not available(device):
        return "no compiled Triton on this device"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the kernel has no {dtype} path"
    if kv_dtype not in (None, dtype, torch.float8_e4m3fn):
        return f"the kernel has no {kv_dtype} cache path"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is over the kernel's {MAX_HEAD_DIM}"
    if block_size & (block_size - 1):
        return f"block_size {block_size} is not a power of two"
    return None


def _d_pad(D: int) -> int:
    """The head size the kernel's tiles use: a power of two, at least 16 (tl.dot's least K)."""
    return max(16, _pow2(D))


if _HAVE_TRITON:

    @triton.jit
    def _kv_tile(ptr, mask, Q, QUANT: tl.constexpr, DOT_F32: tl.constexpr):
        """A [BLOCK, D_PAD] tile of K or V, in the dtype the dot takes (an fp8 cache's bytes
        converted to the queries' dtype; its scale is applied outside the loop)."""
        x = tl.load(ptr, mask=mask, other=0.0)
        if QUANT:
            x = x.to(Q.dtype.element_ty)
        if DOT_F32:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _decode_kernel(
        Q, KV, BT, CTX, OUT, LSE, ACC, KV_SCALE,   # KV_SCALE: [L, 2, KVH] float32 (QUANT)
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
        IEEE: tl.constexpr, DIRECT: tl.constexpr,
        DOT_F32: tl.constexpr,                     # interpreter only: its bf16/fp16 dot is wrong
        QUANT: tl.constexpr,                       # fp8 cache: convert, and apply KV_SCALE
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
            if DOT_F32:
                q = q.to(tl.float32)
            if QUANT:                                 # this program's (layer, head) scales
                k_s = tl.load(KV_SCALE + kvh)
                v_s = tl.load(KV_SCALE + tl.num_programs(1) + kvh)
                qk_scale = qk_scale * k_s
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
                k = _kv_tile(k_ptr + tok[:, None] + d_off, kv_mask, Q, QUANT, DOT_F32)
                if IEEE or DOT_F32:
                    qk = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    qk = tl.dot(q, tl.trans(k))
                qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))  # [G_PAD, BLOCK]
                m_new = tl.maximum(m_i, tl.max(qk, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(qk - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = _kv_tile(v_ptr + tok[:, None] + d_off, kv_mask, Q, QUANT, DOT_F32)
                if IEEE or DOT_F32:
                    pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
            acc = acc / l_i[:, None]
            if QUANT:
                acc = acc * v_s
            omask = mask_g[:, None] & mask_d[None, :]
            if DIRECT:
                o_ptr = OUT + (b * (G * tl.num_programs(1)) + heads)[:, None] * D + offs_d[None, :]
                tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=omask)
            else:
                row = (b * (G * tl.num_programs(1)) + heads) * NUM_SPLITS + sp   # [G_PAD]
                tl.store(ACC + row[:, None] * D + offs_d[None, :], acc, mask=omask)
                tl.store(LSE + row, m_i + tl.log2(l_i), mask=mask_g)
        else:
            if DIRECT:                                 # ctx == 0 (a padding row): zeros
                offs_g = tl.arange(0, G_PAD)
                offs_d = tl.arange(0, D_PAD)
                heads = kvh * G + offs_g
                o_ptr = OUT + (b * (G * tl.num_programs(1)) + heads)[:, None] * D + offs_d[None, :]
                tl.store(o_ptr, tl.zeros([G_PAD, D_PAD], OUT.dtype.element_ty),
                         mask=(offs_g < G)[:, None] & (offs_d < D)[None, :])

    @triton.jit
    def _combine_kernel(OUT, LSE, ACC, CTX, chunk, NUM_SPLITS,
                        D: tl.constexpr, D_PAD: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        row0 = (b * tl.num_programs(1) + h) * NUM_SPLITS
        n = tl.minimum(tl.cdiv(tl.load(CTX + b), chunk), NUM_SPLITS)   # splits holding tokens
        offs_d = tl.arange(0, D_PAD)
        mask_d = offs_d < D
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        acc = tl.zeros([D_PAD], tl.float32)
        for i in range(0, n):
            lse = tl.load(LSE + row0 + i)
            a = tl.load(ACC + (row0 + i) * D + offs_d, mask=mask_d, other=0.0)
            m_new = tl.maximum(m, lse)
            c_old = tl.exp2(m - m_new)
            c_new = tl.exp2(lse - m_new)
            acc = acc * c_old + a * c_new
            s = s * c_old + c_new
            m = m_new
        o = acc / tl.where(s > 0, s, 1.0)             # ctx == 0 (a padding row): zeros
        tl.store(OUT + (b * tl.num_programs(1) + h) * D + offs_d, o.to(OUT.dtype.element_ty),
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
                 out: torch.Tensor | None = None, splits: int | None = None,
                 kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over the paged cache: q [B, H, D] -> [B, H*D] (q's dtype).

    kv: the stage's cache [nb, L, 2, bs, KVH, D] (q's dtype, or float8_e4m3fn with
    ``kv_scale`` [L, 2, KVH] float32 on the device: value = fp8 * scale); block_tables
    [B, max_blocks] int32/int64 (entries past a sequence's blocks are never read);
    ctx_lens [B] int32/int64, each in [0, max_ctx] (0: a padding row, output zeros).
    ``max_ctx``: host-known upper bound of ctx_lens (default max_blocks * bs); it sizes the
    split grid: a ctx_len above it is NOT fully attended. ``out``: optional contiguous
    [B, H*D] destination. ``splits``: force the number of context chunks (tests/tuning).
    No host synchronisation; capturable in a CUDA graph for fixed shapes and max_ctx.
    """
    assert _HAVE_TRITON, "triton is not installed"
    B, H, D = q.shape
    nb, L, two, bs, KVH, Dk = kv.shape
    assert two == 2 and Dk == D and H % KVH == 0, (q.shape, kv.shape)
    quant = kv.dtype == torch.float8_e4m3fn
    assert kv.dtype == q.dtype or (quant and kv_scale is not None), (q.dtype, kv.dtype)
    if quant:
        assert kv_scale.shape == (L, 2, KVH) and kv_scale.dtype == torch.float32, kv_scale.shape
        kv_scale = kv_scale.contiguous()
    assert bs & (bs - 1) == 0, "block_size must be a power of two"
    G = H // KVH
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(B, H * D, dtype=q.dtype, device=q.device)
    else:
        assert out.shape == (B, H * D) and out.dtype == q.dtype and out.is_contiguous()
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
    G_PAD = max(16, _pow2(G))     # tl.dot wants >= 16 rows; padded heads are masked
    s = kv.stride()
    _decode_kernel[(B, KVH, n_split)](
        q, kv, block_tables, ctx_lens, out, lse, acc,
        kv_scale[layer] if quant else ctx_lens,
        layer * s[1], s[0], s[2], s[3], s[4], s[5],
        block_tables.stride(0), q.stride(0), q.stride(1),
        chunk, scale * math.log2(math.e), n_split,
        G=G, G_PAD=G_PAD, D=D, D_PAD=_d_pad(D), BS=bs, BLOCK=BLOCK_N,
        IEEE=q.dtype == torch.float32, DIRECT=direct, DOT_F32=_interpreted(), QUANT=quant,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if not direct:
        _combine_kernel[(B, H)](out, lse, acc, ctx_lens, chunk, n_split,
                                D=D, D_PAD=_d_pad(D), num_warps=1 if D <= 64 else 2)
    return out


def _bench() -> None:                          # pragma: no cover - CUDA only
    import argparse
    import itertools
    from triton.testing import do_bench
    g = globals()
    ap = argparse.ArgumentParser(description="paged_decode timings (CUDA)")
    ap.add_argument("--tune", action="store_true",
                    help="sweep BLOCK_N x num_warps x num_stages and forced split counts")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "the benchmark needs CUDA"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    H, KVH, D, bs, dt = 32, 8, 128, 16, torch.bfloat16
    print(f"{torch.cuda.get_device_name()} ({_num_sms(dev)} SMs)  triton {triton.__version__}  "
          f"torch {torch.__version__}")
    print(f"Llama-3-8B decode, one layer: H={H} KVH={KVH} D={D} bf16 block_size={bs}; "
          f"GB/s = K+V bytes of the contexts (+q, out) / time")
    shapes = [(128, 640), (256, 2048), (32, 4096), (1, 32768)]
    default = (BLOCK_N, NUM_WARPS, NUM_STAGES)
    if args.tune:                 # other head layouts: MHA (G=1, padded to 16 rows), G=8
        for h, kvh in ((32, 32), (64, 8)):
            B, ctx = 128, 640
            kv = torch.randn(B * 40, 2, 2, bs, kvh, D, device=dev, dtype=dt)
            bt = torch.randperm(B * 40, device=dev).view(B, 40).to(torch.int32)
            cl = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            q = torch.randn(B, h, D, device=dev, dtype=dt)
            ms = do_bench(lambda: paged_decode(q, kv, 1, bt, cl, 0.1, ctx), warmup=25, rep=150,
                          return_mode="median")
            nbytes = B * ctx * kvh * D * 2 * 2
            print(f"H={h} KVH={kvh} B={B} ctx={ctx}: {ms * 1e3:.1f} us {nbytes / ms / 1e6:.0f} GB/s")
            del kv
    for B, ctx in shapes:
        nbs = -(-ctx // bs)
        nb = B * nbs + 16
        kv = torch.randn(nb, 2, 2, bs, KVH, D, device=dev, dtype=dt)
        bt = torch.randperm(nb, device=dev)[:B * nbs].view(B, nbs).to(torch.int32)
        cl = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(B, H, D, device=dev, dtype=dt)
        sc = D ** -0.5
        nbytes = B * ctx * KVH * D * 2 * kv.element_size() + 2 * q.numel() * q.element_size()

        def run(label, sp=None):
            f = lambda: paged_decode(q, kv, 1, bt, cl, sc, ctx, splits=sp)
            ms = do_bench(f, warmup=25, rep=150, return_mode="median")
            n_split = plan_splits(B, KVH, ctx, _num_sms(dev))[0] if sp is None else sp
            print(f"B={B:4d} ctx={ctx:6d} splits={n_split:3d}{'*' if sp is None else ' '} {label:18s}"
                  f"{ms * 1e3:9.1f} us {nbytes / ms / 1e6:7.0f} GB/s", flush=True)
            return ms

        ref = paged_decode(q, kv, 1, bt, cl, sc, ctx).float()
        run(f"bn{BLOCK_N} w{NUM_WARPS} s{NUM_STAGES}")
        if args.tune:
            for sp in (1, 2, 3, 4, 8, 16, 32):
                if sp * MIN_CHUNK // 2 <= ctx:
                    run("forced", sp)
            best = []
            for bn, w, st in itertools.product((32, 64, 128), (2, 4), (3, 4)):
                g["BLOCK_N"], g["NUM_WARPS"], g["NUM_STAGES"] = bn, w, st
                try:
                    o = paged_decode(q, kv, 1, bt, cl, sc, ctx).float()
                    err = ((o - ref).norm() / ref.norm()).item()
                    best.append((run(f"bn{bn} w{w} s{st} e{err:.0e}"), bn, w, st))
                except Exception as e:
                    print(f"bn{bn} w{w} s{st}: {type(e).__name__}: {str(e)[:100]}")
            g["BLOCK_N"], g["NUM_WARPS"], g["NUM_STAGES"] = default
            best.sort()
            print("best:", [(f"{m * 1e3:.1f}us", bn, w, st) for m, bn, w, st in best[:4]])
        if B * ctx <= 256 * 2048:       # the torch gather + SDPA path it replaces
            try:
                from pipemax.stages.attention import paged_decode_torch
                f = lambda: paged_decode_torch(q, kv, 1, bt, cl, sc, ctx)
                o = f().float()
                err = ((o - ref).norm() / ref.norm()).item()
                ms = do_bench(f, warmup=10, rep=100, return_mode="median")
                print(f"B={B:4d} ctx={ctx:6d} torch gather+SDPA (diff {err:.1e})    "
                      f"{ms * 1e3:9.1f} us {nbytes / ms / 1e6:7.0f} GB/s")
            except Exception as e:
                print(f"torch path not timed: {type(e).__name__}: {e}")
        del kv


if __name__ == "__main__":
    _bench()
