"""The built-in default model: a tiny random-weight Llama with a small byte-level BPE tokenizer.

Everything here is deterministic (fixed text, fixed seeds) and uses only torch, safetensors and
tokenizers, so the same files come out on every machine. ``write_random_checkpoint`` and
``write_tokenizer_files`` are also what tests use to build small HF-format folders.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)

from pipemax.model_config import ModelConfig

TINY_NAME = "pipemax-tiny"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2; byte tokens follow at 3..258
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

DEFAULT_PROMPTS: list[str] = [
    "The quick brown fox",
    "Once upon a time, in a small village by the sea,",
    "The three most important things to remember when cooking rice are",
    "Here is a short poem about the moon:",
    "In the year 2049, the first city on Mars",
    "def fibonacci(n):",
]

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
}

# Qwen2's split (one digit per piece), the pipeline transformers' Qwen2Tokenizer rebuilds for any
# qwen2 checkpoint: with it AutoTokenizer agrees with tokenizer.json for every architecture.
_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# The fixed text the tokenizer's merges are learned from.
CORPUS = """\
The sun rose slowly over the quiet hills, and the light spread across the fields where the
farmers were already at work. In the village, the bakers had been awake for hours, and the smell
of fresh bread drifted through the narrow streets. Children ran to school, laughing and shouting,
while their parents talked about the weather, the harvest and the price of wheat.
Once upon a time there was a small boat that wanted to see the ocean. Every morning it watched the
big ships leave the harbor, and every evening it watched them come back. One day the wind changed,
the tide was high, and the little boat finally sailed out past the lighthouse into the open sea.
To cook rice well, rinse it first, then use the right amount of water: about one and a half cups
of water for every cup of rice. Bring it to a boil, cover the pot, turn the heat down low and wait
for fifteen minutes. Do not lift the lid! When the time is up, let it rest before you serve it.
The computer is a machine that follows instructions. A program is a list of those instructions,
written in a language that people can read and the machine can run. Good programs are simple,
tested and easy to change; bad programs are clever, fragile and hard to understand.
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 20 42 100 256 1024 2048 3.14 1,000,000 and 99%.
The history of science is a history of questions. Why does the moon change its shape? Why do
apples fall down and not up? How far away are the stars? Each answer led to new questions, and
each question led people to build better tools, to measure more carefully and to think again.
She said, "I will be there at seven o'clock." He answered, "That's fine, but don't be late."
They're going to the market; we've been there already, and you'll see it's very busy today.
In the winter the river freezes, and in the spring the ice breaks with a sound like thunder.
Birds return from the south, flowers open in the gardens, and the days grow longer and warmer.
The model reads a prompt, predicts the next token, adds it to the text and repeats the process
until it reaches the end of the sequence or the maximum number of tokens that it was allowed.
"""


# ---- tokenizer ---------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of ByteLevel pre-tokenization."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _learn_merges(text: str, n_new: int) -> tuple[list[tuple[str, str]], list[str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    words = Counter(w for w, _ in _pre_tokenizer().pre_tokenize_str(text))
    segs = {w: list(w) for w in words}
    known = set(_bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    new_tokens: list[str] = []
    while len(new_tokens) < n_new:
        pairs: Counter = Counter()
        for w, f in words.items():
            s = segs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append((a, b))
        if a + b not in known:
            known.add(a + b)
            new_tokens.append(a + b)
        for w, s in segs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out
    return merges, new_tokens


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Deterministic byte-level BPE: <s>, </s>, <pad>, 256 byte tokens, then learned merges."""
    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size must be at least {base}, got {vocab_size}")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = len(vocab)
    merges, new_tokens = _learn_merges(CORPUS, vocab_size - base)
    if len(new_tokens) < vocab_size - base:
        raise ValueError(f"vocab_size {vocab_size} is too large for the built-in text "
                         f"(at most {base + len(new_tokens)})")
    for t in new_tokens:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    return tok


def write_tokenizer_files(folder, vocab_size: int, *, model_max_length: int = 2048) -> None:
    """tokenizer.json + tokenizer_config.json (bos <s>, eos </s>, a simple chat template)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": None,  # stops transformers' Qwen2Tokenizer from adding its own default
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                                  encoding="utf-8")


# ---- random checkpoints ------------------------------------------------------------------
_ARCH_DEFAULTS = {
    "LlamaForCausalLM": {"model_type": "llama", "attention_bias": False, "mlp_bias": False,
                         "pretraining_tp": 1, "rope_theta": 10000.0, "rope_scaling": None},
    "MistralForCausalLM": {"model_type": "mistral", "sliding_window": None, "rope_theta": 10000.0},
    "Qwen2ForCausalLM": {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": None,
                         "rope_theta": 10000.0, "rope_scaling": None},
}


def complete_hf_config(cfg_dict: dict, dtype: str = "float32") -> dict:
    """An HF config.json dict: ``cfg_dict`` over the defaults of its architecture."""
    archs = cfg_dict.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] not in _ARCH_DEFAULTS:
        raise ValueError(f"unsupported architecture {archs[0]!r}; one of {sorted(_ARCH_DEFAULTS)}")
    out = {
        "architectures": list(archs),
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        **_ARCH_DEFAULTS[archs[0]],
    }
    out.update(cfg_dict)
    out["torch_dtype"] = dtype
    heads = int(out["num_attention_heads"])
    out.setdefault("num_key_value_heads", heads)
    out.setdefault("head_dim", int(out["hidden_size"]) // heads)
    return out


def _tensor_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes in a fixed order (the order random values are drawn in)."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    shapes = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (q, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h))]
        if cfg.attention_bias:
            shapes += [(p + "self_attn.q_proj.bias", (q,)),
                       (p + "self_attn.k_proj.bias", (kv,)),
                       (p + "self_attn.v_proj.bias", (kv,))]
        shapes.append((p + "self_attn.o_proj.weight", (h, q)))
        if cfg.o_proj_bias:
            shapes.append((p + "self_attn.o_proj.bias", (h,)))
        shapes += [(p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (inter, h)),
                   (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter))]
        if cfg.mlp_bias:
            shapes += [(p + "mlp.gate_proj.bias", (inter,)), (p + "mlp.up_proj.bias", (inter,)),
                       (p + "mlp.down_proj.bias", (h,))]
    shapes.append(("model.norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        shapes.append(("lm_head.weight", (cfg.vocab_size, h)))
    return shapes


def random_weights(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float32,
                   std: float = 0.02) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, std); norm weights ~ 1 + N(0, 0.1); biases ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _tensor_shapes(cfg):
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            x = 1.0 + 0.1 * x
        elif name.endswith(".bias"):
            x = 0.1 * x
        else:
            x = std * x
        out[name] = x.to(dtype).contiguous()
    return out


def _split_shards(names: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Consecutive groups of tensors of about equal bytes, none empty."""
    total = sum(sizes.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for i, name in enumerate(names):
        k = min(shards - 1, acc * shards // max(total, 1))
        k = max(k, shards - (len(names) - i))  # leave at least one tensor for each later shard
        groups[k].append(name)
        acc += sizes[name]
    # a group can only be empty if an earlier one took its share; move single tensors down
    for k in range(1, shards):
        if not groups[k]:
            donor = max(range(k), key=lambda j: len(groups[j]))
            groups[k].insert(0, groups[donor].pop())
    return groups


def write_random_checkpoint(folder, cfg_dict: dict, seed: int, *, shards: int = 1,
                            dtype: str = "float32", std: float = 0.02) -> None:
    """config.json, generation_config.json and random HF-named safetensors weights (1 or more files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype_name = str(dtype).removeprefix("torch.")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}.get(dtype_name)
    if torch_dtype is None:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    hf = complete_hf_config(cfg_dict, dtype_name)
    cfg = ModelConfig.from_hf_dict(hf, name=folder.name)
    weights = random_weights(cfg, seed, torch_dtype, std)
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id"),
           "pad_token_id": hf.get("pad_token_id")}
    (folder / "generation_config.json").write_text(
        json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2, sort_keys=True) + "\n")
    meta = {"format": "pt"}
    names = list(weights)
    if shards <= 1:
        save_file(weights, str(folder / "model.safetensors"), metadata=meta)
        return
    if shards > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    sizes = {n: weights[n].numel() * weights[n].element_size() for n in names}
    weight_map = {}
    for k, group in enumerate(_split_shards(names, sizes, shards)):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in group}, str(folder / fname), metadata=meta)
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- the cached default model ------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("PIPEMAX_CACHE") or Path.home() / ".cache" / "pipemax")


def ensure_tiny_model(cache_dir=None) -> Path:
    """The folder of the built-in tiny model, made on first use (safe if several do it at once)."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = base / TINY_NAME
    if (target / "config.json").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=base))
    try:
        write_random_checkpoint(tmp, TINY_CONFIG, seed=0)
        write_tokenizer_files(tmp, TINY_CONFIG["vocab_size"],
                              model_max_length=TINY_CONFIG["max_position_embeddings"])
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not someone else winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
