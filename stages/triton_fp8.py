"""The per-token fp8 quantization of a GEMM's input, one Triton kernel (CUDA).

``Fp8Linear`` (stages/fp8.py) quantizes its input x [M, K] per row before ``torch._scaled_mm``;
in torch that is the padding copy and about six more kernels, each reading or writing the
whole activation. Here one launch (a program per row of the padded buffer) does it all:

    scale[r] = max(amax(|x[r]|), 1e-12) / 448                    (float32)
    q[r, c]  = e4m3(clamp(x[r, c] / scale[r], -448, 448))        (round to nearest even)

into q [round16(M), Kp] and scale [round16(M), 1]; padding (rows past M, columns past K) is
zero, with the scale of a zero row. The numbers are those of the torch code
(``fp8.quantize_rows`` of the zero-padded x) bit for bit: the divisions are IEEE (``div_rn``)
and the rounding to e4m3 is integer arithmetic on the float32 bits, so Triton's interpreter
(the CPU tests) and the GPU give the same bytes. No host sync: a CUDA graph captures it.
"""
from __future__ import annotations

import torch

from pipemax.stages.triton_import import HAVE_TRITON as _HAVE_TRITON, tl, triton

_BLOCK = 1024


def _interpreted() -> bool:
    return _HAVE_TRITON and type(_quantize_rows_kernel).__name__ == "InterpretedFunction"


def available(x: torch.Tensor) -> bool:
    """A compiled Triton on CUDA (the interpreter runs only in the tests)."""
    return _HAVE_TRITON and x.is_cuda and not _interpreted()


if _HAVE_TRITON:
    @triton.jit
    def _e4m3_bits(v):
        """The e4m3fn byte (as int32) of float32 values |v| <= 448, rounded to nearest even."""
        bits = v.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = bits & 0x7FFFFFFF
        # below 2**-6 (e4m3's subnormals, step 2**-9): adding 2**14 rounds |v| to a multiple
        # of 2**-9 (IEEE addition), and the steps counted are the byte (8 carries into 2**-6)
        sub = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
        # normal: keep 3 mantissa bits, ties to even; the exponent rebased from 127 to 7
        nrm = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        return tl.where(a < 0x3C800000, sub, nrm) | sign

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, Kp, stride_x, tiny,
                              BLOCK: tl.constexpr, ONE: tl.constexpr):
        row = tl.program_id(0)
        live = row < M
        src = x_ptr + row.to(tl.int64) * stride_x
        dst = q_ptr + row.to(tl.int64) * Kp
        cols = tl.arange(0, BLOCK)
        if ONE:                       # the whole row in one block: x read once
            v = tl.load(src + cols, mask=(cols < K) & live, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(v), axis=0)
            scale = tl.math.div_rn(tl.maximum(amax, tiny), 448.0)
            v = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
            tl.store(dst + cols, _e4m3_bits(v).to(tl.uint8), mask=cols < Kp)
        else:                         # long rows: the amax, then x again (from L2)
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                c = k0 + cols
                v = tl.load(src + c, mask=(c < K) & live, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), tiny), 448.0)
            for k0 in range(0, Kp, BLOCK):
                c = k0 + cols
                v = tl.load(src + c, mask=(c < K) & live, other=0.0).to(tl.float32)
                v = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
                tl.store(dst + c, _e4m3_bits(v).to(tl.uint8), mask=c < Kp)
        tl.store(s_ptr + row, scale)


def quantize_rows_padded(x: torch.Tensor, Kp: int, Mp: int, tiny: float,
                         max_block: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [Mp, Kp] float8_e4m3fn, scale [Mp, 1] float32) of x [M, K] (M <= Mp, K <= Kp), its
    rows quantized as ``fp8.quantize_rows`` does, the padding zero. One launch; a row of at
    most ``max_block`` columns is one block (read once), a longer one goes in blocks of at
    most 1024."""
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(Mp, Kp, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(Mp, 1, dtype=torch.float32, device=x.device)
    if Mp:
        whole = triton.next_power_of_2(max(Kp, 16))
        one = whole <= max_block
        block = whole if one else min(_BLOCK, max_block)
        warps = 4 if block <= 4096 else 8 if block <= 8192 else 16
        _quantize_rows_kernel[(Mp,)](x, q.view(torch.uint8), s, M, K, Kp, x.stride(0), tiny,
                                     BLOCK=block, ONE=one, num_warps=warps)
    return q, s
