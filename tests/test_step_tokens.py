"""Tokens per step: 2,048 on one stage; over several, where a stage's step turns
compute-bound, so that a prompt chunk never holds up the pipeline (pipemax/planner.py
``pipeline_step_tokens``, pipemax/kv_setup.py ``step_tokens``)."""
from __future__ import annotations

import json

import pytest

from pipemax import kv_setup
from pipemax.config import RunConfig
from pipemax.model_config import BUILTIN_MODELS
from pipemax.planner import DeviceFigures, StageShape, Workload, pipeline_step_tokens
from pipemax.requests import Parser
from pipemax.workload import estimate
from tools import simulate as sim
from tools.workload import requests


def gemm_s(s: StageShape, figs: DeviceFigures, n: int) -> float:
    return 2 * s.params * n / (figs.tflops * 1e12)


def weights_s(s: StageShape, figs: DeviceFigures, esize: int) -> float:
    return (s.weight_bytes or s.params * esize) / (figs.hbm_gbs * 1e9)


@pytest.mark.parametrize("preset", ["rtx4090", "l20", "a10", "h200"])
@pytest.mark.parametrize("weight_bytes", [None, 0.5])      # 16-bit weights, 8-bit weights
def test_the_first_whole_block_count_at_which_a_step_is_compute_bound(preset, weight_bytes):
    figs = sim.PRESETS[preset].figures()
    params = 870_000_000 * 10
    stages = [StageShape(10, params, 40 << 10, 1000,
                         None if weight_bytes is None else int(params * 2 * weight_bytes)),
              StageShape(9, params * 9 // 10, 40 << 10, 1000)]
    n = pipeline_step_tokens(stages, figs, 2, cap=4096, block_size=16)
    assert n % 16 == 0 and n >= 64
    worst = max(stages, key=lambda s: weights_s(s, figs, 2) / s.params)
    assert gemm_s(worst, figs, n) >= weights_s(worst, figs, 2)          # compute-bound at n
    if n > 64:
        assert gemm_s(worst, figs, n - 16) < weights_s(worst, figs, 2)  # not a block before


def test_more_tokens_when_the_prompts_to_refill_need_them():
    """Many sequences per micro-batch with long prompts and short outputs: their decode
    tokens and the prompts that replace the finished ones need more than the ridge."""
    figs = sim.PRESETS["l20"].figures()
    s = [StageShape(10, 8_700_000_000, 40 << 10, 1000)]
    ridge = pipeline_step_tokens(s, figs, 2, cap=4096, block_size=16)
    chat = Workload(mean_prompt=750.0, mean_output=300.0, max_total=4096)
    assert pipeline_step_tokens(s, figs, 2, 4096, 16, 4, chat) == ridge     # few: the ridge
    need = 80 * (1 + 1.5 * 750 / 300)
    n = pipeline_step_tokens(s, figs, 2, 4096, 16, 80, chat)
    assert need <= n < need + 16 and n % 16 == 0
    assert pipeline_step_tokens(s, figs, 2, 256, 16, 80, chat) == 256       # within the cap


def test_the_step_tokens_stay_within_the_cap_and_above_the_floor():
    s = [StageShape(4, 10_000_000, 4096, 100)]
    fast_gemm = DeviceFigures(hbm_gbs=1000.0, h2d_gbs=25.0, tflops=1.0)     # ridge: 1 token
    slow_hbm = DeviceFigures(hbm_gbs=10.0, h2d_gbs=25.0, tflops=1000.0)     # ridge: 100k
    assert pipeline_step_tokens(s, fast_gemm, 2, cap=256, block_size=16) == 64
    assert pipeline_step_tokens(s, slow_hbm, 2, cap=256, block_size=16) == 256
    assert pipeline_step_tokens(s, fast_gemm, 2, cap=32, block_size=16) == 32


def test_the_flag_default_depends_on_the_stages():
    assert RunConfig().max_num_batched_tokens is None
    assert RunConfig(gpus=1).step_tokens == 2048
    assert RunConfig(gpus=3).step_tokens == 512
    assert RunConfig(gpus=3, max_num_batched_tokens=1000).step_tokens == 1000


def layout_for(gpus: int, preset: str = "rtx4090", **kw):
    model = BUILTIN_MODELS["llama3-70b"]
    hw = sim.PRESETS[preset]
    cfg = RunConfig(gpus=gpus, device="cuda", model="llama3-70b", load_format="dummy",
                    dtype="bfloat16", **kw)
    max_len = 4096
    reports = sim.stage_reports(cfg, model, hw, max_len)
    lines = [json.dumps(r).encode() for r in requests("chat", 50, model.vocab_size)]
    parser = Parser(None, max_model_len=max_len, vocab_size=model.vocab_size)
    wl = estimate(enumerate(lines), parser, max_len)
    _, sched = kv_setup.layout(cfg, model, reports, wl, 64 << 30, max_len)
    return cfg, model, reports, sched, wl


def test_the_scheduler_takes_the_planners_step_tokens_over_several_stages():
    cfg, model, reports, sched, wl = layout_for(8)
    shapes = kv_setup.stage_shapes(model, reports)
    assert sched.max_tokens_per_step == pipeline_step_tokens(
        shapes, kv_setup.figures(cfg, reports), 2, 512, cfg.block_size, sched.max_seqs_per_mb,
        wl)
    assert 64 <= sched.max_tokens_per_step < 512        # the 4090's ridge is below the cap
    assert layout_for(8, max_num_batched_tokens=512)[3].max_tokens_per_step == 512
    assert layout_for(1, "h200")[3].max_tokens_per_step == 2048
