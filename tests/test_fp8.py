"""FP8 weights (stages/fp8.py, --quantization fp8): the quantization, the GEMM on the CPU and
(on a GPU with fp8) through torch._scaled_mm and a CUDA graph, the loader (float checkpoints
quantized at load, fp8 checkpoints read with their scales), the flag's errors, the whole run
against transformers' float32 greedy tokens, and the GEMM rates measured at the model's shapes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cli import read_results, run_cli, write_jsonl
from pipemax.config import ConfigError, RunConfig, from_args
from pipemax.model_config import ModelConfig, ModelConfigError
from pipemax.stages.fp8 import (E4M3_MAX, FP8, Fp8Linear, capability_refusal, dequantize_rows,
                        plain_mm, quantize_rows, scaled_mm)
from pipemax.stages.loader import CheckpointError, build_stage_model
from pipemax.stages.measure import gemm_flops, gemm_tflops

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_fp8_gpu = pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU of compute "
                                   "capability 8.9 or more")
# the shape of the run test's checkpoint: weights small enough that the model is not chaotic
# (errors of a few percent in each GEMM move the logits by a few percent of their spread)
SHAPE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 128,
         "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}
STD = 0.05


def _weight(N=48, K=80, seed=0):
    """Rows of very different magnitudes, a zero row, and outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.logspace(-4, 2, N)[:, None]
    w[3] = 0
    w[5, 7] = 1e3
    return w


# ---- quantization -------------------------------------------------------------------------
def test_quantize_rows_per_channel_within_e4m3_bounds():
    w = _weight()
    q, s = quantize_rows(w)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (w.shape[0], 1)
    qf = q.float()
    assert qf.abs().max() <= E4M3_MAX
    amax = qf.abs().amax(dim=1)
    nonzero = w.abs().amax(dim=1) > 0
    assert torch.all(amax[nonzero] == E4M3_MAX)      # each row's largest maps to 448 exactly
    assert torch.all(qf[~nonzero] == 0)
    dq = dequantize_rows(q, s)
    # e4m3 keeps 3 mantissa bits: a normal value is within 2**-4 of itself (relative), a
    # subnormal one (below 2**-6 of the scale) within half the smallest step, 2**-10
    err = (dq - w).abs()
    bound = torch.maximum(w.abs() * 2 ** -4, s * 2 ** -10)
    assert torch.all(err <= bound * (1 + 1e-6)), float((err / bound).max())
    assert float(err.max()) > 0                      # it did round


def test_fp8_linear_against_float_reference():
    """Within 5% (relative Frobenius) of the float GEMM, and equal to the dequantized math."""
    w, b = _weight(96, 80, seed=1) / 1e2 + 0.01, torch.randn(96) * 0.1
    m = Fp8Linear(80, 96, bias=True, dtype=torch.float32)
    m.set_weight(w)
    m.bias.copy_(b)
    assert m.weight.shape == (96, 80) and m.weight.dtype == FP8
    x = torch.randn(2, 7, 80, generator=torch.Generator().manual_seed(2))
    y = m(x)
    assert y.shape == (2, 7, 96) and y.dtype == torch.float32
    ref = F.linear(x, w, b)
    rel = float((y - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel
    xq, xs = quantize_rows(x.reshape(-1, 80))
    same = F.linear(dequantize_rows(xq, xs), m.dequantized(), b).reshape(2, 7, 96)
    torch.testing.assert_close(y, same, rtol=1e-5, atol=1e-5)


def _cpu_rowwise_refusal() -> str | None:
    """Why this torch's CPU backend refuses torch._scaled_mm with rowwise scales (torch 2.11:
    "only supports per-tensor scaling for CPU backend"; 2.13 takes them), or None."""
    a = torch.zeros(16, 16).to(FP8)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.float32)
    except RuntimeError as e:
        if "per-tensor" in str(e):
            return str(e).splitlines()[0]
        raise
    return None


@pytest.mark.parametrize("rowwise", [True, False])
@pytest.mark.parametrize("M,K,N", [(5, 40, 24), (16, 64, 48), (33, 80, 100)])
def test_scaled_mm_call_equals_plain_math_on_cpu(M, K, N, rowwise):
    """The CUDA path's torch._scaled_mm call (the weight column-major, M/K/N padded to 16)
    gives the plain path's numbers on the CPU: per-tensor (unit scales, then the rowwise ones
    applied in float32) with every torch; with rowwise scales where torch's CPU backend takes
    them (a probe call says; it refuses nothing else)."""
    if rowwise and (why := _cpu_rowwise_refusal()) is not None:
        pytest.skip(f"this torch's CPU _scaled_mm: {why}")
    m = Fp8Linear(K, N, bias=False, dtype=torch.float32)
    m.set_weight(_weight(N, K, seed=M))
    assert m.weight.shape == (-(-N // 16) * 16, -(-K // 16) * 16)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3))
    want = plain_mm(x, m.weight, m.weight_scale)
    got = scaled_mm(x, m.weight, m.weight_scale, torch.float32, rowwise=rowwise)
    assert got.shape == want.shape == (M, m.weight.shape[0])
    # rowwise: bfloat16 out (what rowwise scaling writes), so within bfloat16's rounding
    tol = dict(rtol=2 ** -8, atol=1e-3) if rowwise else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    assert torch.all(got[:, N:] == 0)                  # padded rows: zero weights


def test_set_quantized_takes_per_tensor_and_per_channel_scales():
    m = Fp8Linear(32, 16, bias=False)
    q, s = quantize_rows(torch.randn(16, 32))
    m.set_quantized(q, s)
    assert torch.equal(m.weight_scale, s.reshape(-1))
    m.set_quantized(q, torch.tensor(0.5))
    assert torch.all(m.weight_scale == 0.5)
    with pytest.raises(ValueError, match="scales for 16"):
        m.set_quantized(q, torch.ones(4))
    with pytest.raises(ValueError, match="expected"):
        m.set_quantized(q[:8], s[:8])


# ---- on a GPU with fp8 (tools/device_fp8_weights.sh runs these) ----------------------------
@needs_fp8_gpu
@pytest.mark.parametrize("M", [1, 8, 16, 200])
def test_cuda_fp8_linear_against_bf16(M):
    K, N = 4096, 6144
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    m = Fp8Linear(K, N, bias=False, dtype=torch.bfloat16, device="cuda")
    m.set_weight(w)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    ref = F.linear(x, w)
    rel = float((y.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 0.05, rel
    # the CPU's math (on the CPU: its scales are the kernel's; torch on CUDA divides by 448
    # as a multiplication by the inverse, an element's rounding apart now and then)
    same = plain_mm(x.cpu(), m.weight.cpu(), m.weight_scale.cpu()).to(x.device)
    torch.testing.assert_close(y.float(), same.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)
    unscaled = scaled_mm(x, m.weight, m.weight_scale, rowwise=False)   # compute capability 8.9
    torch.testing.assert_close(unscaled.float(), same.to(torch.bfloat16).float(), rtol=2e-2,
                               atol=2e-2)


@needs_fp8_gpu
def test_cuda_graph_captures_fp8_linear():
    K, N, M = 1024, 2048, 24
    m = Fp8Linear(K, N, bias=True, dtype=torch.bfloat16, device="cuda")
    m.set_weight(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
    m.bias.normal_()
    static = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        m(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        out = m(static)
    for seed in (1, 2):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16,
                        generator=torch.Generator(device="cuda").manual_seed(seed))
        static.copy_(x)
        graph.replay()
        with torch.inference_mode():
            assert torch.equal(out, m(x))       # the activation quantization is in the graph


# ---- the flag -----------------------------------------------------------------------------
def test_capability_check():
    assert capability_refusal("cuda:0 (H100)", (9, 0)) is None
    assert capability_refusal("cuda:0 (L4)", (8, 9)) is None
    why = capability_refusal("cuda:0 (A100)", (8, 0))
    assert "compute capability 8.9" in why and "cuda:0 (A100) is 8.0" in why
    assert "\n" not in why


def test_flag_values_and_defaults(capsys):
    assert from_args(["--device", "cpu"]).quantization == "none"
    assert from_args(["--device", "cpu", "--quantization", "fp8"]).quantization == "fp8"
    with pytest.raises(ConfigError, match="--quantization must be one of none, fp8"):
        RunConfig(quantization="int4")
    with pytest.raises(SystemExit) as e:
        from_args(["--quantization", "int4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "invalid choice: 'int4'" in err[0]
    from pipemax.api import config               # LLM(quantization="fp8")
    assert config(device="cpu", quantization="fp8").quantization == "fp8"
    with pytest.raises(ConfigError, match="invalid choice: 'int4'"):
        config(device="cpu", quantization="int4")


def test_vllm_command_takes_quantization_fp8():
    from pipemax.cli import Refused, translate
    assert translate(["--quantization", "fp8", "--model", "m"]) == [
        "--quantization", "fp8", "--model", "m"]
    assert translate(["-q", "FP8"]) == ["--quantization", "fp8"]
    with pytest.raises(Refused, match="--quantization gptq: pipemax quantizes to fp8 only"):
        translate(["--quantization", "gptq"])


# ---- the loader ---------------------------------------------------------------------------
def _float_checkpoint(folder):
    from pipemax.tiny import write_random_checkpoint, write_tokenizer_files
    write_random_checkpoint(folder, SHAPE, seed=0, std=STD)
    write_tokenizer_files(folder, SHAPE["vocab_size"])
    return folder


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return _float_checkpoint(tmp_path_factory.mktemp("fp8") / "float")


PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fp8_checkpoint(src, dst, per_tensor=False, block=False):
    """``src`` saved as a compressed-tensors fp8 checkpoint: every projection's weight in e4m3
    with its ``weight_scale`` ([N, 1] per channel, or one value per tensor); the lm_head not."""
    import shutil
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    for n in list(t):
        if n.endswith("_proj.weight") and n.split(".")[-2] in PROJ:
            w = t[n].float()
            if per_tensor:
                s = w.abs().max().clamp(min=1e-12) / E4M3_MAX
                t[n], t[n + "_scale"] = (w / s).clamp(-448, 448).to(FP8), s.reshape(())
            else:
                q, s = quantize_rows(w)
                t[n], t[n + "_scale"] = q, s
            if block:
                t[n + "_scale"] = torch.ones(2, 2)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "kv_cache_scheme": None, "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                               "strategy": "tensor" if per_tensor else "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}}}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _build(folder, quantization, dtype=torch.float32):
    cfg = ModelConfig.from_dir(folder) if folder else ModelConfig.from_hf_dict(
        {**SHAPE, "hidden_act": "silu"})
    return build_stage_model(cfg, 0, cfg.num_layers, True, True, folder=folder, dtype=dtype,
                             device=torch.device("cpu"), quantization=quantization)


def _fp8_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def test_float_checkpoint_quantized_at_load(float_dir):
    ref, q = _build(float_dir, "none"), _build(float_dir, "fp8")
    layers = _fp8_layers(q)
    assert sorted(layers) == sorted(f"layers.{i}.{n}" for i in range(2)
                                    for n in ("qkv", "o_proj", "gate_up", "down_proj"))
    ref_params = dict(ref.named_parameters())
    for name, m in layers.items():
        w = ref_params[name + ".weight"]
        wq, s = quantize_rows(w)
        assert torch.equal(m.weight.view(torch.uint8), wq.view(torch.uint8))
        assert torch.equal(m.weight_scale, s.reshape(-1))
    for name, p in q.named_parameters():          # embedding, norms, lm_head: as they were
        if not any(name.startswith(k + ".") for k in layers):
            assert torch.equal(p, ref_params[name]), name
    lin = lambda model: sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                            if n.endswith(("qkv.weight", "o_proj.weight", "gate_up.weight",
                                           "down_proj.weight")))
    assert lin(q) * 4 == lin(ref)                 # 1 byte a weight against float32's 4


def test_dummy_fp8_weights_are_the_float_ones_quantized():
    ref, q = _build(None, "none", torch.bfloat16), _build(None, "fp8", torch.bfloat16)
    ref_params = dict(ref.named_parameters())
    for name, m in _fp8_layers(q).items():
        w = ref_params[name + ".weight"].float()
        assert m.weight_scale.shape == (w.shape[0],)
        torch.testing.assert_close(m.dequantized(), w, rtol=2 ** -4, atol=1e-4)
    assert torch.equal(q.embed_tokens.weight, ref.embed_tokens.weight)
    assert q.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("per_tensor", [False, True])
def test_fp8_checkpoint_read_with_its_scales(float_dir, tmp_path, per_tensor):
    folder = _fp8_checkpoint(float_dir, tmp_path / "fp8", per_tensor=per_tensor)
    assert ModelConfig.from_dir(folder).quantization == "fp8"
    assert from_args(["--device", "cpu", "--model", str(folder)]).quantization == "fp8"
    assert from_args(["--device", "cpu", "--model", str(folder), "--quantization",
                      "none"]).quantization == "none"
    shipped = load_file(str(folder / "model.safetensors"))
    q, plain = _build(folder, "fp8"), _build(folder, "none")
    qkv = _fp8_layers(q)["layers.1.qkv"]
    parts = [f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv"]
    assert torch.equal(qkv.weight.view(torch.uint8),
                       torch.cat([shipped[n] for n in parts]).view(torch.uint8))
    scales = torch.cat([shipped[n + "_scale"].float().reshape(-1).expand(shipped[n].shape[0])
                        for n in parts])
    assert torch.equal(qkv.weight_scale, scales)
    # without --quantization fp8 the same weights, dequantized
    torch.testing.assert_close(dict(plain.named_parameters())["layers.1.qkv.weight"],
                               qkv.dequantized(), rtol=0, atol=0)
    if not per_tensor:        # per-channel: the float checkpoint quantized at load, exactly
        ref = _fp8_layers(_build(float_dir, "fp8"))["layers.1.qkv"]
        assert torch.equal(ref.weight.view(torch.uint8), qkv.weight.view(torch.uint8))


def test_fp8_checkpoint_refusals(float_dir, tmp_path):
    folder = _fp8_checkpoint(float_dir, tmp_path / "block", block=True)
    with pytest.raises(CheckpointError, match="not block-wise scales"):
        _build(folder, "fp8")
    cfg = json.loads((folder / "config.json").read_text())
    for change, needle in ((dict(quant_method="fp8", weight_block_size=[128, 128]),
                            "quantization_config: fp8, weight_block_size"),
                           (dict(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
                           (dict(config_groups={"g": {"weights": {"num_bits": 4, "type": "int",
                                                                  "strategy": "group"}}}),
                            "weights 4-bit int group-wise")):
        with pytest.raises(ModelConfigError, match=needle):
            ModelConfig.from_hf_dict({**cfg, "quantization_config": {
                **cfg["quantization_config"], **change}})
    assert ModelConfig.from_hf_dict({**cfg, "quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic"}}).quantization == "fp8"
    t = load_file(str(folder / "model.safetensors"))
    del t["model.layers.0.mlp.down_proj.weight_scale"]
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="without its model.layers.0.mlp.down_proj."
                                              "weight_scale"):
        _build(folder, "fp8")


# ---- the whole run ------------------------------------------------------------------------
GAP = 0.3      # a top-2 logit gap this large is beyond fp8's rounding in this model (<= ~0.13)


def test_greedy_run_agrees_with_float32_at_large_gaps(float_dir, tmp_path):
    """Two stages, decode through the padded graph path (eager on the CPU). Continuations up
    to where they first differ from transformers' float32 ones: every position where
    transformers' top two logits are GAP apart gives its token; where they differ, the two
    were close. Many agree throughout."""
    from tools.compare_hf import compare_rows, hf_reference
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 500, size=int(n)).tolist() for n in rng.integers(2, 40, size=32)]
    rows = [{"custom_id": f"p{i}", "prompt": p, "max_tokens": 8, "temperature": 0,
             "ignore_eos": True, "return_token_ids": True} for i, p in enumerate(prompts)]
    out = tmp_path / "out.jsonl"
    p = run_cli(["--gpus", "2", "--model", str(float_dir), "--quantization", "fp8",
                 "--input", str(write_jsonl(tmp_path / "in.jsonl", rows)), "--output",
                 str(out), "--no-socket", "--cuda-graphs", "on"])
    assert p.returncode == 0, p.stderr
    assert "weights fp8 (e4m3, a scale per output channel; activations float32)" in p.stderr
    res = read_results(out)
    got = [res[f"p{i}"]["response"]["body"]["choices"][0]["token_ids"]
           for i in range(len(prompts))]
    ref = hf_reference(str(float_dir), prompts, 8, "cpu", torch.float32)
    checked = 0
    for r, mine, (toks, _, gaps) in zip(compare_rows([len(x) for x in prompts], got, ref,
                                                     "float32"), got, ref):
        upto = 8 if r["equal"] else r["first_diff"]
        checked += sum(g > GAP for g in gaps[:upto + 1])
        if not r["equal"]:
            assert r["hf_gap"] < GAP, r
    assert checked >= 40, checked
    assert sum(r == t for r, (t, _, _) in zip(got, ref)) >= 8


# ---- the GEMM rates the planner uses ------------------------------------------------------
def test_gemm_rates_at_the_model_shapes():
    from pipemax.stages.model import DecoderLayer
    cfg = ModelConfig.from_hf_dict({**SHAPE, "hidden_act": "silu"})
    plain = DecoderLayer(cfg, torch.float32).linears()
    q = DecoderLayer(cfg, torch.float32, "fp8").linears()
    assert [(m.in_features, m.out_features) for m in plain] == [
        (128, 128 + 2 * 64), (128, 128), (128, 512), (256, 128)]
    assert [(m.in_features, m.out_features) for m in q] == [
        (m.in_features, m.out_features) for m in plain]
    assert gemm_flops(plain, 10) == 2 * 10 * (128 * 256 + 128 * 128 + 128 * 512 + 256 * 128)
    assert gemm_flops(plain, 10) == 2 * 10 * cfg.layer_linear_params()
    for linears in (plain, q):
        for tokens in (1, 64):
            r = gemm_tflops(linears, tokens, torch.float32, torch.device("cpu"), iters=2)
            assert math.isfinite(r) and 1e-7 < r < 100, r       # a CPU's TFLOP/s


def test_planner_uses_decode_rate_and_weight_bytes():
    from pipemax import kv_setup
    from pipemax.planner import DeviceFigures, StageShape, stage_step
    cfg = ModelConfig.from_hf_dict({**SHAPE, "hidden_act": "silu"})
    params = StageShape.params_read(cfg, 2, True)
    figs = DeviceFigures(hbm_gbs=1000, h2d_gbs=10, tflops=100, decode_tflops=50)
    s16 = StageShape(2, params, 1024, 100)
    s8 = StageShape(2, params, 1024, 100, weight_bytes=params)
    t16, _, bound = stage_step(s16, cfg, 1, 0, 0, figs, 2)
    t8, _, _ = stage_step(s8, cfg, 1, 0, 0, figs, 2)
    assert bound == "hbm" and math.isclose(t8 * 2, t16)
    B = 10 ** 6                                                   # compute-bound
    tf, _, bound = stage_step(s16, cfg, B, 0, 0, figs, 2)
    assert bound == "compute" and math.isclose(tf, 2 * params * B / 50e12)
    rep = [{"figures": {"hbm_gbs": 9.0, "h2d_gbs": 8.0, "tflops": 7.0, "decode_tflops": 6.0}}]
    assert kv_setup.figures(RunConfig(), rep) == DeviceFigures(9.0, 8.0, 7.0, 6.0)
    f = kv_setup.figures(RunConfig(device_figures=(("tflops", 70.0),)), rep)
    assert (f.tflops, f.decode_tflops) == (70.0, 70.0)


def test_compare_fp8_summary():
    from tools.compare_fp8 import compare
    lp = lambda vals, tops=None: {"token_logprobs": vals,
                                  "top_logprobs": tops or [{"a": v} for v in vals]}
    ref = [{"token_ids": [1, 2, 3], "logprobs": lp([-0.1, -0.2, -0.3])},
           {"token_ids": [4, 5, 6], "logprobs": lp([-1.0, -0.5, -0.7],
                                                   [{}, {"x": -0.5, "y": -0.6}, {}])}]
    got = [{"token_ids": [1, 2, 3], "logprobs": lp([-0.15, -0.2, -0.1])},
           {"token_ids": [4, 9, 9], "logprobs": lp([-1.1, -0.6, -0.1])}]
    s = compare(ref, got)
    assert s["identical"] == 1 and s["identical_share"] == 0.5
    assert s["tokens_compared"] == 4                    # 3 of the first, 1 of the second
    assert math.isclose(s["logprob_diff_max"], 0.2)
    assert math.isclose(s["logprob_diff_mean"], (0.05 + 0 + 0.2 + 0.1) / 4)
    assert math.isclose(s["gap_at_first_diff_max"], 0.1)


def test_plan_line_names_the_measured_gemm_rates():
    from pipemax.runtime import figures_line
    rep = [{"figures": {"hbm_gbs": 4000.0, "h2d_gbs": 50.0, "tflops": 650.0,
                        "decode_tflops": 480.0, "gemm_tokens": [2048, 256]}}]
    assert figures_line(RunConfig(), rep) == ("GEMMs 650 TFLOP/s at 2048 tokens, 480 at 256 "
                                              "tokens; HBM 4000 GB/s, host to device 50.0 GB/s")
