"""FP8 weights: a linear layer whose weight is e4m3 with one float32 scale per output channel.

    weight  [N, K] float8_e4m3fn,  W ~= weight * scale[:, None]     (quantized at load)
    x       [M, K] quantized per token at run time: x ~= xq * xs[:, None]
    y = (xq @ weight.T) * xs[:, None] * scale[None, :]  (+ bias), in the run's dtype

On CUDA (compute capability 8.9 or more) the GEMM is one ``torch._scaled_mm`` with rowwise
scales (compute capability 9.0 or more; on 8.9 it runs unscaled into float32 and the scales
are applied after); it wants M, K and N multiples of 16, so K and N are padded at load (zero
columns and rows, sliced off the output; nothing when N and K already are) and M at run time.
The activation quantization (padding included) is one Triton kernel (stages/triton_fp8.py;
plain torch ops without Triton, the same bytes), without a host sync, so a CUDA graph
captures it. On the CPU the same math runs in plain torch: both operands dequantized to
float32, multiplied, rounded to the dtype.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipemax.stages import triton_fp8

FP8 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(FP8).max)      # 448
MIN_CAPABILITY = (8, 9)                      # Ada / Hopper: the first with fp8 tensor cores
_ALIGN = 16
_TINY = 1e-12                                # an all-zero row keeps a finite scale


def capability_refusal(name: str, capability: tuple[int, int]) -> str | None:
    """Why ``--quantization fp8`` cannot run on this CUDA device (None: it can)."""
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    return (f"--quantization fp8 needs a GPU with fp8 tensor cores (compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or more: Ada, Hopper, Blackwell); "
            f"{name} is {capability[0]}.{capability[1]} (leave out --quantization)")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of a [R, C] tensor: (q [R, C] fp8, scale [R, 1] float32) with
    ``x ~= q * scale`` and every |q| <= 448 (each row's largest magnitude maps to 448)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / E4M3_MAX
    q = (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8)     # x / scale: in float32
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` (scale [R, 1] or [R])."""
    return q.float() * scale.reshape(-1, 1).float()


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class Fp8Linear(nn.Module):
    """``nn.Linear(in_features, out_features, bias)`` with an fp8 weight (see the module doc).

    ``weight`` is stored padded to [round16(N), round16(K)]; ``weight_scale`` is [round16(N)]
    float32 (padding rows have scale 1 and zero weights); ``bias`` is in the run's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        Np, Kp = _round_up(out_features), _round_up(in_features)
        self.weight = nn.Parameter(torch.zeros(Np, Kp, dtype=FP8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(Np, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize a float weight [N, K] into this layer (per output channel)."""
        q, s = quantize_rows(w.to(self.weight.device))
        self.set_quantized(q, s)

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Take an already quantized weight [N, K] (fp8) and its scales (N values, or one)."""
        N, K = self.out_features, self.in_features
        if tuple(q.shape) != (N, K):
            raise ValueError(f"fp8 weight of shape {tuple(q.shape)}, expected {(N, K)}")
        scale = scale.float().reshape(-1)
        if scale.numel() not in (1, N):
            raise ValueError(f"{scale.numel()} weight scales for {N} output channels")
        self.weight.zero_()
        self.weight[:N, :K].copy_(q.to(FP8))
        self.weight_scale.fill_(1.0)
        self.weight_scale[:N].copy_(scale.expand(N))

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K] this layer computes with."""
        N, K = self.out_features, self.in_features
        return dequantize_rows(self.weight[:N, :K], self.weight_scale[:N])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cuda:
            y = scaled_mm(x2, self.weight, self.weight_scale, x.dtype, rowwise=_rowwise(x.device))
        else:
            y = plain_mm(x2, self.weight, self.weight_scale).to(x.dtype)
        if y.shape[1] != self.out_features:      # N padded at load (N % 16 != 0 only)
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=float8_e4m3fn per-channel")


def plain_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp8 GEMM in plain torch (float32): x [M, K] quantized per token, weight [Np, Kp] fp8
    with scales [Np]. Returns [M, Np] float32."""
    xq, xs = quantize_rows(x)
    K = x.shape[-1]
    return dequantize_rows(xq, xs) @ dequantize_rows(weight[:, :K], scale).t()


@functools.lru_cache(maxsize=None)
def _rowwise(device: torch.device) -> bool:
    """torch._scaled_mm takes rowwise scales from compute capability 9.0 (Hopper) on."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


def quantize_padded(x: torch.Tensor, Kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq [round16(M), Kp] fp8, xs [round16(M), 1] float32): x [M, K] zero-padded to those
    sizes and quantized per row. One Triton kernel on CUDA (stages/triton_fp8.py, the same
    bytes), else the padding copy and ``quantize_rows`` in torch."""
    M, K = x.shape
    Mp = _round_up(M)
    if triton_fp8.available(x):
        return triton_fp8.quantize_rows_padded(x, Kp, Mp, _TINY)
    if Mp != M or Kp != K:
        x = F.pad(x, (0, Kp - K, 0, Mp - M))
    return quantize_rows(x)


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16, rowwise: bool = True) -> torch.Tensor:
    """The same GEMM through ``torch._scaled_mm`` with rowwise scales (scale_a [M, 1], scale_b
    [1, N], both float32; the weight row-major [N, K], passed transposed: column-major). M and
    K are padded to multiples of 16 (``quantize_padded``). Returns [M, Np] in ``out_dtype``
    (rowwise scaling writes bfloat16, converted when ``out_dtype`` is another). ``rowwise=False``:
    the product unscaled in float32, then the scales (for GPUs without rowwise scaling)."""
    M = x.shape[0]
    xq, xs = quantize_padded(x, weight.shape[1])
    if rowwise:
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.view(1, -1),
                             out_dtype=torch.bfloat16)
        if out_dtype != torch.bfloat16:
            y = y.to(out_dtype)
    else:
        one = torch.ones((), dtype=torch.float32, device=x.device)
        y = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        y = (y * xs * scale.view(1, -1)).to(out_dtype)
    return y[:M] if xq.shape[0] != M else y          # rows: a view, no copy
