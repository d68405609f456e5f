"""From the stages' reports to a running KV layout: plan, host pool, scheduler settings."""
from __future__ import annotations

from pipemax.config import RunConfig
from pipemax.kv_pool import KVPool, check_host_memory, default_host_bytes
from pipemax.model_config import ModelConfig
from pipemax.pipeline import Pipeline
from pipemax.planner import (CPU_FIGURES, DeviceFigures, Plan, StageShape, Workload, plan,
                             pipeline_step_tokens)
from pipemax.scheduler import SchedulerConfig
from pipemax.selection import StepModel

GiB = 1 << 30


def figures(cfg: RunConfig, reports: list[dict]) -> DeviceFigures:
    """The slowest stage's measured figures (nominal ones on the CPU), then the overrides (a
    ``tflops`` given alone stands for both GEMM rates)."""
    measured = [r["figures"] for r in reports if r.get("figures")]
    keys = ("hbm_gbs", "h2d_gbs", "tflops", "decode_tflops")
    if measured:
        base = {k: min(m[k] for m in measured) for k in keys}
    else:
        base = CPU_FIGURES.as_dict()
    given = dict(cfg.device_figures)
    if "tflops" in given and "decode_tflops" not in given:
        given["decode_tflops"] = given["tflops"]
    base.update(given)
    return DeviceFigures(**base)


def stage_shapes(model: ModelConfig, reports: list[dict]) -> list[StageShape]:
    last = max(r["stage"] for r in reports)
    out = []
    for r in sorted(reports, key=lambda r: r["stage"]):
        a, b = r["layers"]
        params = StageShape.params_read(model, b - a, r["stage"] == last)
        out.append(StageShape(b - a, params, r["block_bytes"], r["max_blocks"],
                              r["step_weight_bytes"]))
    return out


def step_model(cfg: RunConfig, model: ModelConfig, reports: list[dict],
               h2d_gbs: float | None = None) -> StepModel:
    """The selection's step model (pipemax/selection.py): the planner's cost terms for the
    stage with the most layers, at the figures (``h2d_gbs``: the PCIe rate each GPU gets, when
    the host's bandwidth is shared; default the figures')."""
    figs = figures(cfg, reports)
    esize = 4 if cfg.dtype == "float32" else 2
    s = max(stage_shapes(model, reports), key=lambda s: (s.layers, s.params))
    k = s.layers * model.kv_bytes_per_token_layer(cfg.kv_esize or esize)
    wbytes = s.weight_bytes if s.weight_bytes is not None else s.params * esize
    return StepModel(wbytes / (figs.hbm_gbs * 1e9), 2 * s.params / (figs.decode_rate * 1e12),
                     k / (figs.hbm_gbs * 1e9), k / ((h2d_gbs or figs.h2d_gbs) * 1e9))


def layout(cfg: RunConfig, model: ModelConfig, reports: list[dict], wl: Workload,
           host_bytes: int, max_model_len: int | None = None,
           h2d_gbs: float | None = None) -> tuple[Plan, SchedulerConfig]:
    """The plan and the scheduler's settings for the stages' reports and a host pool of at
    most ``host_bytes`` (pure: tools/simulate.py plans with it too). The plan's host_blocks
    are the blocks the pool must hold (0: no pool). ``max_model_len`` bounds the blocks a
    step's swap copies move (None: no bound). ``h2d_gbs``: the PCIe rate the offload
    selection budgets with (default: the figures').

    Raises PlanError (one line with the figures) when memory cannot hold it."""
    shapes = stage_shapes(model, reports)
    esize = 4 if cfg.dtype == "float32" else 2
    per_block = sum(s.block_bytes for s in shapes)          # one block id, on every stage
    host_avail = host_bytes // per_block if cfg.kv_offload != "off" else 0
    figs = figures(cfg, reports)
    p = plan(model, shapes, figs, esize, wl, mode=cfg.kv_offload,
             micro_batches=cfg.num_micro_batches, max_seqs=cfg.max_num_seqs,
             block_size=cfg.block_size, host_blocks=host_avail, kv_esize=cfg.kv_esize)
    sched = SchedulerConfig(p.micro_batches, p.seqs_per_mb,
                            step_tokens(cfg, shapes, figs, esize, p.seqs_per_mb, wl),
                            cfg.block_size, p.resident_blocks, p.staging_blocks, p.host_blocks,
                            prefix_caching=cfg.prefix_caching,
                            swap_blocks_per_step=p.seqs_per_mb * -(-max_model_len // cfg.block_size)
                            if max_model_len else None,
                            offload_policy=cfg.offload_policy,
                            step_model=step_model(cfg, model, reports, h2d_gbs),
                            host_cache_blocks=host_cache_blocks(cfg, p, host_avail, wl),
                            swap_blocks=p.swap_blocks)
    return p, sched


def step_tokens(cfg: RunConfig, shapes: list[StageShape], figs: DeviceFigures, esize: int,
                seqs_per_mb: int, wl: Workload) -> int:
    """The scheduler's tokens per step: as given, or 2,048 on one stage, or over several the
    planner's (``pipeline_step_tokens``, within the 512 the stages' workspace is sized for)."""
    if cfg.max_num_batched_tokens is not None or cfg.gpus == 1:
        return cfg.step_tokens
    return pipeline_step_tokens(shapes, figs, esize, cfg.step_tokens, cfg.block_size,
                                seqs_per_mb, wl)


def host_cache_blocks(cfg: RunConfig, p: Plan, host_avail: int, wl: Workload) -> int:
    """Slots of the prefix cache's host tier, after the plan's host blocks: with caching, the
    tier and KV offload on, twice the blocks of the shared prefixes in the workload's sample
    (only blocks that were hits go to the tier, so it never holds more than those), at most
    twice the GPU's resident blocks, within what the host has spare. Every slot is host pool
    memory pinned for the whole run: 2 x resident blocks was 11.5 GiB at the few-shot mix
    (24 GB, llama3-8b), where the shared prefixes hold 250 blocks."""
    if not (cfg.prefix_caching and cfg.prefix_cache_host and p.staging_blocks > 0):
        return 0
    return max(0, min(2 * wl.cached_blocks, 2 * p.resident_blocks,
                      host_avail - p.host_blocks))


def setup(cfg: RunConfig, model: ModelConfig, reports: list[dict], wl: Workload,
          pipeline: Pipeline, run_id: str) -> tuple[Plan, KVPool | None, SchedulerConfig]:
    """Plan the KV layout, start the host pool if the plan offloads, allocate the stages' KV.

    Raises PlanError / HostMemoryError (one line with the figures) when memory cannot hold it.
    """
    pinned = cfg.device == "cuda"
    host_bytes = int(cfg.host_kv_gb * GiB) if cfg.host_kv_gb else default_host_bytes(pinned)
    p, sched = layout(cfg, model, reports, wl, host_bytes, pipeline.max_model_len)
    pool = None
    H = p.host_blocks + sched.host_cache_blocks   # the plan sizes the host pool, + the tier
    if H:
        shapes = stage_shapes(model, reports)
        check_host_memory(H * sum(s.block_bytes for s in shapes), pinned)
        pool = KVPool(run_id, [H * s.block_bytes for s in shapes])
        pipeline.extra_checks.append(pool.check)
        pool.start(pipeline.check)
    pipeline.alloc(p.resident_blocks, p.staging_blocks, H, pool.names if pool else [],
                   cfg.offload_overlap, sched.num_micro_batches, sched.swap_blocks)
    return p, pool, sched
