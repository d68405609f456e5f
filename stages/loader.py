"""Build one stage's model on its device: from a HF safetensors folder, or random (``dummy``).

A stage reads only the tensors of its own layers (plus embedding / head at the ends): with a
sharded checkpoint it opens only the shard files its tensors are in.

FP8 (stages/fp8.py): a float checkpoint's linear weights are quantized per output channel as
they are loaded; a checkpoint that ships e4m3 weights (compressed-tensors or HF ``fp8``, a
``weight_scale`` of one value or one per output channel beside each fp8 ``weight``) gives its
own weights and scales, or its dequantized weights to a run without ``--quantization fp8``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from pipemax.model_config import ModelConfig
from pipemax.stages import kv_quant
from pipemax.stages.fp8 import FP8, Fp8Linear
from pipemax.stages.model import StageModel, rope_inv_freq


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line for the user."""


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map tensor name -> file holding it (from the index json, or by listing single files)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        return {name: folder / fname for name, fname in wm.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model folder {folder} has no *.safetensors weights")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    out[name] = f
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    return out


def check_checkpoint(folder: Path, cfg: ModelConfig) -> None:
    """Check, from the file headers only, that every tensor of the model is there in the right
    shape, so a bad folder stops the run before any stage starts."""
    where = checkpoint_files(folder)
    with torch.device("meta"):
        model = StageModel(cfg, 0, cfg.num_layers, True, True)
    wanted = _resolve_tied(_hf_names(cfg, model), where, cfg)
    _check_missing(wanted, where, folder)
    shapes = dict(model.named_parameters())
    handles = {}
    try:
        for ours, names in wanted.items():
            rows = 0
            for n in names:
                f = where[n]
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt")
                shape = handles[f].get_slice(n).get_shape()
                rows += shape[0]
            expect = tuple(shapes[ours].shape)
            got = (rows, *shape[1:])
            if got != expect:
                raise CheckpointError(f"tensor {names[0]} has shape {tuple(shape)}, config.json "
                                      f"implies {expect} for the model")
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read the checkpoint in {folder}: {e}") from None


def _resolve_tied(wanted: dict, where: dict, cfg: ModelConfig) -> dict:
    if "lm_head.weight" in wanted and "lm_head.weight" not in where:
        if cfg.tie_word_embeddings or "model.embed_tokens.weight" in where:
            wanted["lm_head.weight"] = ["model.embed_tokens.weight"]
    return wanted


def _check_missing(wanted: dict, where: dict, folder: Path) -> None:
    missing = sorted({n for names in wanted.values() for n in names if n not in where})
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint in {folder} lacks tensors {', '.join(missing[:3])}{more}")


def _hf_names(cfg: ModelConfig, model: StageModel) -> dict[str, list[str]]:
    """Our parameter name -> the HF tensor names concatenated (dim 0) to make it."""
    m = {}
    if model.is_first:
        m["embed_tokens.weight"] = ["model.embed_tokens.weight"]
    for i in range(model.num_layers):
        g = f"model.layers.{model.layer_start + i}."
        p = f"layers.{i}."
        m[p + "input_layernorm.weight"] = [g + "input_layernorm.weight"]
        m[p + "post_attention_layernorm.weight"] = [g + "post_attention_layernorm.weight"]
        m[p + "qkv.weight"] = [g + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if cfg.attention_bias:
            m[p + "qkv.bias"] = [g + f"self_attn.{x}_proj.bias" for x in "qkv"]
        m[p + "o_proj.weight"] = [g + "self_attn.o_proj.weight"]
        if cfg.o_proj_bias:
            m[p + "o_proj.bias"] = [g + "self_attn.o_proj.bias"]
        m[p + "gate_up.weight"] = [g + "mlp.gate_proj.weight", g + "mlp.up_proj.weight"]
        m[p + "down_proj.weight"] = [g + "mlp.down_proj.weight"]
        if cfg.mlp_bias:
            m[p + "gate_up.bias"] = [g + "mlp.gate_proj.bias", g + "mlp.up_proj.bias"]
            m[p + "down_proj.bias"] = [g + "mlp.down_proj.bias"]
    if model.is_last:
        m["norm.weight"] = ["model.norm.weight"]
        m["lm_head.weight"] = ["lm_head.weight"]
    return m


def build_stage_model(cfg: ModelConfig, layer_start: int, layer_end: int, is_first: bool,
                      is_last: bool, *, folder: Path | None, dtype: torch.dtype,
                      device: torch.device, seed: int = 0,
                      quantization: str = "none") -> StageModel:
    with torch.device("meta"):
        model = StageModel(cfg, layer_start, layer_end, is_first, is_last, dtype=dtype,
                           quantization=quantization)
    model = model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # float32 always, like HF
    if folder is None:
        _init_random(model, dtype, seed + 7919 * layer_start)
    else:
        _load(model, cfg, Path(folder))
    return model.eval().requires_grad_(False)


def _fp8_layers(model: StageModel) -> dict[str, Fp8Linear]:
    """Parameter name of each fp8 weight -> its layer."""
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}


def _init_random(model: StageModel, dtype: torch.dtype, seed: int) -> None:
    """Random weights, the same draws whatever the quantization (an fp8 weight is the float
    one quantized)."""
    params = dict(model.named_parameters())
    fp8 = _fp8_layers(model)
    gen = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
    for name, p in params.items():
        with torch.no_grad():
            if name in fp8:
                m = fp8[name]
                w = torch.empty(m.out_features, m.in_features, dtype=dtype, device=p.device)
                m.set_weight(w.normal_(0.0, 0.02, generator=gen))
            elif name.endswith("weight_scale"):
                continue
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def _scale_name(name: str) -> str:
    return name + "_scale"            # "...proj.weight" -> "...proj.weight_scale"


def _read(where: dict, names: list[str]) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(where[n], []).append(n)
    tensors = {}
    for f, ns in by_file.items():
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for n in ns:
                    tensors[n] = fh.get_tensor(n)
        except Exception as e:
            raise CheckpointError(f"cannot read {f}: {e}") from None
    return tensors


def _row_scales(name: str, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A checkpoint's weight_scale as one float32 value per output row of ``q``."""
    if s.numel() == 1:
        return s.float().reshape(1).expand(q.shape[0])
    if s.numel() == q.shape[0]:
        return s.float().reshape(-1)
    raise CheckpointError(f"tensor {_scale_name(name)} has shape {tuple(s.shape)}: only one "
                          f"fp8 scale per tensor or per output channel ({q.shape[0]}) is "
                          "supported, not block-wise scales")


def _load(model: StageModel, cfg: ModelConfig, folder: Path) -> None:
    params = dict(model.named_parameters())
    fp8 = _fp8_layers(model)
    where = checkpoint_files(folder)
    wanted = _resolve_tied(_hf_names(cfg, model), where, cfg)
    _check_missing(wanted, where, folder)
    tensors = _read(where, [n for names in wanted.values() for n in names])
    quantized = [n for n, t in tensors.items() if t.dtype == FP8]
    missing = [_scale_name(n) for n in quantized if _scale_name(n) not in where]
    if missing:
        raise CheckpointError(f"checkpoint in {folder} has fp8 tensor {missing[0][:-6]} "
                              f"without its {missing[0]}")
    shipped = _read(where, [_scale_name(n) for n in quantized])
    scales = {n: _row_scales(n, tensors[n], shipped[_scale_name(n)]) for n in quantized}
    for ours, names in wanted.items():
        p = params[ours]
        m = fp8.get(ours)
        if m is not None and all(n in scales for n in names):   # fp8 as shipped
            q = torch.cat([tensors[n] for n in names], 0)
            _check_shape(names, q, (m.out_features, m.in_features))
            m.set_quantized(q, torch.cat([scales[n] for n in names]))
            continue
        parts = [tensors[n].float() * scales[n][:, None] if n in scales else tensors[n]
                 for n in names]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        if m is not None:
            _check_shape(names, t, (m.out_features, m.in_features))
            m.set_weight(t)
            continue
        _check_shape(names, t, tuple(p.shape))
        with torch.no_grad():
            p.copy_(t)


def kv_scale_mode(folder: Path | None, cfg: ModelConfig, requested: str) -> str:
    """``--kv-scales`` resolved against the checkpoint: auto is checkpoint when every layer
    ships ``k_scale``/``v_scale``, else prompt. Raises CheckpointError for checkpoint scales
    the folder lacks, or has for some layers only."""
    if requested in ("prompt", "one"):
        return requested
    have = (kv_quant.has_checkpoint_scales(checkpoint_files(Path(folder)), cfg.num_layers)
            if folder is not None else False)
    if have is None:
        raise CheckpointError(f"checkpoint in {folder} has k_scale/v_scale for some layers "
                              "only: give --kv-scales prompt or one")
    if requested == "checkpoint" and not have:
        raise CheckpointError("--kv-scales checkpoint: "
                              + (f"checkpoint in {folder} has no self_attn.k_scale/v_scale "
                                 "tensors" if folder is not None else "random (dummy) weights "
                                 "have no scales") + "; give --kv-scales prompt or one")
    return "checkpoint" if have else "prompt"


def load_kv_scales(folder: Path, cfg: ModelConfig, layer_start: int,
                   layer_end: int) -> torch.Tensor:
    """The checkpoint's fp8 KV scales of layers [layer_start, layer_end): [L, 2, KVH]."""
    where = checkpoint_files(Path(folder))
    handles = {}
    try:
        def read(name: str) -> torch.Tensor:
            f = where[name]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt", device="cpu")
            return handles[f].get_tensor(name)
        return kv_quant.checkpoint_scales(read, layer_start, layer_end, cfg.num_kv_heads)
    except ValueError as e:
        raise CheckpointError(f"checkpoint in {folder}: {e}") from None
def _check_shape(names: list[str], t: torch.Tensor, expect: tuple) -> None:
    if tuple(t.shape) != tuple(expect):
        raise CheckpointError(f"tensor {names[0]} has shape {tuple(t.shape)}, "
                              f"config.json implies {tuple(expect)}")
