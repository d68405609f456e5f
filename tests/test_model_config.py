"""Every config.json field that changes the math is honoured or refused with one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from checkpoints import checkpoint_root, hf_greedy, make_checkpoint
from cli import assert_one_line_error, read_results, run_cli, write_jsonl
from pipemax.model_config import ModelConfig, ModelConfigError

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
         "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


def cfg_of(**fields) -> ModelConfig:
    arch = fields.pop("arch", "llama")
    d = {**LLAMA, "model_type": arch,
         "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                            "qwen2": "Qwen2ForCausalLM"}[arch]], **fields}
    return ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("fields,needle", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                           "partial_rotary_factor": 0.25}), "partial_rotary_factor 0.25"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling type 'dynamic'"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "'longrope'"),
    (dict(rope_scaling={"rope_type": "linear"}), "lacks factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks low_freq_factor"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config: gptq"),
])
def test_refused_fields(fields, needle):
    with pytest.raises(ModelConfigError) as e:
        cfg_of(**fields)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_refusal_through_the_cli_is_one_line(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({**LLAMA, "hidden_act": "relu"}))
    one = write_jsonl(tmp_path / "in.jsonl", [{"prompt": [5, 6, 7], "max_tokens": 2}])
    p = run_cli(["--model", str(m), "--input", str(one), "--output", str(tmp_path / "o.jsonl")])
    assert_one_line_error(p, "hidden_act 'relu'")


def test_honoured_scalars():
    c = cfg_of(rms_norm_eps=1e-6, rope_theta=5e5, head_dim=32, tie_word_embeddings=True,
               hidden_act="silu", pretraining_tp=2, attention_dropout=0.1,
               partial_rotary_factor=1.0)
    assert (c.rms_norm_eps, c.rope_theta, c.head_dim, c.tie_word_embeddings) == (1e-6, 5e5, 32,
                                                                                  True)
    assert c.q_size == 4 * 32 and c.kv_size == 2 * 32
    assert cfg_of(rope_parameters={"rope_type": "default", "rope_theta": 1e5}).rope_theta == 1e5
    lin = cfg_of(rope_scaling={"type": "linear", "factor": 2.0})
    assert lin.rope_scaling_dict == {"type": "linear", "factor": 2.0}


@pytest.mark.parametrize("arch,fields,qkv,o,mlp", [
    ("llama", {}, False, False, False),
    ("llama", dict(attention_bias=True), True, True, False),
    ("llama", dict(mlp_bias=True), False, False, True),
    ("qwen2", {}, True, False, False),
    ("qwen2", dict(attention_bias=False), True, False, False),   # transformers ignores it
    ("mistral", dict(attention_bias=True, mlp_bias=True), False, False, False),
])
def test_biases_as_transformers_builds_them(arch, fields, qkv, o, mlp):
    c = cfg_of(arch=arch, **fields)
    assert (c.attention_bias, c.o_proj_bias, c.mlp_bias) == (qkv, o, mlp)


@pytest.mark.parametrize("arch,fields,ctx", [
    ("mistral", dict(sliding_window=1024), 1024),
    ("mistral", dict(sliding_window=None), 4096),
    ("mistral", dict(sliding_window=1024, use_sliding_window=False), 1024),  # not a Mistral field
    ("qwen2", dict(sliding_window=1024, use_sliding_window=False), 4096),
    ("qwen2", dict(sliding_window=1024, use_sliding_window=True, max_window_layers=1), 1024),
    ("qwen2", dict(sliding_window=1024, use_sliding_window=True, max_window_layers=2), 4096),
    ("qwen2", dict(sliding_window=1024, use_sliding_window=True, max_window_layers=2,
                   layer_types=["full_attention", "sliding_attention"]), 1024),
    ("llama", dict(sliding_window=1024, use_sliding_window=True), 4096),
])
def test_sliding_window_caps_the_context(arch, fields, ctx):
    """Where some layer attends within a window, contexts are kept inside it (exact there)."""
    assert cfg_of(arch=arch, **fields).max_position_embeddings == ctx


def test_llama_biases_match_transformers(tmp_path_factory, tmp_path):
    path = make_checkpoint(checkpoint_root(tmp_path_factory), "llama-bias")
    rng = np.random.default_rng(3)
    ids_list = [rng.integers(3, 500, size=n).tolist() for n in (1, 6, 17)]
    rows = [{"custom_id": f"r{i}", "url": "/v1/completions", "method": "POST",
             "body": {"prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                      "return_token_ids": True}}
            for i, ids in enumerate(ids_list)]
    out = tmp_path / "out.jsonl"
    p = run_cli(["--gpus", "2", "--model", str(path), "--input",
                 str(write_jsonl(tmp_path / "in.jsonl", rows)), "--output", str(out)])
    assert p.returncode == 0, p.stderr
    res = read_results(out)
    for i, want in enumerate(hf_greedy(path, ids_list, 8)):
        assert res[f"r{i}"]["response"]["body"]["choices"][0]["token_ids"] == want, i
