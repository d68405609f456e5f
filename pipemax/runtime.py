"""The loaded model of one run: the stage processes, the KV layout and the engine that drives
them, started once. The command (pipemax/launch.py) and the Python API (pipemax/api.py) are
both thin users of it; the driver loop itself is pipemax/engine.py.

    rt = Runtime(cfg, model, tokenizer, max_len)
    rt.start()                  # stages spawned, weights loaded, what each stage holds
    rt.plan(sample_lines)       # KV plan from a sample of the requests, host pool, Engine
    rt.engine.start_job(requests, write); rt.engine.run()
    rt.close()                  # every exit path: stages stopped, shared memory removed

Every shared-memory object is named by the run id (ipc/names.py), so ``close()`` and the next
start's stale-run sweep remove all of them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

from pipemax.ipc.names import cleanup_stale, new_run_id
from pipemax import kv_setup
from pipemax.config import RunConfig
from pipemax.engine import Engine
from pipemax.model_config import ModelConfig
from pipemax.pipeline import Pipeline
from pipemax.requests import Parser
from pipemax.scheduler import Scheduler
from pipemax.workload import estimate


def weights_name(cfg: RunConfig) -> str:
    """The weights' dtype, as the plan line and the summary say it."""
    if cfg.quantization == "fp8":
        return f"fp8 (e4m3, a scale per output channel; activations {cfg.dtype})"
    return cfg.dtype


def figures_line(cfg: RunConfig, reports: list[dict]) -> str:
    """The device figures the prediction uses: the GEMM rates at the model's own shapes."""
    f = kv_setup.figures(cfg, reports)
    tokens = next((r["figures"].get("gemm_tokens") for r in reports if r.get("figures")), None)
    at = (lambda i: f" at {tokens[i]} tokens") if tokens else (lambda i: "")
    return (f"GEMMs {f.tflops:.0f} TFLOP/s{at(0)}, {f.decode_rate:.0f}{at(1)}; HBM "
            f"{f.hbm_gbs:.0f} GB/s, host to device {f.h2d_gbs:.1f} GB/s")


class Runtime:
    def __init__(self, cfg: RunConfig, model: ModelConfig, tokenizer, max_len: int, *,
                 check: Callable[[], bool] = lambda: True,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.log = log or (lambda m: None)
        self.run_id = new_run_id()
        self.pipeline = Pipeline(cfg, model, self.run_id, max_len, check)
        self.pool = None
        self.reports: list[dict] = []
        self.kv_plan = None
        self.sched_cfg = None
        self.sched: Scheduler | None = None
        self.engine: Engine | None = None
        self.t0 = time.monotonic()
        self.load_s = 0.0

    def parser(self) -> Parser:
        """A fresh parser with this run's tokenizer and limits (no ids seen)."""
        return Parser(self.tokenizer, max_model_len=self.max_len,
                      vocab_size=self.model.vocab_size)

    def start(self) -> list[dict]:
        """Spawn the stages; they load their weights and report what they hold."""
        stale = cleanup_stale()
        if stale:
            self.log(f"removed shared memory left by dead runs {', '.join(stale)}")
        self.t0 = time.monotonic()
        self.pipeline.start()
        self.reports = self.pipeline.hello()
        for r in self.reports:
            a, b = r["layers"]
            self.log(f"stage {r['stage']} on {r['device']}: layers {a}-{b - 1}, weights "
                     f"{r['weight_bytes'] / 2**30:.2f} GiB, room for {r['max_blocks']} KV "
                     "blocks")
        return self.reports

    def plan(self, sample: Iterable[tuple[int, bytes]], *, hooks=None,
             engine_log: Callable[[str], None] | None = None) -> Engine:
        """Plan the KV layout from a sample of the requests (their lengths), start the host
        pool if the plan offloads, allocate the stages' KV and build the engine (with no job
        yet: ``engine.start_job(requests, write)``). Raises PlanError / HostMemoryError."""
        cfg, model, tokenizer = self.cfg, self.model, self.tokenizer
        wl = estimate(sample, self.parser(), self.max_len,
                      block_size=cfg.block_size if cfg.prefix_caching else 0)
        self.kv_plan, self.pool, self.sched_cfg = kv_setup.setup(
            cfg, model, self.reports, wl, self.pipeline, self.run_id)
        paths = sorted({r["decode_attention"] for r in self.reports})
        cuda = cfg.device == "cuda"
        self.log(f"loaded in {time.monotonic() - self.t0:.1f} s; plan: "
                 f"{self.kv_plan.describe(prediction=cuda)}; steps of at most "
                 f"{self.sched_cfg.max_tokens_per_step} tokens; weights {weights_name(cfg)}; "
                 f"KV cache {cfg.kv_dtype_name}"
                 + (f" (scales: {cfg.kv_scales})" if cfg.kv_cache_dtype == "fp8" else "")
                 + f"{'; ' + figures_line(cfg, self.reports) if cuda else ''}; decode "
                 f"attention: {', '.join(paths)}")
        self.sched = Scheduler(self.sched_cfg)
        self.engine = Engine(pipeline=self.pipeline, sched=self.sched, tokenizer=tokenizer,
                             eos_ids=tuple(model.eos_token_ids) + (
                                 tokenizer.eos_token_ids if tokenizer else ()),
                             max_model_len=self.max_len, model_name=Path(cfg.model).name,
                             seed=cfg.seed, write=lambda line: None, requests=iter(()),
                             log=engine_log, hooks=hooks, policy=cfg.scheduling_policy)
        self.load_s = time.monotonic() - self.t0
        return self.engine

    def stop(self) -> list[dict]:
        """Ask the stages to exit; their final reports (peak memory, bytes moved)."""
        return self.pipeline.stop()

    def close(self) -> None:
        """Stop the stages and the host pool; remove every shared-memory object of the run.
        Safe to call more than once."""
        try:
            self.pipeline.close()
        finally:
            pool, self.pool = self.pool, None
            if pool is not None:
                pool.close()
