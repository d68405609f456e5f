"""The shape of a Llama-family decoder: parsed from a HF ``config.json`` or named exactly.

One frozen object describes every architecture pipemax runs (Llama 2/3, Mistral, Qwen2/2.5);
the few places they differ are fields (``attention_bias``, ``tie_word_embeddings``,
``rope_scaling``), not subclasses.

Every field of a HF config.json that changes the model's math is either honoured here or
refused with one line (``ModelConfigError``), as transformers reads it for the architecture:
sizes, ``head_dim``, ``rms_norm_eps``, ``rope_theta``, ``rope_scaling`` (default, linear,
llama3), ``tie_word_embeddings``, the biases (Llama: ``attention_bias`` on q/k/v/o and
``mlp_bias``; Qwen2: q/k/v always; Mistral: none), sliding windows (the context is capped at
the window, where attention is exact), ``hidden_act`` (silu), ``partial_rotary_factor`` (1).
``pretraining_tp`` only splits matmuls (transformers 5 ignores it) and ``attention_dropout``
acts in training only. A quantized checkpoint (``quantization_config``) is refused, except
one of fp8 (e4m3) weights with one scale per tensor or per output channel (compressed-tensors'
``float-quantized``, or HF's ``fp8`` without blocks), which sets ``quantization`` to fp8.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class ModelConfigError(ValueError):
    """A config that pipemax cannot run; the message is one line for the user."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # rope_scaling as a sorted tuple of (key, value) pairs so the object stays hashable
    rope_scaling: tuple = ()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False     # q/k/v biases
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    torch_dtype: str = "bfloat16"
    o_proj_bias: bool = False        # Llama's attention_bias also covers o_proj
    mlp_bias: bool = False           # gate/up/down biases (Llama's mlp_bias)
    quantization: str = ""           # "fp8": the checkpoint ships e4m3 weights and scales

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ModelConfigError(f"model config: {f} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"model config: num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}")
        rs = self.rope_scaling_dict
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in _ROPE_KEYS:
                raise ModelConfigError(f"model config: rope_scaling type {kind!r} is not supported "
                                       "(supported: default, linear, llama3)")
            lacking = [k for k in _ROPE_KEYS[kind] if rs.get(k) is None]
            if lacking:
                raise ModelConfigError(f"model config: rope_scaling of type {kind} lacks "
                                       + ", ".join(lacking))

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_linear_params(self) -> int:
        """Weights of one decoder layer's four GEMMs (q/k/v, o, gate/up, down), no biases."""
        h = self.hidden_size
        return 2 * h * self.q_size + 2 * h * self.kv_size + 3 * h * self.intermediate_size

    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention + MLP + 2 norms)."""
        h = self.hidden_size
        biases = 0
        if self.attention_bias:
            biases += self.q_size + 2 * self.kv_size
        if self.o_proj_bias:
            biases += h
        if self.mlp_bias:
            biases += 2 * self.intermediate_size + h
        return self.layer_linear_params() + biases + 2 * h

    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Final norm + lm_head (the lm_head counts even when tied: the last stage holds a copy)."""
        return self.hidden_size + self.vocab_size * self.hidden_size

    def kv_bytes_per_token_layer(self, dtype_bytes: int) -> int:
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- constructors --------------------------------------------------------------------
    @staticmethod
    def from_hf_dict(d: dict, name: str = "model") -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = None
        for a in archs:
            if a in SUPPORTED_ARCHITECTURES:
                arch = SUPPORTED_ARCHITECTURES[a]
                break
        if arch is None:
            mt = d.get("model_type")
            if mt in ("llama", "mistral", "qwen2") and not archs:
                arch = mt
            else:
                shown = ", ".join(archs) if archs else f"model_type={mt!r}"
                raise ModelConfigError(
                    f"unsupported architecture {shown}; supported: "
                    + ", ".join(sorted(SUPPORTED_ARCHITECTURES)))
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            kw = dict(
                name=name,
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6 if arch == "qwen2" else 1e-5)),
                rope_theta=float(d.get("rope_theta", _rope_theta_from_params(d))),
                rope_scaling=_rope_scaling_tuple(d.get("rope_scaling") or d.get("rope_parameters")),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                # as transformers builds each architecture (Qwen2 ignores attention_bias)
                attention_bias={"llama": bool(d.get("attention_bias", False)), "mistral": False,
                                "qwen2": True}[arch],
                o_proj_bias=arch == "llama" and bool(d.get("attention_bias", False)),
                mlp_bias=arch == "llama" and bool(d.get("mlp_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_eos_tuple(d.get("eos_token_id")),
                torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            )
            _refuse_unsupported(d)
            kw["quantization"] = _checkpoint_quantization(d.get("quantization_config"))
            sw = _sliding_window(d, arch, kw["num_layers"])
        except KeyError as e:
            raise ModelConfigError(f"config.json lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelConfigError(f"config.json has a bad value: {e}") from None
        if sw is not None and sw < kw["max_position_embeddings"]:
            # Attention is exact as long as no context exceeds the window: cap the context there.
            kw["max_position_embeddings"] = sw
        return ModelConfig(**kw)

    @staticmethod
    def from_dir(path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise ModelConfigError(f"model folder {path} does not exist")
        if not cfg_file.is_file():
            raise ModelConfigError(f"model folder {path} has no config.json")
        try:
            d = json.loads(cfg_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"{cfg_file} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ModelConfigError(f"{cfg_file} is not a JSON object")
        cfg = ModelConfig.from_hf_dict(d, name=path.name)
        gen = path / "generation_config.json"
        if gen.is_file():
            try:
                g = json.loads(gen.read_text())
                eos = _eos_tuple(g.get("eos_token_id"))
                if eos:
                    cfg = cfg.replace(eos_token_ids=eos)
                if g.get("bos_token_id") is not None:
                    cfg = cfg.replace(bos_token_id=int(g["bos_token_id"]))
            except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
                raise ModelConfigError(f"{gen} is not valid: {e}") from None
        return cfg


# rope_scaling types pipemax computes (stages/model.py: rope_inv_freq) and the keys each needs
_ROPE_KEYS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}
_ACTIVATIONS = ("silu", "swish")   # the same function in transformers' ACT2FN


def _refuse_unsupported(d: dict) -> None:
    """Fields that change the math in ways pipemax does not compute: one line each."""
    act = d.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ModelConfigError(f"model config: hidden_act {act!r} is not supported (supported: "
                               "silu)")
    rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    prf = d.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0))
    if prf is not None and float(prf) != 1.0:
        raise ModelConfigError(f"model config: partial_rotary_factor {prf} is not supported "
                               "(rotary embedding on the whole head only)")


def _checkpoint_quantization(q) -> str:
    """"fp8" for a checkpoint of e4m3 weights with per-tensor or per-channel scales, "" for
    none; any other quantization_config is refused in one line."""
    if not q:
        return ""
    method = q.get("quant_method", "unknown") if isinstance(q, dict) else q
    why = _fp8_refusal(q) if method in ("fp8", "compressed-tensors") else ""
    if why is None:
        return "fp8"
    raise ModelConfigError(f"model config: quantized checkpoints are not supported "
                           f"(quantization_config: {method}{why}); use fp8 (e4m3, one scale "
                           "per tensor or per channel) or float16/bfloat16/float32 weights")


def _fp8_refusal(q: dict) -> str | None:
    """None if pipemax reads this fp8 quantization_config, else why not (for the message)."""
    if q.get("quant_method") == "fp8":
        return ", weight_block_size" if q.get("weight_block_size") else None
    if q.get("kv_cache_scheme"):
        return ", kv_cache_scheme"
    if q.get("format") not in ("float-quantized", "naive-quantized"):
        return f", format {q.get('format')!r}"
    groups = q.get("config_groups") or {}
    for g in groups.values():
        w = (g or {}).get("weights") or {}
        if (w.get("num_bits"), w.get("type"), w.get("strategy")) not in (
                (8, "float", "tensor"), (8, "float", "channel")):
            return (f", weights {w.get('num_bits')}-bit {w.get('type')} "
                    f"{w.get('strategy')}-wise")
    return None if groups else ", no config_groups"


def _sliding_window(d: dict, arch: str, num_layers: int) -> int | None:
    """The attention window some layer uses, as transformers reads the config; None if none."""
    sw = d.get("sliding_window")
    if arch == "llama" or not sw:
        return None
    if arch == "mistral":                      # every layer, whenever a window is set
        return int(sw)
    if not d.get("use_sliding_window", False):  # qwen2: the switch, then the layers listed
        return None                             # or else those from max_window_layers up
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    return int(sw) if "sliding_attention" in types else None


def _eos_tuple(v) -> tuple:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def _rope_theta_from_params(d: dict) -> float:
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return 10000.0


def _rope_scaling_tuple(v) -> tuple:
    if not v:
        return ()
    if not isinstance(v, dict):
        raise ModelConfigError(f"rope_scaling must be an object, got {v!r}")
    kind = v.get("rope_type", v.get("type"))
    if kind in (None, "default"):
        return ()
    # rope_theta sits inside rope_parameters in newer configs; it is a field of its own here
    return tuple(sorted((str(k), v[k]) for k in v
                        if k != "rope_theta" and not isinstance(v[k], (list, dict))))


_LLAMA3_SCALING = _rope_scaling_tuple({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})

# Real shapes for benchmarks with --load-format dummy. Keys are exact names.
BUILTIN_MODELS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig("llama2-7b", "llama", 32000, 4096, 11008, 32, 32, 32, 128,
                             1e-5, 10000.0, (), 4096, False, False, 1, (2,)),
    "llama2-13b": ModelConfig("llama2-13b", "llama", 32000, 5120, 13824, 40, 40, 40, 128,
                              1e-5, 10000.0, (), 4096, False, False, 1, (2,)),
    "llama2-70b": ModelConfig("llama2-70b", "llama", 32000, 8192, 28672, 80, 64, 8, 128,
                              1e-5, 10000.0, (), 4096, False, False, 1, (2,)),
    "llama3-8b": ModelConfig("llama3-8b", "llama", 128256, 4096, 14336, 32, 32, 8, 128,
                             1e-5, 500000.0, (), 8192, False, False, 128000, (128001, 128009)),
    "llama3.1-8b": ModelConfig("llama3.1-8b", "llama", 128256, 4096, 14336, 32, 32, 8, 128,
                               1e-5, 500000.0, _LLAMA3_SCALING, 131072, False, False, 128000,
                               (128001, 128008, 128009)),
    "llama3-70b": ModelConfig("llama3-70b", "llama", 128256, 8192, 28672, 80, 64, 8, 128,
                              1e-5, 500000.0, (), 8192, False, False, 128000, (128001, 128009)),
    "mistral-7b": ModelConfig("mistral-7b", "mistral", 32768, 4096, 14336, 32, 32, 8, 128,
                              1e-5, 1000000.0, (), 32768, False, False, 1, (2,)),
    "qwen2.5-7b": ModelConfig("qwen2.5-7b", "qwen2", 152064, 3584, 18944, 28, 28, 4, 128,
                              1e-6, 1000000.0, (), 32768, False, True, 151643, (151645, 151643)),
    "qwen2.5-14b": ModelConfig("qwen2.5-14b", "qwen2", 152064, 5120, 13824, 48, 40, 8, 128,
                               1e-6, 1000000.0, (), 32768, False, True, 151643, (151645, 151643)),
}


def builtin_config(name: str) -> ModelConfig:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ModelConfigError(
            f"unknown model name {name!r}; built-in names: " + ", ".join(sorted(BUILTIN_MODELS))
        ) from None


def apply_overrides(cfg: ModelConfig, overrides: list[str]) -> ModelConfig:
    """Apply ``key=value`` overrides (e.g. ``num_layers=4``) to a config, checking each key."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ModelConfigError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        if k not in fields or k in ("rope_scaling", "eos_token_ids"):
            raise ModelConfigError(f"override key {k!r} is not a model field; fields: "
                                   + ", ".join(n for n in fields if n not in ("rope_scaling", "eos_token_ids")))
        cur = getattr(cfg, k)
        try:
            if isinstance(cur, bool):
                if v.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(v)
                changes[k] = v.lower() in ("true", "1")
            elif isinstance(cur, int) or k == "bos_token_id":
                changes[k] = int(v)
            elif isinstance(cur, float):
                changes[k] = float(v)
            else:
                changes[k] = v
        except ValueError:
            raise ModelConfigError(f"override {k}={v!r}: not a valid {type(cur).__name__}") from None
    return cfg.replace(**changes)
