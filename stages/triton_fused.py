"""The small per-layer operations of a decoder layer, each one Triton kernel (16-bit, CUDA).

A layer's norms, residual adds and SiLU gate are over a dozen elementwise kernels in
torch: at decode batch sizes they read and write the activations again and again, and in
eager prompt steps each is a Python launch. Here each is one kernel, with the same rounding
steps as the torch code it replaces (``stages/model.py``), so results stay those of the model
written out plainly:

    add_rmsnorm   r = x + d (rounded to the dtype); y = w * (r * rsqrt(mean(r^2) + eps))
                  (the norm in float32, rounded before the weight, like transformers)
    silu_mul      silu(gate) * up, gate and up the halves of one [N, 2I] tensor
    write_kv      a step's k and v into their cache slots (one program per token; a copy,
                  so exact), in place of two indexed writes per layer; into an fp8 cache it
                  quantizes as stages/kv_quant.py does (x * inv_scale, clamped to +-448,
                  rounded to nearest even: the same bits)

(A fused rotary embedding was tried and left out: on the H100 it rounded about 7% of its
outputs one bfloat16 unit away from the torch code, for a reason not found.)

``available`` says when to use them: a compiled Triton on CUDA and a 16-bit dtype (float32 and
the CPU keep the torch code). The tests also run them on the CPU under Triton's interpreter.
"""
from __future__ import annotations

import torch

from pipemax.stages.triton_import import HAVE_TRITON as _HAVE_TRITON, tl, triton


def _interpreted() -> bool:
    return _HAVE_TRITON and type(_add_rmsnorm_kernel).__name__ == "InterpretedFunction"


def available(x: torch.Tensor) -> bool:
    return (_HAVE_TRITON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and not _interpreted())


if _HAVE_TRITON:
    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, d_ptr, r_ptr, w_ptr, y_ptr, n_cols, eps,
                            HAS_D: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < n_cols
        dt = y_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0)
        if HAS_D:
            x = (x.to(tl.float32) + tl.load(d_ptr + row * n_cols + cols, mask=m,
                                            other=0.0).to(tl.float32)).to(dt)
            tl.store(r_ptr + row * n_cols + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        normed = (xf * tl.math.rsqrt(var + eps)).to(dt).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n_cols + cols, (w * normed).to(dt), mask=m)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n_cols
        dt = y_ptr.dtype.element_ty
        g = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=m, other=0.0)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(y_ptr + row * n_cols + cols, (act * u.to(tl.float32)).to(dt), mask=m)


    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kv_ptr, blocks_ptr, offsets_ptr, inv_ptr, layer_off,
                         stride_block, stride_slot, v_off, ROW: tl.constexpr,
                         BLOCK: tl.constexpr, D: tl.constexpr, KVH: tl.constexpr,
                         QUANT: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        b = tl.load(blocks_ptr + n).to(tl.int64)
        o = tl.load(offsets_ptr + n).to(tl.int64)
        dst = kv_ptr + layer_off + b * stride_block + o * stride_slot
        cols = tl.arange(0, BLOCK)
        m = cols < ROW
        k = tl.load(k_ptr + n * ROW + cols, mask=m)
        v = tl.load(v_ptr + n * ROW + cols, mask=m)
        if QUANT:                     # inv_ptr: [2, KVH] float32, one scale per head
            head = cols // D
            k = k.to(tl.float32) * tl.load(inv_ptr + head, mask=m, other=1.0)
            v = v.to(tl.float32) * tl.load(inv_ptr + KVH + head, mask=m, other=1.0)
            k = tl.minimum(tl.maximum(k, -448.0), 448.0)
            v = tl.minimum(tl.maximum(v, -448.0), 448.0)
            k = k.to(kv_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            v = v.to(kv_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(dst + cols, k, mask=m)
        tl.store(dst + v_off + cols, v, mask=m)


def write_kv(kv: torch.Tensor, layer: int, blocks: torch.Tensor, offsets: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, inv_scale: torch.Tensor | None = None) -> None:
    """kv[blocks[i], layer, 0, offsets[i]] = k[i] (and v into slot 1) for every token i.
    kv [nb, L, 2, bs, KVH, D] contiguous; k, v [n, KVH, D]. An fp8 ``kv`` takes
    ``inv_scale`` [2, KVH] float32 (the layer's K and V scales, inverted)."""
    n = k.shape[0]
    if n == 0:
        return
    _, L, _, bs, KVH, D = kv.shape
    row = KVH * D
    quant = kv.dtype == torch.float8_e4m3fn
    assert quant == (inv_scale is not None), (kv.dtype, inv_scale is None)
    _write_kv_kernel[(n,)](k.contiguous(), v.contiguous(), kv, blocks, offsets,
                           inv_scale.contiguous() if quant else blocks,
                           layer * 2 * bs * row, L * 2 * bs * row, row, bs * row, ROW=row,
                           BLOCK=triton.next_power_of_2(row), D=D, KVH=KVH, QUANT=quant,
                           num_warps=4)


def add_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float,
                d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, y): r = x + d (x itself when d is None), y = rmsnorm(r) * w. x, d [N, H]."""
    N, H = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    r = torch.empty_like(x) if d is not None else x
    if N:
        _add_rmsnorm_kernel[(N,)](x, d.contiguous() if d is not None else x, r, w, y, H, eps,
                                  HAS_D=d is not None, BLOCK=triton.next_power_of_2(H),
                                  num_warps=8 if H >= 4096 else 4)
    return r, y


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gu[:, :I]) * gu[:, I:] for gu [N, 2I] contiguous."""
    N, two_i = gu.shape
    n = two_i // 2
    gu = gu.contiguous()
    y = torch.empty(N, n, dtype=gu.dtype, device=gu.device)
    if N:
        BLOCK = 1024
        _silu_mul_kernel[(N, triton.cdiv(n, BLOCK))](gu, y, n, BLOCK=BLOCK, num_warps=4)
    return y
