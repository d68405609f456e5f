"""pipemax.tiny (the built-in model and random checkpoints) and the tests/checkpoints.py builders."""
import json
import threading

import pytest
from safetensors import safe_open
import torch
from safetensors.torch import load_file

from checkpoints import KINDS, checkpoint_root, hf_greedy, hf_logprobs, make_checkpoint
from pipemax import tiny
from pipemax.model_config import ModelConfig
from pipemax.tokenizer import Tokenizer


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _safetensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return checkpoint_root(tmp_path_factory)


# ---- the built-in tiny model ---------------------------------------------------------------
def test_ensure_tiny_model_is_deterministic_and_cached(tmp_path):
    a = tiny.ensure_tiny_model(tmp_path / "a")
    b = tiny.ensure_tiny_model(tmp_path / "b")
    assert a == tmp_path / "a" / tiny.TINY_NAME and a.is_dir()
    fa = _files(a)
    assert set(fa) == {"config.json", "generation_config.json", "model.safetensors",
                       "tokenizer.json", "tokenizer_config.json"}
    assert fa == _files(b)  # byte-identical
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_model(tmp_path / "a") == a  # second use: the cached folder
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "a").iterdir()] == [tiny.TINY_NAME]  # no temp leftovers


def test_ensure_tiny_model_uses_pipemax_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEMAX_CACHE", str(tmp_path / "env"))
    assert tiny.ensure_tiny_model() == tmp_path / "env" / tiny.TINY_NAME


def test_ensure_tiny_model_concurrent_first_use(tmp_path):
    results, errors = [], []

    def run():
        try:
            results.append(tiny.ensure_tiny_model(tmp_path))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [tiny.TINY_NAME]
    assert Tokenizer.from_dir(results[0]) is not None


def test_tiny_model_shape_and_transformers_loading(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tiny.ensure_tiny_model(tmp_path)
    cfg = ModelConfig.from_dir(path)
    assert (cfg.architecture, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings, cfg.torch_dtype) == \
        ("llama", 64, 4, 4, 2, 128, 512, 2048, "float32")
    assert cfg.bos_token_id == 0 and cfg.eos_token_ids == (1,)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched tensors
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 4
    saved = _safetensors(path)
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    norm = saved["model.layers.0.input_layernorm.weight"]
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.01  # around 1, not exactly 1
    assert 0.015 < saved["model.layers.0.mlp.up_proj.weight"].std() < 0.025
    hf_tok = AutoTokenizer.from_pretrained(path)
    tok = Tokenizer.from_dir(path)
    for prompt in tiny.DEFAULT_PROMPTS:
        assert tok.encode(prompt) == hf_tok.encode(prompt)
    ids = torch.tensor([tok.encode(tiny.DEFAULT_PROMPTS[0])])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_default_prompts():
    assert 5 <= len(tiny.DEFAULT_PROMPTS) <= 8
    assert all(isinstance(p, str) and p for p in tiny.DEFAULT_PROMPTS)


# ---- tokenizer building ----------------------------------------------------------------------
def test_build_tokenizer():
    tok = tiny.build_tokenizer(400)
    assert tok.get_vocab_size() == 400
    assert tok.to_str() == tiny.build_tokenizer(400).to_str()
    assert [tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>")] == [0, 1, 2]
    enc = tok.encode("hello world")
    assert enc.ids[0] == 0 and tok.decode(enc.ids, skip_special_tokens=True) == "hello world"
    assert len(enc.ids) < 1 + len("hello world")  # merges are used
    text = "naïve 世界 🙂 \x00\xff"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text  # any byte encodes
    with pytest.raises(ValueError):
        tiny.build_tokenizer(100)


# ---- random checkpoints ----------------------------------------------------------------------
QWEN_CFG = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 300, "tie_word_embeddings": True}


def test_write_random_checkpoint_sharded_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = dict(tiny.TINY_CONFIG, num_hidden_layers=3)
    tiny.write_random_checkpoint(tmp_path / "s", cfg, seed=7, shards=2)
    tiny.write_random_checkpoint(tmp_path / "one", cfg, seed=7)
    shards = sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    saved = _safetensors(tmp_path / "s")
    assert set(index["weight_map"]) == set(saved)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
    one = _safetensors(tmp_path / "one")
    assert set(one) == set(saved) and all(torch.equal(one[k], saved[k]) for k in one)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "s", output_loading_info=True)
    assert not any(info.values()), info
    state = model.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)


def test_write_random_checkpoint_qwen2_bias_tied_bf16(tmp_path):
    from transformers import AutoModelForCausalLM
    tiny.write_random_checkpoint(tmp_path, QWEN_CFG, seed=3, dtype="bfloat16", shards=3)
    saved = _safetensors(tmp_path)
    assert "lm_head.weight" not in saved
    assert "model.layers.1.self_attn.k_proj.bias" in saved
    assert "model.layers.1.self_attn.o_proj.bias" not in saved
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    assert saved["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.architecture == "qwen2" and cfg.attention_bias and cfg.tie_word_embeddings
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                       dtype=torch.bfloat16)
    assert not any(info.values()), info
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_write_random_checkpoint_seeds(tmp_path):
    tiny.write_random_checkpoint(tmp_path / "a", QWEN_CFG, seed=1)
    tiny.write_random_checkpoint(tmp_path / "b", QWEN_CFG, seed=1)
    tiny.write_random_checkpoint(tmp_path / "c", QWEN_CFG, seed=2)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a")["model.safetensors"] != _files(tmp_path / "c")["model.safetensors"]
    with pytest.raises(ValueError, match="unsupported architecture"):
        tiny.write_random_checkpoint(tmp_path / "d", dict(tiny.TINY_CONFIG,
                                                          architectures=["GPT2LMHeadModel"]), 0)
    # a Llama's attention_bias covers q/k/v and o, as transformers builds it
    tiny.write_random_checkpoint(tmp_path / "e", dict(tiny.TINY_CONFIG, attention_bias=True), 0)
    with safe_open(str(tmp_path / "e" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.o_proj.bias"} <= names


# ---- tests/checkpoints.py ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama-gqa-sharded", "llama3-rope", "qwen2-bias-tied", "mistral"])
def test_checkpoint_kinds(ckpt_root, kind):
    path = make_checkpoint(ckpt_root, kind)
    assert make_checkpoint(ckpt_root, kind) == path  # built once
    cfg = ModelConfig.from_dir(path)
    tok = Tokenizer.from_dir(path)
    assert cfg.vocab_size == tok.vocab_size and cfg.hidden_size == 64
    saved = _safetensors(path)
    if kind == "llama-gqa-sharded":
        assert len(list(path.glob("model-*.safetensors"))) >= 2
        assert cfg.num_layers == 6 and (cfg.num_heads, cfg.num_kv_heads) == (4, 2)
    if kind == "llama3-rope":
        assert cfg.rope_theta == 500000.0 and cfg.max_position_embeddings == 1024
        assert cfg.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}
        assert cfg.eos_token_ids == (1, 2)
    if kind == "qwen2-bias-tied":
        assert cfg.architecture == "qwen2" and cfg.attention_bias and cfg.tie_word_embeddings
        assert "lm_head.weight" not in saved
        assert saved["model.layers.0.self_attn.v_proj.bias"].abs().min() > 0
    if kind == "mistral":
        assert cfg.architecture == "mistral" and cfg.max_position_embeddings == 512
    norm = saved["model.norm.weight"]
    assert norm.std() > 0.01  # norm weights are not all ones


@pytest.mark.parametrize("kind", ["llama-gqa-sharded", "qwen2-bias-tied", "mistral"])
def test_hf_greedy_is_plain_argmax_and_varies(ckpt_root, kind):
    path = make_checkpoint(ckpt_root, kind)
    tok = Tokenizer.from_dir(path)
    prompts = [tok.encode(p) for p in tiny.DEFAULT_PROMPTS[:3]]
    outs = hf_greedy(path, prompts, 24)
    for ids, new in zip(prompts, outs):
        assert len(new) == 24
        assert len(set(new)) >= 12, new  # not stuck on one token
        # the same as an argmax loop over full forwards
        seq = list(ids)
        for _ in range(len(new)):
            seq.append(int(hf_logprobs(path, seq).argmax()))
        assert seq[len(ids):] == new
    lp = hf_logprobs(path, prompts[0])
    assert lp.dtype == torch.float32 and lp.shape == (tok.vocab_size,)
    assert torch.allclose(lp.exp().sum(), torch.tensor(1.0), atol=1e-5)


def test_hf_greedy_ignores_eos(ckpt_root, tmp_path):
    import shutil
    src = make_checkpoint(ckpt_root, "mistral")
    tok = Tokenizer.from_dir(src)
    prompt = tok.encode(tiny.DEFAULT_PROMPTS[0])
    new = hf_greedy(src, [prompt], 8)[0]
    path = tmp_path / "eos"
    shutil.copytree(src, path)
    for name in ("config.json", "generation_config.json"):  # make the 3rd greedy token an EOS
        d = json.loads((path / name).read_text())
        d["eos_token_id"] = [new[2]]
        (path / name).write_text(json.dumps(d))
    assert hf_greedy(path, [prompt], 8)[0] == new


def test_checkpoint_kinds_listed():
    assert {"llama-gqa-sharded", "llama3-rope", "qwen2-bias-tied", "mistral"} <= set(KINDS)
    with pytest.raises(ValueError):
        make_checkpoint("/nonexistent", "gpt2")
