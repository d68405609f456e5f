"""One stage's shard of a Llama-family decoder, written out plainly.

Covers Llama 2/3 (incl. ``rope_scaling`` of type llama3, attention and MLP biases), Mistral and
Qwen2/2.5 (qkv bias, tied embeddings). The first stage owns the embedding, the last the final norm and lm_head; every
stage owns a contiguous range of layers. q/k/v and gate/up are fused into one matmul each.
With ``quantization="fp8"`` the four linear layers of every decoder layer hold e4m3 weights
(stages/fp8.py); the embedding, the norms and the lm_head stay in the run's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipemax.model_config import ModelConfig
from pipemax.stages import triton_fused
from pipemax.stages.attention import StepLayout, paged_attention
from pipemax.stages.kv_quant import KVQuant
from pipemax.stages.fp8 import Fp8Linear

QUANTIZATIONS = ("none", "fp8")


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    # on the CPU even inside a meta-device model: ops on meta tensors import torch._dynamo
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu")
                                    .float() / d))
    rs = cfg.rope_scaling_dict
    kind = rs.get("rope_type", rs.get("type")) if rs else None
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None,
                 quantization: str = "none"):
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        linear = Fp8Linear if quantization == "fp8" else nn.Linear
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.qkv = linear(h, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias, dtype=dtype)
        self.o_proj = linear(cfg.q_size, h, bias=cfg.o_proj_bias, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.gate_up = linear(h, 2 * cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype)
        self.down_proj = linear(cfg.intermediate_size, h, bias=cfg.mlp_bias, dtype=dtype)

    def linears(self) -> list[nn.Module]:
        """The layer's GEMMs, in the order a step runs them."""
        return [self.qkv, self.o_proj, self.gate_up, self.down_proj]

    def forward(self, x, d, cos, sin, kv, layer: int, lay: StepLayout, quant=None):
        """x: the residual stream; d: the previous layer's output, not yet added to it (None
        before the first layer). Returns (residual stream, this layer's output to add)."""
        cfg = self.cfg
        N = x.shape[0]
        fused = triton_fused.available(x)
        x, h = _add_norm(self.input_layernorm, x, d, fused)
        qkv = self.qkv(h)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(N, cfg.num_heads, cfg.head_dim)
        k = k.view(N, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(N, cfg.num_kv_heads, cfg.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = paged_attention(q, k, v, kv, layer, lay, cfg.head_dim ** -0.5, quant)
        x, h = _add_norm(self.post_attention_layernorm, x, self.o_proj(a), fused)
        gu = self.gate_up(h)
        if fused:
            act = triton_fused.silu_mul(gu)
        else:
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return x, self.down_proj(act)


def _add_norm(norm: RMSNorm, x: torch.Tensor, d: torch.Tensor | None,
              fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + d, norm(x + d)); one kernel when fused."""
    if fused:
        return triton_fused.add_rmsnorm(x, norm.weight, norm.eps, d)
    if d is not None:
        x = x + d
    return x, norm(x)


class StageModel(nn.Module):
    """Layers ``[layer_start, layer_end)`` of the model, plus embedding / head at the ends,
    with parameters in ``dtype`` (the fp8 weights of ``quantization="fp8"`` excepted)."""

    def __init__(self, cfg: ModelConfig, layer_start: int, layer_end: int,
                 is_first: bool, is_last: bool, dtype: torch.dtype | None = None,
                 quantization: str = "none"):
        super().__init__()
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        self.cfg = cfg
        self.quantization = quantization
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first, self.is_last = is_first, is_last
        # the weight given, so nn.Embedding skips its normal_ init: the loader overwrites it,
        # and that init imports torch._dynamo (about 2.5 s of every process that builds one)
        self.embed_tokens = (nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype)) if is_first else None)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, quantization)
                                    for _ in range(layer_end - layer_start))
        if is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        else:
            self.norm = self.lm_head = None
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    def forward(self, x: torch.Tensor, lay: StepLayout, kv: torch.Tensor,
                quant: KVQuant | None = None) -> torch.Tensor:
        """x: token ids [N] on the first stage, hidden states [N, H] elsewhere; ``quant``: the
        scales of an fp8 ``kv`` (stages/kv_quant.py).

        Returns hidden states [N, H]; on the last stage, the final-normed hidden states of each
        sequence's last token [B, H] (feed them to ``logits``).
        """
        if self.is_first:
            x = self.embed_tokens(x)
        freqs = lay.positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        d = None
        for i, layer in enumerate(self.layers):
            x, d = layer(x, d, cos, sin, kv, i, lay, quant)
        if d is not None:
            x = x + d
        if self.is_last:
            x = self.norm(x[lay.last_index])
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()
