"""Attention over a block-table KV cache, for any mix of prefill chunks and decode tokens.

A step carries B sequences; sequence b brings ``q_lens[b]`` new tokens and, after the step, has
``ctx_lens[b]`` tokens of context (the new ones included). Tokens are laid out flat ``[N, ...]``
(N = sum of q_lens) for every matmul; only attention needs the per-sequence shape, and it
splits the step in two groups so that neither pays for the other's shape:

- decode: sequences bringing one token; batched as [B_d, 1 query] over their context;
- prefill: sequences bringing a chunk of prompt; causal attention aligned to the end of each
  context: on CUDA in 16-bit all chunks in one variable-length flash call, elsewhere one
  sequence at a time (a step holds a few).

KV cache of one stage (block-major, so one block of one sequence is one contiguous run of bytes
across all the stage's layers, which is what offload moves)::

    kv[num_blocks, L_stage, 2 (k|v), block_size, n_kv_heads, head_dim]

``StepLayout`` is everything attention needs, derived once per step from
(q_lens, ctx_lens, block_tables) and shared by all layers of the stage.

Streamed sequences (too long for the GPU's blocks and for a staging buffer, pipemax/scheduler.py)
keep their KV in the host pool, which has the same layout: their rows of the block table hold
host block ids, their k/v are written there and attention reads it in place (on CUDA through
the pool's device mapping, over PCIe). They form the layout's ``host`` part, with its own
groups; every other sequence's KV is in the stage's cache.

With an fp8 cache (stages/kv_quant.py: ``KVQuant``, one scale per layer, K|V and KV head) the
writes quantize, the decode paths read fp8 and dequantize (the Triton kernel in registers), and
prompt chunks attend over the dequantized values, their own new K/V included.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipemax.stages import triton_decode, triton_fused
from pipemax.stages.kv_quant import FP8, KVQuant, dequantize, quantize
from pipemax.stages.transfer import to_device


@dataclass
class Group:
    """One attention group (decode or prefill) of a step."""
    tokens: torch.Tensor | None   # [n] flat token indices of the group (None: all N, in order)
    num_seqs: int
    max_q: int
    max_ctx: int
    spans: list | None = None           # prefill: (first token, count, context) per sequence
    blocks: torch.Tensor | None = None  # prefill with earlier context: [B, W] int64 block table
    # prefill on CUDA, all sequences in one variable-length flash call (see _prefill_varlen)
    cu_q: torch.Tensor | None = None    # [B+1] int32, where each sequence's queries start
    cu_k: torch.Tensor | None = None    # [B+1] int32, where each sequence's context starts
    k_blocks: torch.Tensor | None = None   # [sum ctx] int64, cache block of each context token
    k_offsets: torch.Tensor | None = None  # [sum ctx] int64 (None with k_blocks: fresh prompts)
    table: torch.Tensor | None = None   # decode: [B, W] int32 block table
    ctx: torch.Tensor | None = None     # decode: [B] int32 context lengths
    kernel: bool = False                # decode: the Triton kernel (else the torch path)


@dataclass
class HostPart:
    """The streamed sequences of a step: their KV is in the host pool ``kv``."""
    kv: torch.Tensor              # the host pool [H, L_stage, 2, bs, KVH, D] (device view on CUDA)
    tokens: torch.Tensor          # [n] flat indices of their tokens
    write_blocks: torch.Tensor    # [n] host block of each of those tokens' k/v
    write_offsets: torch.Tensor   # [n]
    decode: Group | None
    prefill: Group | None


@dataclass
class StepLayout:
    positions: torch.Tensor       # [N] int64, absolute position of each new token
    write_blocks: torch.Tensor    # [N] int64 (or [write_tokens]), cache block of the k/v
    write_offsets: torch.Tensor   # [N] int64, slot inside that block
    last_index: torch.Tensor      # [B] int64, flat index of each sequence's last new token
    decode: Group | None
    prefill: Group | None
    write_tokens: torch.Tensor | None = None   # the tokens whose k/v go to the cache (None: all)
    host: HostPart | None = None               # streamed sequences, if any


def _group(rows: np.ndarray, tok: np.ndarray, q_lens: np.ndarray, ctx_lens: np.ndarray,
           bt: np.ndarray, N: int, t, block_size: int, varlen: bool, kernel: bool) -> Group:
    q = q_lens[rows]
    ctx = ctx_lens[rows]
    B, Q, C = len(rows), int(q.max()), int(ctx.max())
    tokens = None if len(tok) == N and bool((tok == np.arange(N)).all()) else t(tok)
    if Q == 1:   # decode reads the cache through the block table itself (paged_decode)
        return Group(tokens, B, 1, C, table=t(bt[rows].astype(np.int32)),
                     ctx=t(ctx.astype(np.int32)), kernel=kernel)
    starts = np.zeros(B, dtype=np.int64)
    np.cumsum(q[:-1], out=starts[1:])
    fresh = bool((ctx == q).all())    # no earlier context: the step's own k/v are all of it
    g = Group(tokens, B, Q, C, spans=list(zip(starts.tolist(), q.tolist(), ctx.tolist())),
              blocks=None if fresh else t(bt[rows]))
    if varlen:
        cu_q = np.concatenate([[0], np.cumsum(q)])
        cu_k = np.concatenate([[0], np.cumsum(ctx)])
        g.cu_q, g.cu_k = t(cu_q.astype(np.int32)), t(cu_k.astype(np.int32))
        if not fresh:
            seq_k = np.repeat(np.arange(B), ctx)
            pos_k = np.arange(int(cu_k[-1])) - cu_k[seq_k]
            g.k_blocks = t(bt[rows][seq_k, pos_k // block_size])
            g.k_offsets = t(pos_k % block_size)
    return g


def build_layout(q_lens: np.ndarray, ctx_lens: np.ndarray, block_tables: np.ndarray,
                 block_size: int, device: torch.device, streamed: np.ndarray | None = None,
                 host_kv: torch.Tensor | None = None, *,
                 decode_kernel: bool | None = None) -> StepLayout:
    """The step's layout; rows marked ``streamed`` have their KV in ``host_kv``.
    ``decode_kernel``: decode through the Triton kernel (a stage decides once at start, see
    ``decode_path``; None: wherever a compiled Triton runs)."""
    if decode_kernel is None:
        decode_kernel = triton_decode.available(device)
    q_lens = np.asarray(q_lens, dtype=np.int64)
    ctx_lens = np.asarray(ctx_lens, dtype=np.int64)
    bt = np.asarray(block_tables, dtype=np.int64)
    B = len(q_lens)
    N = int(q_lens.sum())
    cu = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    seq_of = np.repeat(np.arange(B), q_lens)
    positions = (ctx_lens - q_lens)[seq_of] + np.arange(N) - cu[seq_of]
    t = lambda a: to_device(a, device)
    varlen = device.type == "cuda"
    on_host = (np.zeros(B, dtype=bool) if streamed is None or host_kv is None
               else np.asarray(streamed, dtype=bool))

    def part(rows_mask: np.ndarray):
        """(token indices, write blocks, write offsets, decode group, prefill group)."""
        tok = np.flatnonzero(rows_mask[seq_of])
        dec = np.flatnonzero(rows_mask & (q_lens == 1))
        pre = np.flatnonzero(rows_mask & (q_lens > 1))
        pos = positions[tok]
        return (tok, t(bt[seq_of[tok], pos // block_size]), t(pos % block_size),
                _group(dec, cu[dec], q_lens, ctx_lens, bt, N, t, block_size, False,
                       decode_kernel) if len(dec) else None,
                _group(pre, np.flatnonzero(rows_mask[seq_of] & (q_lens[seq_of] > 1)), q_lens,
                       ctx_lens, bt, N, t, block_size, varlen, False) if len(pre) else None)

    tok, wb, wo, dec, pre = part(~on_host)
    lay = StepLayout(t(positions), wb, wo, t(cu[1:] - 1), dec, pre)
    if on_host.any():
        lay.write_tokens = t(tok)
        htok, hwb, hwo, hdec, hpre = part(on_host)
        lay.host = HostPart(host_kv, t(htok), hwb, hwo, hdec, hpre)
    return lay


def paged_decode(q: torch.Tensor, kv: torch.Tensor, layer: int, table: torch.Tensor,
                 ctx: torch.Tensor, scale: float, max_ctx: int, kernel: bool,
                 quant: KVQuant | None = None) -> torch.Tensor:
    """Decode attention (one query per sequence) through block tables: q [B, H, D] -> [B, H*D].

    The Triton kernel when ``kernel`` (see ``decode_path``); else the same function in torch
    (gather, then SDPA). Rows with ctx 0 (padding) give zeros. All inputs are device tensors:
    capturable in a graph. An fp8 ``kv`` comes with its ``quant`` scales.
    """
    kv_scale = quant.scale if quant is not None else None
    if kernel:
        return triton_decode.paged_decode(q, kv, layer, table, ctx, scale, max_ctx=max_ctx,
                                          kv_scale=kv_scale)
    return paged_decode_torch(q, kv, layer, table, ctx, scale, max_ctx, kv_scale)


def decode_path(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, device: torch.device,
                kv_dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Which decode attention a stage runs, decided once at start: (use the Triton kernel,
    what to tell the user). The kernel must be compiled for this device and take the shape
    (``triton_decode.unsupported``), and then it is run once at the model's own head layout,
    block size and dtype, on a direct and a split context, against the torch path: a kernel
    that fails to build (say, too little shared memory for a large head) or disagrees leaves
    the stage on the torch path, and the plan line says why. ``kv_dtype``: the cache's
    (fp8, or None: the model's dtype)."""
    kv_dtype = kv_dtype or dtype
    why = triton_decode.unsupported(head_dim, block_size, dtype, device, kv_dtype)
    if why is None:
        why = _probe(num_heads, num_kv_heads, head_dim, block_size, dtype, device, kv_dtype)
    if why is None:
        return True, "triton kernel"
    return False, f"torch ({why})"


def _probe(H: int, KVH: int, D: int, bs: int, dtype: torch.dtype,
           device: torch.device, kv_dtype: torch.dtype) -> str | None:
    g = torch.Generator(device="cpu").manual_seed(0)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    quant = None
    if kv_dtype == FP8:     # scales unlike 1 and unlike each other, as a run's are
        quant = KVQuant.make(1, KVH, device, 2.0 ** torch.randint(-6, -2, (1, 2, KVH),
                                                                   generator=g))
    for ctx_lens in ((5, 37), (300, 700)):          # one chunk (direct), several (combined)
        width = -(-max(ctx_lens) // bs)
        nb = len(ctx_lens) * width + 1
        kv = torch.randn(nb, 1, 2, bs, KVH, D, generator=g)
        kv = (kv * 16 if quant is not None else kv).to(kv_dtype).to(device)
        table = (torch.randperm(nb - 1, generator=g)[:len(ctx_lens) * width]
                 .view(len(ctx_lens), width).to(torch.int32).to(device))
        ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
        q = torch.randn(len(ctx_lens), H, D, generator=g).to(dtype).to(device)
        fp8 = {"kv_scale": quant.scale} if quant is not None else {}
        want = paged_decode_torch(q, kv, 0, table, ctx, D ** -0.5, max(ctx_lens), **fp8).float()
        try:
            got = triton_decode.paged_decode(q, kv, 0, table, ctx, D ** -0.5,
                                             max_ctx=max(ctx_lens), **fp8).float()
        except Exception as e:  # noqa: BLE001 - any build or launch failure means "not here"
            return f"the Triton kernel fails at head_dim {D}: {type(e).__name__}"
        err = (got - want).abs().max().item()
        if not err <= tol * max(1.0, want.abs().max().item()):
            return f"the Triton kernel is off by {err:.2g} at head_dim {D}"
    return None


def paged_decode_torch(q: torch.Tensor, kv: torch.Tensor, layer: int, table: torch.Tensor,
                       ctx: torch.Tensor, scale: float, max_ctx: int,
                       kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """paged_decode in torch: gather each sequence's context, then SDPA. An fp8 ``kv`` is
    dequantized after the gather with ``kv_scale`` [L, 2, KVH]."""
    B, H, D = q.shape
    bs, KVH = kv.shape[3], kv.shape[4]
    c = torch.arange(max_ctx, device=q.device)
    blocks = table[:, (c // bs).clamp(max=table.shape[1] - 1)].long()        # [B, C]
    offs = (c % bs)[None, :].expand(B, -1)
    K = kv[:, layer, 0][blocks, offs].permute(0, 2, 1, 3)                     # [B, KVH, C, D]
    V = kv[:, layer, 1][blocks, offs].permute(0, 2, 1, 3)
    if kv_scale is not None:
        K = dequantize(K, kv_scale[layer, 0][:, None, None], q.dtype)
        V = dequantize(V, kv_scale[layer, 1][:, None, None], q.dtype)
    mask = (c[None, :] < ctx[:, None])
    mask[:, 0] |= ctx == 0              # padding rows: attend to something, zeroed below
    o = F.scaled_dot_product_attention(q.view(B, KVH, H // KVH, D), K, V,
                                       attn_mask=mask[:, None, None, :], scale=scale)
    return torch.where((ctx > 0)[:, None], o.reshape(B, H * D), 0)


def _prefill(q, k, v, kv: torch.Tensor, layer: int, g: Group, scale: float,
             quant: KVQuant | None = None) -> torch.Tensor:
    """Prompt chunks, one sequence at a time (a few per step): causal attention aligned to the
    end of the context (a chunk's queries see all earlier context). A chunk with no earlier
    context attends over its own k/v; one with earlier context over the cache, where its own
    k/v were just written. K/V heads are expanded to the query heads, so the fused (flash)
    kernels apply. With fp8, ``k``/``v`` are already the round trip of the cache's values."""
    n, H, D = q.shape
    KVH = k.shape[1]
    kc, vc = kv[:, layer, 0], kv[:, layer, 1]     # [nb, bs, KVH, D] views
    bs = kc.shape[1]
    out = q.new_empty(n, H * D)
    for b, (start, m, c) in enumerate(g.spans):
        sl = slice(start, start + m)
        if c == m:
            K, V, mask = k[sl], v[sl], None
        else:
            rows = g.blocks[b, :-(-c // bs)]
            K = kc[rows].flatten(0, 1)[:c]
            V = vc[rows].flatten(0, 1)[:c]
            if quant is not None:
                K = dequantize(K, quant.scale[layer, 0], q.dtype)
                V = dequantize(V, quant.scale[layer, 1], q.dtype)
            # causal, aligned to the context's end (as torch's causal_lower_right, whose
            # module costs every stage process 2.4 s of imports: it loads torch._dynamo)
            mask = torch.ones(m, c, dtype=torch.bool, device=q.device).tril(c - m)
        # [1, H, len, D]: the fused kernels want a batch dimension
        K = K.repeat_interleave(H // KVH, dim=1).transpose(0, 1)[None]
        V = V.repeat_interleave(H // KVH, dim=1).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q[sl].transpose(0, 1)[None], K, V, attn_mask=mask,
                                           is_causal=mask is None, scale=scale)
        out[sl] = o[0].transpose(0, 1).reshape(m, H * D)
    return out


def _prefill_varlen(q, k, v, kv: torch.Tensor, layer: int, g: Group,
                    scale: float, quant: KVQuant | None = None) -> torch.Tensor:
    """All prompt chunks of the step in one variable-length flash attention call (CUDA, 16-bit):
    queries packed [n, H, D], each sequence's context packed after it (its own k/v when every
    chunk is a fresh prompt, else gathered from the cache). Flash aligns the causal mask to the
    end of each context, as ``_prefill`` does, and reads K/V heads grouped (no expansion)."""
    if g.k_blocks is None:
        K, V = k, v
    else:
        K = kv[:, layer, 0][g.k_blocks, g.k_offsets]
        V = kv[:, layer, 1][g.k_blocks, g.k_offsets]
        if quant is not None:        # the gathered context, dequantized (flash takes 16-bit)
            K = dequantize(K, quant.scale[layer, 0], q.dtype)
            V = dequantize(V, quant.scale[layer, 1], q.dtype)
    n, H, D = q.shape
    out = torch.ops.aten._flash_attention_forward(
        q.contiguous(), K.contiguous(), V.contiguous(), g.cu_q, g.cu_k, g.max_q, g.max_ctx,
        0.0, True, False, scale=scale)[0]
    return out.reshape(n, H * D)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int,
            g: Group, scale: float, quant: KVQuant | None = None) -> torch.Tensor:
    """q [n, H, D] (k, v [n, KVH, D]) of one group -> [n, H*D]."""
    if g.table is not None:
        return paged_decode(q.contiguous(), kv, layer, g.table, g.ctx, scale, g.max_ctx,
                            g.kernel, quant)
    D = q.shape[-1]
    if (g.cu_q is not None and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0
            and D <= 256):
        return _prefill_varlen(q, k, v, kv, layer, g, scale, quant)
    return _prefill(q, k, v, kv, layer, g, scale, quant)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                    layer: int, lay: StepLayout, scale: float,
                    quant: KVQuant | None = None) -> torch.Tensor:
    """Write the step's k/v into the cache (the streamed sequences' into the host pool), then
    attend. q [N, H, D]; k, v [N, KVH, D]. Returns [N, H*D]. Batched over sequences: no
    Python loop over them. ``quant``: the scales of an fp8 cache (None: the cache holds the
    model's dtype); when calibrating, this step's k/v fix the layer's scales first."""
    N, H, D = q.shape
    if quant is not None and quant.calibrate:
        quant.observe(layer, k, v)
    w = lay.write_tokens
    _write(kv, layer, lay.write_blocks, lay.write_offsets, k if w is None else k[w],
           v if w is None else v[w], quant)
    groups = [(g, kv) for g in (lay.decode, lay.prefill) if g is not None]
    if lay.host is not None:
        h = lay.host
        _write(h.kv, layer, h.write_blocks, h.write_offsets, k[h.tokens], v[h.tokens], quant)
        groups += [(g, h.kv) for g in (h.decode, h.prefill) if g is not None]
    if quant is not None and any(g.table is None for g, _ in groups):
        # prompt chunks attend over what the cache holds, their own new k/v included
        k, v = quant.roundtrip(k, layer, 0), quant.roundtrip(v, layer, 1)
    if len(groups) == 1 and groups[0][0].tokens is None:
        g, cache = groups[0]
        return _attend(q, k, v, cache, layer, g, scale, quant)
    out = q.new_empty(N, H * D)
    for g, cache in groups:
        t = g.tokens
        out[t] = _attend(q[t], k[t], v[t], cache, layer, g, scale, quant)
    return out


def _write(kv: torch.Tensor, layer: int, blocks: torch.Tensor, offsets: torch.Tensor,
           k: torch.Tensor, v: torch.Tensor, quant: KVQuant | None = None) -> None:
    inv = quant.inv[layer] if quant is not None else None
    if triton_fused.available(k) and kv.is_contiguous():
        triton_fused.write_kv(kv, layer, blocks, offsets, k, v, inv)
        return
    if inv is not None:
        k, v = quantize(k, inv[0]), quantize(v, inv[1])
    kv[:, layer, 0][blocks, offsets] = k      # [nb, bs, KVH, D] views
    kv[:, layer, 1][blocks, offsets] = v
