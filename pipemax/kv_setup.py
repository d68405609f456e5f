"""From the stages' reports to a running KV layout: plan, host pool, scheduler settings."""
from __future__ import annotations

from pipemax.config import RunConfig
from pipemax.kv_pool import KVPool, check_host_memory, default_host_bytes
from pipemax.model_config import ModelConfig
from pipemax.pipeline import Pipeline
from pipemax.planner import CPU_FIGURES, DeviceFigures, Plan, StageShape, Workload, plan
from pipemax.scheduler import SchedulerConfig

GiB = 1 << 30


def figures(cfg: RunConfig, reports: list[dict]) -> DeviceFigures:
    """The slowest stage's measured figures (nominal ones on the CPU), then the overrides."""
    measured = [r["figures"] for r in reports if r.get("figures")]
    if measured:
        base = {k: min(m[k] for m in measured) for k in ("hbm_gbs", "h2d_gbs", "tflops")}
    else:
        base = CPU_FIGURES.as_dict()
    base.update(dict(cfg.device_figures))
    return DeviceFigures(**base)


def stage_shapes(model: ModelConfig, reports: list[dict]) -> list[StageShape]:
    last = max(r["stage"] for r in reports)
    out = []
    for r in sorted(reports, key=lambda r: r["stage"]):
        a, b = r["layers"]
        params = StageShape.params_read(model, b - a, r["stage"] == last)
        out.append(StageShape(b - a, params, r["block_bytes"], r["max_blocks"]))
    return out


def setup(cfg: RunConfig, model: ModelConfig, reports: list[dict], wl: Workload,
          pipeline: Pipeline, run_id: str) -> tuple[Plan, KVPool | None, SchedulerConfig]:
    """Plan the KV layout, start the host pool if the plan offloads, allocate the stages' KV.

    Raises PlanError / HostMemoryError (one line with the figures) when memory cannot hold it.
    """
    shapes = stage_shapes(model, reports)
    esize = 4 if cfg.dtype == "float32" else 2
    pinned = cfg.device == "cuda"
    host_bytes = int(cfg.host_kv_gb * GiB) if cfg.host_kv_gb else default_host_bytes(pinned)
    per_block = sum(s.block_bytes for s in shapes)          # one block id, on every stage
    host_avail = host_bytes // per_block if cfg.kv_offload != "off" else 0
    p = plan(model, shapes, figures(cfg, reports), esize, wl, mode=cfg.kv_offload,
             micro_batches=cfg.num_micro_batches, max_seqs=cfg.max_num_seqs,
             block_size=cfg.block_size, host_blocks=host_avail)
    pool = None
    H = p.host_blocks                       # the plan sizes the host pool
    if H:
        check_host_memory(H * per_block, pinned)
        pool = KVPool(run_id, [H * s.block_bytes for s in shapes])
        pipeline.extra_checks.append(pool.check)
        pool.start(pipeline.check)
    pipeline.alloc(p.resident_blocks, p.staging_blocks, H, pool.names if pool else [],
                   cfg.offload_overlap)
    sched = SchedulerConfig(p.micro_batches, p.seqs_per_mb, cfg.max_num_batched_tokens,
                            cfg.block_size, p.resident_blocks, p.staging_blocks, H,
                            prefix_caching=cfg.prefix_caching,
                            swap_blocks_per_step=p.seqs_per_mb * -(-pipeline.max_model_len
                                                                   // cfg.block_size))
    return p, pool, sched
