"""A stage's KV cache: fixed-size blocks, block-major (see stages/attention.py for the layout).

The driver owns allocation (which block holds which tokens); a stage only holds the memory,
sized from what is left on its device after the weights.
"""
from __future__ import annotations

import torch

from pipemax.devices import stage_memory_cap
from pipemax.model_config import ModelConfig

GiB = 1 << 30
CPU_DEFAULT_KV_GB = 0.25
CUDA_CONTEXT_BYTES = 600 << 20   # the CUDA context and cuBLAS workspaces, outside torch's allocator


class KVCache:
    def __init__(self, cfg: ModelConfig, num_layers: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # zeros, not empty: attention reads whole blocks, and masked garbage can still be NaN
        self.data = torch.zeros(num_blocks, num_layers, 2, block_size, cfg.num_kv_heads,
                                cfg.head_dim, dtype=dtype, device=device)

    @staticmethod
    def block_bytes(cfg: ModelConfig, num_layers: int, block_size: int, dtype: torch.dtype) -> int:
        esize = torch.empty(0, dtype=dtype).element_size()
        return num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * esize


def workspace_bytes(spec, dtype: torch.dtype, decode_kernel: bool) -> int:
    """Rough upper bound of one step's activations: what the KV cache must leave free."""
    cfg = spec.model
    esize = torch.empty(0, dtype=dtype).element_size()
    T = spec.max_tokens_per_step
    per_token = 4 * cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size + 3 * cfg.intermediate_size
    act = T * per_token * esize * 2
    if spec.quantization == "fp8":     # a GEMM's input quantized: in float32, then e4m3
        act += T * max(cfg.hidden_size, cfg.q_size, cfg.intermediate_size) * (4 + 1)
    ctx = min(spec.max_model_len, 8192)
    # prefill chunks gather their sequences' context from the cache (k and v, packed); the
    # per-sequence path also expands one sequence's k/v to the query heads
    gather = 2 * (T + ctx) * cfg.kv_size * esize + 2 * ctx * cfg.q_size * esize
    if not decode_kernel:   # the torch decode path gathers every decoding sequence's context
        gather += 4 * spec.max_seqs_per_step * min(ctx, 2048) * cfg.kv_size * esize
    if spec.kv_cache_dtype == "fp8":
        gather *= 3        # fp8 gathers dequantize through float32 temporaries
    rows = min(spec.max_seqs_per_step, T)
    logits = 3 * rows * cfg.vocab_size * 4 if spec.is_last else 0
    return act + gather + logits + 256 * (1 << 20)


def device_budget(cap: int, used_by_us: int, free: int, workspace: int) -> float:
    """A CUDA stage's KV bytes: its cap less what it holds (weights, the CUDA context), within
    what the device has free, with a 5% margin, less one step's workspace."""
    return min(cap - used_by_us, free) * 0.95 - workspace


def kv_budget_bytes(spec, device: torch.device, weight_bytes: int, dtype: torch.dtype,
                    decode_kernel: bool, free_at_start: int | None = None) -> int:
    """Bytes this stage may give its KV cache. On CUDA: what is left of its share of the device
    (``pipemax/devices.py``; ``free_at_start`` is what the device had free when the stage's
    CUDA context was new) after what the stage holds and a step's workspace."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        start = total if free_at_start is None else free_at_start + CUDA_CONTEXT_BYTES
        cap = stage_memory_cap(total, start, spec.device_sharers, spec.memory_gb)
        used_by_us = torch.cuda.memory_reserved(device) + CUDA_CONTEXT_BYTES
        budget = device_budget(cap, used_by_us, free, workspace_bytes(spec, dtype, decode_kernel))
    else:
        budget = (spec.kv_cache_gb or CPU_DEFAULT_KV_GB) * GiB
        if spec.memory_gb:
            budget = min(budget, spec.memory_gb * GiB - weight_bytes
                         - workspace_bytes(spec, dtype, False))
    if spec.kv_cache_gb:
        budget = min(budget, spec.kv_cache_gb * GiB)
    return int(max(0, budget))
