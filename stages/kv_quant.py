"""The KV cache in fp8 (e4m3): what is stored, how it is scaled, and where the scales come from.

With ``--kv-cache-dtype fp8`` every K and V element is kept as one ``torch.float8_e4m3fn`` byte
(4 exponent bits, 3 mantissa bits, largest finite value 448) in the stage's cache, in the host
pool and in every copy between them, with one float32 scale per (layer, K|V, KV head)::

    stored = fp8(clamp(x * inv_scale, -448, 448))     (round to nearest even)
    x'     = float32(stored) * scale                  (the value attention reads)

Every attention path reads the dequantized values, the step's own K/V included (a fresh prompt
attends over the round trip of its own K/V, not the 16-bit originals), so a token's result does
not depend on how its prompt was chunked, batched, cached or offloaded.

Scales (``--kv-scales``):

- ``prompt``: fixed once per run, from the first step each stage computes (always a prompt
  step, the same micro-batch on every stage, so every stage fixes its own layers' scales from
  the same tokens, deterministically). Each (layer, K|V, head) takes the absolute maximum of
  that step's values and the power of two that maps it into (32, 64]. A power of two makes
  quantizing and dequantizing exact scalings (the same bits in Triton and in torch); the
  headroom of 7-14x above the first step's maximum keeps later, larger values from saturating,
  and costs almost nothing: a float format's relative precision does not depend on the scale,
  only values below 1/3500 of that maximum fall into e4m3's subnormals. The trade-off: the
  scales (so, in the last bits, the tokens) depend on which requests form the run's first
  step, and a value more than ~7x above everything in that step is clipped. The same choice
  as vLLM's ``--calculate-kv-scales`` (there mapped to 200/100, without the power of two).
- ``checkpoint``: the ``model.layers.N.self_attn.k_scale`` / ``v_scale`` tensors of the
  checkpoint (one per layer, or one per KV head), as vLLM's fp8 checkpoints ship them.
- ``one``: every scale 1.0 (vLLM's default without scales).
- ``auto`` (default): ``checkpoint`` when the checkpoint ships scales, else ``prompt``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PROMPT_TARGET = 64.0           # a prompt scale maps the first step's maximum into (32, 64]
MIN_FP8_CAPABILITY = (8, 9)    # Ada / Hopper and later: e4m3 conversions in hardware
SCALE_MODES = ("auto", "checkpoint", "prompt", "one")


def kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for ``--kv-cache-dtype`` (auto: the model's dtype)."""
    return FP8 if name == "fp8" else model_dtype


def fp8_unsupported(device: int, capability: tuple[int, int], name: str) -> str | None:
    """Why a CUDA device cannot hold an fp8 KV cache (None: it can)."""
    if tuple(capability) >= MIN_FP8_CAPABILITY:
        return None
    return (f"--kv-cache-dtype fp8 needs a GPU of compute capability 8.9 or later (Ada, "
            f"Hopper); cuda:{device} ({name}) is {capability[0]}.{capability[1]}: use "
            "--kv-cache-dtype auto")


def quantize(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x [..., KVH, D] (any float dtype) -> fp8; ``inv_scale`` [KVH] float32."""
    y = x.to(torch.float32) * inv_scale[:, None]
    return y.clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 x [..., KVH, D] -> ``dtype``; ``scale`` [KVH] float32 (or broadcastable)."""
    s = scale[:, None] if scale.dim() == 1 else scale
    return (x.to(torch.float32) * s).to(dtype)


def prompt_scale(amax: torch.Tensor) -> torch.Tensor:
    """The power-of-two scale that maps ``amax`` (float32, any shape) into (32, 64]; an
    all-zero head gets 2^-20 (anything later is then clipped, not lost to NaN)."""
    a = amax.to(torch.float32).clamp(min=2.0 ** -14)
    return torch.exp2(torch.ceil(torch.log2(a / PROMPT_TARGET)))


@dataclass
class KVQuant:
    """One stage's fp8 scales: ``scale`` [L_stage, 2, KVH] float32 on the stage's device and
    ``inv`` its reciprocal (what quantizing multiplies by). Both are updated in place, so a
    captured CUDA graph reads the current values. ``calibrate``: the next step sets each
    layer's scales from its own K/V before writing them (``prompt`` scales)."""
    scale: torch.Tensor
    inv: torch.Tensor
    calibrate: bool = False

    @staticmethod
    def make(num_layers: int, num_kv_heads: int, device: torch.device,
             values: torch.Tensor | None = None, calibrate: bool = False) -> "KVQuant":
        s = torch.ones(num_layers, 2, num_kv_heads, dtype=torch.float32)
        if values is not None:
            s.copy_(values)
        s = s.to(device)
        return KVQuant(s, 1.0 / s, calibrate)

    def observe(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fix ``layer``'s scales from this step's k, v [n, KVH, D] (no host sync)."""
        amax = torch.stack([k.detach().abs().amax(dim=(0, 2)), v.detach().abs().amax(dim=(0, 2))])
        s = prompt_scale(amax.float())
        self.scale[layer].copy_(s)
        self.inv[layer].copy_(1.0 / s)

    def roundtrip(self, x: torch.Tensor, layer: int, kv: int) -> torch.Tensor:
        """What the cache gives back for x [n, KVH, D]: dequantize(quantize(x)), in x's dtype."""
        return dequantize(quantize(x, self.inv[layer, kv]), self.scale[layer, kv], x.dtype)


def checkpoint_scale_names(layer: int) -> tuple[str, str]:
    g = f"model.layers.{layer}.self_attn."
    return g + "k_scale", g + "v_scale"


def has_checkpoint_scales(tensor_names, num_layers: int) -> bool | None:
    """True: every layer has both scales; False: none has; None: some have, some lack."""
    names = set(tensor_names)
    have = [all(n in names for n in checkpoint_scale_names(i)) for i in range(num_layers)]
    if all(have):
        return True
    if not any(n in names for i in range(num_layers) for n in checkpoint_scale_names(i)):
        return False
    return None


def checkpoint_scales(read, layer_start: int, layer_end: int, num_kv_heads: int) -> torch.Tensor:
    """[L, 2, KVH] float32 from the checkpoint; ``read(name)`` gives a tensor. A scale is one
    value per layer (broadcast over the heads) or one per KV head; anything else, or a scale
    that is not a positive finite number, raises ValueError."""
    out = torch.empty(layer_end - layer_start, 2, num_kv_heads, dtype=torch.float32)
    for i in range(layer_start, layer_end):
        for j, name in enumerate(checkpoint_scale_names(i)):
            t = read(name).to(torch.float32).reshape(-1)
            if t.numel() not in (1, num_kv_heads):
                raise ValueError(f"{name} has {t.numel()} values: one, or one per KV head "
                                 f"({num_kv_heads}), expected")
            if not bool(torch.isfinite(t).all() and (t > 0).all()):
                raise ValueError(f"{name} is not a positive finite scale")
            out[i - layer_start, j] = t.expand(num_kv_heads)
    return out
