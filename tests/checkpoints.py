"""Tiny HF checkpoints for tests, built with transformers, plus transformers reference outputs.

``make_checkpoint(tmp_path, kind)`` builds a folder once per test session (later calls with the
same kind/dtype/seed return the folder already built, whatever ``tmp_path`` they pass). Use the
session's shared folder so every test module reuses the same builds:

    @pytest.fixture(scope="session")
    def llama_dir(tmp_path_factory):
        return make_checkpoint(checkpoint_root(tmp_path_factory), "llama-gqa-sharded")

Weights are drawn with a fixed seed at std ``INIT_STD`` (large enough that greedy continuations
change token to token instead of repeating one token); norm weights are 1 + noise and biases
are noise, so code that ignores them fails.
"""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

from pipemax.tiny import write_tokenizer_files

VOCAB = 512
INIT_STD = 0.2

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# kind -> (architecture, config kwargs, save options)
KINDS: dict[str, tuple[str, dict, dict]] = {
    # 6 layers so 3 pipeline stages get 2 layers each; several safetensors shards
    "llama-gqa-sharded": ("llama", dict(num_hidden_layers=6, num_attention_heads=4,
                                        num_key_value_heads=2), {"sharded": True}),
    # config.json in the hub's Llama 3.1 format (rope_theta + rope_scaling), eos list
    "llama3-rope": ("llama", dict(num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, rope_theta=500000.0,
                                  rope_scaling=dict(_LLAMA3_ROPE), max_position_embeddings=1024),
                    {"eos_list": [1, 2], "classic_rope": True}),
    # the same model as transformers 5 writes it: RoPE settings under "rope_parameters"
    "llama3-rope-params": ("llama", dict(num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2, rope_theta=500000.0,
                                         rope_scaling=dict(_LLAMA3_ROPE),
                                         max_position_embeddings=1024),
                           {"eos_list": [1, 2]}),
    "qwen2-bias-tied": ("qwen2", dict(num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True,
                                      use_sliding_window=False, sliding_window=None), {}),
    # 8 layers, for 8 pipeline stages of one layer each
    "llama-8layers": ("llama", dict(num_hidden_layers=8, num_attention_heads=4,
                                    num_key_value_heads=2), {}),
    "mistral": ("mistral", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                sliding_window=None), {}),
    # Llama with every bias it can have: q/k/v/o (attention_bias) and gate/up/down (mlp_bias)
    "llama-bias": ("llama", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 attention_bias=True, mlp_bias=True), {}),
}

_BUILT: dict[tuple, Path] = {}


def _hf_config(arch: str, kw: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, head_dim=16,
                max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
                pad_token_id=2, tie_word_embeddings=False)
    base.update(kw)
    return cls(**base)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied weights appear once
        x = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            x = 1.0 + 0.1 * x
        elif name.endswith(".bias"):
            x = 0.1 * x
        else:
            x = INIT_STD * x
        p.copy_(x.to(p.dtype))


def _build(folder: Path, kind: str, dtype: torch.dtype, seed: int) -> None:
    from transformers import AutoModelForCausalLM
    arch, kw, opts = KINDS[kind]
    config = _hf_config(arch, kw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model = model.to(dtype)
    # ~4 shards for the sharded kind, one file otherwise
    shard = "200KB" if opts.get("sharded") else "1GB"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if opts.get("classic_rope"):
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = rp
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if "eos_list" in opts:
        gen_file = folder / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        gen["eos_token_id"] = list(opts["eos_list"])
        gen_file.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    write_tokenizer_files(folder, VOCAB, model_max_length=config.max_position_embeddings)
    if opts.get("sharded"):
        assert len(list(folder.glob("model-*.safetensors"))) >= 2
        assert (folder / "model.safetensors.index.json").is_file()


def checkpoint_root(tmp_path_factory) -> Path:
    """One folder per pytest session (pass the ``tmp_path_factory`` fixture) for all builds."""
    root = Path(tmp_path_factory.getbasetemp()) / "pipemax-checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return root


def make_checkpoint(tmp_path, kind: str, *, dtype=torch.float32, seed=0) -> Path:
    """A tiny HF checkpoint folder of ``kind`` (one of KINDS), built once per session."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; kinds: {', '.join(KINDS)}")
    key = (kind, str(dtype), seed)
    cached = _BUILT.get(key)
    if cached is not None and (cached / "config.json").is_file():
        return cached
    name = f"{kind}-{str(dtype).removeprefix('torch.')}-s{seed}"
    folder = Path(tmp_path) / name
    if not (folder / "config.json").is_file():
        tmp = Path(tmp_path) / (name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        with _one_thread():
            _build(tmp, kind, dtype, seed)
        tmp.rename(folder)
    _BUILT[key] = folder
    return folder


# ---- transformers references ---------------------------------------------------------------
@contextlib.contextmanager
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine (parallel test
    processes) OpenMP threads contending for cores make each forward ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=8)
def _load(path: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager")
    # generate() fills unset options from the model's own generation config: clear EOS there
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.eval()


def hf_greedy(path, prompt_ids_list, max_new_tokens: int, eos=None) -> list[list[int]]:
    """transformers greedy continuations (new ids only), one prompt at a time; EOS ignored
    unless ``eos`` (a list of ids) is given, then a continuation ends with the first of them."""
    from transformers import GenerationConfig
    model = _load(str(path))
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=None,
                          eos_token_id=list(eos) if eos else None, pad_token_id=None,
                          bos_token_id=None, num_beams=1, use_cache=True)
    outs = []
    with torch.no_grad(), _one_thread():
        for ids in prompt_ids_list:
            x = torch.tensor([list(ids)], dtype=torch.long)
            y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)
            new = y[0, x.shape[1]:].tolist()
            assert len(new) == max_new_tokens or (eos and new[-1] in eos), (len(new), max_new_tokens)
            outs.append(new)
    return outs


def hf_logprobs(path, ids) -> torch.Tensor:
    """log_softmax of the last position's logits (float32, shape [vocab])."""
    model = _load(str(path))
    with torch.no_grad(), _one_thread():
        logits = model(torch.tensor([list(ids)], dtype=torch.long)).logits
    return torch.log_softmax(logits[0, -1].float(), dim=-1)


def hf_continuation_logprobs(path, prompt_ids, new_ids) -> torch.Tensor:
    """log_softmax of the logits that chose each of ``new_ids`` after ``prompt_ids``, from one
    forward pass over the whole sequence (float32, shape [len(new_ids), vocab])."""
    model = _load(str(path))
    ids = list(prompt_ids) + list(new_ids)
    with torch.no_grad(), _one_thread():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1:len(ids) - 1], dim=-1)


def hf_greedy_fp8(path, prompt_ids_list, max_new_tokens: int, scales=None):
    """transformers greedy continuations with every K and V rounded through an fp8 (e4m3) KV
    cache, as pipemax stores it: x -> fp8(clamp(x / scale, +-448)) * scale, after RoPE, with
    ``scales`` [num_layers, 2, kv_heads] (None: all 1.0). Returns, per prompt, (new ids, the
    top-2 logit gap at each of them)."""
    from transformers import AttentionInterface, AutoModelForCausalLM, GenerationConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def roundtrip(x, s):                   # x [B, KVH, S, D], s [KVH]
        s = s.to(x.dtype)[None, :, None, None]
        return ((x / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)) * s

    def attention(module, query, key, value, attention_mask, **kw):
        kvh = key.shape[1]
        s = (scales[module.layer_idx] if scales is not None
             else torch.ones(2, kvh, dtype=torch.float32))
        return sdpa_attention_forward(module, query, roundtrip(key, s[0]),
                                      roundtrip(value, s[1]), attention_mask, **kw)

    AttentionInterface.register("pipemax_fp8_kv", attention)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation="pipemax_fp8_kv").eval()
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=None,
                          eos_token_id=None, pad_token_id=None, bos_token_id=None, num_beams=1,
                          use_cache=True, output_scores=True, return_dict_in_generate=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    outs = []
    with torch.no_grad(), _one_thread():
        for ids in prompt_ids_list:
            x = torch.tensor([list(ids)], dtype=torch.long)
            y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)
            top = torch.stack([s[0].float() for s in y.scores]).topk(2, dim=-1).values
            outs.append((y.sequences[0, x.shape[1]:].tolist(), (top[:, 0] - top[:, 1]).tolist()))
    return outs
