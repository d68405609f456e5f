"""stages/kv_quant.py and the fp8 paths of attention, offload, the planner and the flags."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipemax.stages.attention import build_layout, paged_attention, paged_decode_torch
from pipemax.stages.kv_quant import (FP8, FP8_MAX, KVQuant, checkpoint_scales, dequantize,
                             fp8_unsupported, has_checkpoint_scales, prompt_scale, quantize)
from test_attention import dense, make_step


def test_round_trip_within_e4m3_bound():
    """Normal range: within half a unit of e4m3's 3-bit mantissa (2^-4 relative); below it,
    within half its subnormal spacing (2^-10 of the scale)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([2.0 ** -3, 0.37])            # a power of two, and not one
    x = torch.randn(4096, 2, 16, generator=g) * torch.exp2(torch.randint(-12, 6, (4096, 2, 16),
                                                                         generator=g).float())
    lim = FP8_MAX * scale[:, None]                      # each head's range
    x = torch.maximum(torch.minimum(x, lim), -lim)
    inv = 1.0 / scale
    stored = quantize(x, inv)
    assert stored.dtype == FP8
    back = dequantize(stored, scale, torch.float32)
    err = (back - x).abs()
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale[:, None] * 2.0 ** -10) * (1 + 1e-6)
    assert bool((err <= bound).all()), (err / bound).max()
    assert (err > 0).any()                              # it is a rounding, not a copy
    # dequantize(quantize(.)) is a projection: stored values come back unchanged
    assert torch.equal(quantize(back, inv).view(torch.uint8), stored.view(torch.uint8))


def test_out_of_range_saturates_instead_of_nan():
    s = torch.tensor([1.0])
    x = torch.tensor([[[1e6, -1e6, 448.0, 500.0]]])
    back = dequantize(quantize(x, 1 / s), s, torch.float32)
    assert back.tolist() == [[[448.0, -448.0, 448.0, 448.0]]]


def test_prompt_scales_are_powers_of_two_with_headroom():
    amax = torch.tensor([0.001, 1.0, 3.0, 63.9, 64.0, 64.1, 5000.0, 0.0])
    s = prompt_scale(amax)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)          # powers of two
    mapped = amax[:-1] / s[:-1]
    assert bool(((mapped > 32) & (mapped <= 64)).all()), mapped
    assert s[-1] > 0 and torch.isfinite(1 / s[-1])


def test_observe_fixes_each_layer_and_head_from_its_own_values():
    q = KVQuant.make(3, 2, torch.device("cpu"), calibrate=True)
    k = torch.zeros(5, 2, 8)
    v = torch.zeros(5, 2, 8)
    k[3, 0, 1], k[0, 1, 7], v[1, 0, 0], v[4, 1, 2] = 100.0, -2.0, 0.5, 7.0
    q.observe(1, k, v)
    assert q.scale[1].tolist() == [[2.0, 2.0 ** -5], [2.0 ** -7, 2.0 ** -3]]
    assert torch.equal(q.inv[1], 1 / q.scale[1])
    assert q.scale[0].tolist() == q.scale[2].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def _quant(seed, L=2, KVH=2):
    g = torch.Generator().manual_seed(seed)
    return KVQuant.make(L, KVH, torch.device("cpu"),
                        2.0 ** torch.randint(-4, 0, (L, 2, KVH), generator=g).float())


@pytest.mark.parametrize("seed", range(3))
def test_fp8_step_attends_over_what_the_cache_holds(seed):
    """A step mixing decode tokens, fresh prompts and continued chunks, over an fp8 cache:
    the step's k/v are stored quantized, and every row (its own new k/v included) attends
    over the dequantized values: dense attention over them."""
    q_lens, ctx_lens, bt, bs, kv, q, k, v, _ = make_step(seed)
    quant = _quant(seed)
    kv8 = quantize(kv.flatten(0, 1).transpose(1, 2).flatten(0, 1), quant.inv[0, 0])  # any bytes
    kv8 = kv8.view(kv.shape[0], kv.shape[1], kv.shape[3], 2, *kv.shape[4:]).transpose(2, 3)
    kv8 = kv8.contiguous()
    lay = build_layout(q_lens, ctx_lens, bt, bs, torch.device("cpu"), decode_kernel=False)
    layer, scale = 1, q.shape[-1] ** -0.5
    out = paged_attention(q, k, v, kv8, layer, lay, scale, quant)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    for b in range(len(q_lens)):
        c, m = int(ctx_lens[b]), int(q_lens[b])
        blocks = torch.as_tensor(bt[b, :-(-c // bs)])
        K8 = kv8[blocks, layer, 0].flatten(0, 1)[:c]
        V8 = kv8[blocks, layer, 1].flatten(0, 1)[:c]
        sl = slice(int(cu[b]), int(cu[b + 1]))
        assert torch.equal(K8[c - m:].view(torch.uint8),
                           quantize(k[sl], quant.inv[layer, 0]).view(torch.uint8))
        assert torch.equal(V8[c - m:].view(torch.uint8),
                           quantize(v[sl], quant.inv[layer, 1]).view(torch.uint8))
        K = dequantize(K8, quant.scale[layer, 0], torch.float32)
        V = dequantize(V8, quant.scale[layer, 1], torch.float32)
        torch.testing.assert_close(out[sl], dense(q[sl], K, V, scale), atol=1e-5, rtol=1e-5)


def test_a_prompt_in_chunks_gives_what_it_gives_whole():
    """Chunked (5 + 7 tokens) or whole, a prompt's outputs are the same: a fresh chunk attends
    over the round trip of its own k/v, which is what a later chunk reads from the cache."""
    g = torch.Generator().manual_seed(1)
    H, KVH, D, bs, n = 4, 2, 8, 4, 12
    q, k, v = (torch.randn(n, h, D, generator=g) * 3 for h in (H, KVH, KVH))
    quant = _quant(1, L=1)
    bt = np.arange(4)[None]
    whole_kv = torch.zeros(5, 1, 2, bs, KVH, D, dtype=FP8)
    lay = build_layout(np.array([n]), np.array([n]), bt, bs, torch.device("cpu"),
                       decode_kernel=False)
    whole = paged_attention(q, k, v, whole_kv, 0, lay, D ** -0.5, quant)
    kv8 = torch.zeros_like(whole_kv)
    parts = []
    for a, b in ((0, 5), (5, n)):
        lay = build_layout(np.array([b - a]), np.array([b]), bt, bs, torch.device("cpu"),
                           decode_kernel=False)
        parts.append(paged_attention(q[a:b], k[a:b], v[a:b], kv8, 0, lay, D ** -0.5, quant))
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=1e-6)
    assert torch.equal(kv8.view(torch.uint8), whole_kv.view(torch.uint8))


def test_torch_decode_reads_fp8_with_per_head_scales():
    g = torch.Generator().manual_seed(2)
    B, H, KVH, D, bs, L = 3, 4, 2, 8, 4, 2
    ctx = torch.tensor([5, 0, 11], dtype=torch.int32)
    table = torch.tensor([[0, 1, 9, 9], [9, 9, 9, 9], [2, 3, 4, 9]], dtype=torch.int32)
    kv8 = (torch.randn(10, L, 2, bs, KVH, D, generator=g) * 40).to(FP8)
    scale = torch.tensor([[[0.5, 0.03125], [0.25, 2.0]], [[1.0, 1.0], [1.0, 1.0]]])
    q = torch.randn(B, H, D, generator=g)
    out = paged_decode_torch(q, kv8, 0, table, ctx, D ** -0.5, 12, scale)
    assert torch.equal(out[1], torch.zeros(H * D))                    # a padding row
    for b in (0, 2):
        c = int(ctx[b])
        rows = table[b, :-(-c // bs)].long()
        K = dequantize(kv8[rows, 0, 0].flatten(0, 1)[:c], scale[0, 0], torch.float32)
        V = dequantize(kv8[rows, 0, 1].flatten(0, 1)[:c], scale[0, 1], torch.float32)
        torch.testing.assert_close(out[b], dense(q[b:b + 1], K, V, D ** -0.5)[0],
                                   atol=1e-5, rtol=1e-5)


def test_fp8_blocks_round_trip_through_the_host_pool_bit_exactly(run_id):
    """The offload copies move fp8 bytes: blocks offloaded to the host pool (a real shared
    memory segment, as the KV pool process makes it) and prefetched back are the same bytes,
    every one of the 256 values an fp8 byte can hold included."""
    import posix_ipc
    from pipemax.ipc.names import shm_name
    from pipemax.stages.timetable import Run, Staging
    from pipemax.stages.offload import HostPool, Offloader
    shape = (8, 2, 2, 4, 2, 64)                 # [blocks, L, k|v, bs, KVH, D]: 2048 bytes each
    name = shm_name(run_id, "hostkv0")
    size = int(np.prod(shape))
    posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size).close_fd()
    pool = HostPool(name, shape, FP8, pin=False)
    try:
        assert pool.data.dtype == FP8 and pool.data.numel() == size
        gpu = torch.arange(6 * 2048, dtype=torch.int64).remainder(256).to(torch.uint8)
        gpu = gpu.view(FP8).view(6, *shape[1:]).clone()
        want = gpu.clone()
        off = Offloader(gpu, pool, overlap=True)
        assert off.block_bytes == 2048          # one byte per element
        table = np.zeros((1, 1), dtype=np.int64)
        off.tt.begin(0, 0)
        off.offload(0, Staging(table, offload=[Run(src=1, dst=3, n=4)], blocks_used=4))
        assert torch.equal(pool.data[3:7].view(torch.uint8), want[1:5].view(torch.uint8))
        gpu.view(torch.uint8).zero_()
        off.prefetch(2, 0, Staging(table, prefetch=[Run(src=3, dst=0, n=4)], blocks_used=4))
        assert torch.equal(gpu[:4].view(torch.uint8), want[1:5].view(torch.uint8))
        assert off.bytes_offloaded == off.bytes_prefetched == 4 * 2048
    finally:
        pool.close()
        posix_ipc.unlink_shared_memory(name)


def test_checkpoint_scales():
    names = [f"model.layers.{i}.self_attn.{x}_scale" for i in range(2) for x in "kv"]
    assert has_checkpoint_scales(names + ["lm_head.weight"], 2) is True
    assert has_checkpoint_scales(["lm_head.weight"], 2) is False
    assert has_checkpoint_scales(names[:2], 2) is None
    vals = {names[0]: torch.tensor(0.5), names[1]: torch.tensor([0.25, 2.0]),
            names[2]: torch.tensor([1.0]), names[3]: torch.tensor(3.0, dtype=torch.bfloat16)}
    s = checkpoint_scales(vals.__getitem__, 0, 2, 2)
    assert s.tolist() == [[[0.5, 0.5], [0.25, 2.0]], [[1.0, 1.0], [3.0, 3.0]]]
    assert checkpoint_scales(vals.__getitem__, 1, 2, 2).shape == (1, 2, 2)
    with pytest.raises(ValueError, match="3 values"):
        checkpoint_scales({**vals, names[1]: torch.ones(3)}.__getitem__, 0, 2, 2)
    with pytest.raises(ValueError, match="positive finite"):
        checkpoint_scales({**vals, names[2]: torch.tensor(0.0)}.__getitem__, 0, 2, 2)


def test_fp8_needs_compute_capability_8_9():
    assert fp8_unsupported(0, (9, 0), "H100") is None
    assert fp8_unsupported(1, (8, 9), "L40S") is None
    why = fp8_unsupported(1, (8, 0), "A100-SXM4-80GB")
    assert "8.9" in why and "cuda:1 (A100-SXM4-80GB) is 8.0" in why and "\n" not in why


def test_planner_counts_one_byte_per_kv_element():
    """tools/plan.py with --kv-cache-dtype fp8: half the bytes per token, twice the blocks,
    and a decode step reading half the KV bytes predicts more tokens/s."""
    import json
    import contextlib
    import io
    from tools import plan as plan_tool
    got = {}
    for dt in ("auto", "fp8"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            plan_tool.main(["--model", "llama3-8b", "--gpus", "1", "--gpu-memory-gb", "24",
                            "--prompt", "1024", "--output", "1024", "--kv-cache-dtype", dt])
        got[dt] = json.loads(buf.getvalue().splitlines()[-1])
    assert got["fp8"]["kv_bytes_per_token"] * 2 == got["auto"]["kv_bytes_per_token"]
    a, f = got["auto"]["plans"]["off"], got["fp8"]["plans"]["off"]
    assert f["resident_blocks"] >= 2 * a["resident_blocks"] - 1
    assert f["predicted_tok_s"] > 1.5 * a["predicted_tok_s"]


def test_stage_step_kv_bytes():
    from pipemax.model_config import builtin_config
    from pipemax.planner import DeviceFigures, StageShape, stage_step
    cfg = builtin_config("llama3-8b")
    st = StageShape(32, StageShape.params_read(cfg, 32, True), 0, 1000)
    figs = DeviceFigures(4000.0, 50.0, 700.0)
    t16 = stage_step(st, cfg, 64, 2048, 8, figs, 2)
    t8 = stage_step(st, cfg, 64, 2048, 8, figs, 2, kv_esize=1)
    assert t8[1] == pytest.approx(t16[1] / 2)                         # prefetch bytes halve
    assert t8[0] < t16[0]


def test_config_flags():
    from pipemax.config import ConfigError, RunConfig, from_args
    cfg = from_args(["--device", "cpu", "--kv-cache-dtype", "fp8", "--kv-scales", "one"])
    assert (cfg.kv_cache_dtype, cfg.kv_scales, cfg.kv_esize) == ("fp8", "one", 1)
    assert cfg.kv_dtype_name == "fp8 (e4m3)"
    assert from_args(["--device", "cpu"]).kv_esize == 4
    assert from_args(["--device", "cpu", "--dtype", "bfloat16"]).kv_dtype_name == "bfloat16"
    with pytest.raises(ConfigError, match="needs --kv-cache-dtype fp8"):
        RunConfig(kv_scales="one")
    with pytest.raises(ConfigError, match="auto or fp8"):
        RunConfig(kv_cache_dtype="int8")


def test_vllm_kv_cache_dtype_is_taken():
    from pipemax.cli import Refused, translate
    assert translate(["--kv-cache-dtype", "fp8"]) == ["--kv-cache-dtype", "fp8"]
    assert translate(["--kv-cache-dtype", "fp8_e4m3", "--calculate-kv-scales"]) == [
        "--kv-cache-dtype", "fp8", "--kv-scales", "prompt"]
    assert translate(["--kv-cache-dtype", "auto"]) == ["--kv-cache-dtype", "auto"]
    with pytest.raises(Refused, match="fp8_e5m2"):
        translate(["--kv-cache-dtype", "fp8_e5m2"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash path is CUDA-only")
@pytest.mark.parametrize("seed", range(3))
def test_fp8_step_on_cuda_matches_the_cpu_torch_path(seed):
    """On CUDA (bf16) an fp8 step goes through the Triton write (quantizing), the varlen flash
    prefill over the dequantized context and the Triton decode kernel: the cache holds the CPU
    torch path's bytes, and the outputs agree with it."""
    from pipemax.stages import triton_decode
    q_lens, ctx_lens, bt, bs, kv, q, k, v, _ = make_step(seed, D=64)
    quant = _quant(seed)
    kv8 = torch.zeros(kv.shape, dtype=FP8)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    lay = build_layout(q_lens, ctx_lens, bt, bs, torch.device("cpu"), decode_kernel=False)
    layer, scale = 1, q.shape[-1] ** -0.5
    want = paged_attention(q, k, v, kv8, layer, lay, scale, quant).float()
    dev = torch.device("cuda")
    cq = KVQuant(quant.scale.to(dev), quant.inv.to(dev))
    kv8g = torch.zeros(kv.shape, dtype=FP8, device=dev)
    lay = build_layout(q_lens, ctx_lens, bt, bs, dev,
                       decode_kernel=triton_decode.available(dev))
    assert lay.prefill.cu_q is not None
    got = paged_attention(q.to(dev), k.to(dev), v.to(dev), kv8g, layer, lay, scale, cq)
    assert torch.equal(kv8g.cpu().view(torch.uint8), kv8.view(torch.uint8))
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)
