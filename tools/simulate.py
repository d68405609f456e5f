"""What pipemax would do on hardware you do not have: the real engine and scheduler, simulated steps.

    python -m tools.simulate --preset rtx4090 --gpus 8 --model llama3-70b \
        --workload fixed:1024/1024 --num-requests 512 --kv-offload on
    python -m tools.simulate --preset h200 --gpus 1 --model llama3-8b --workload chat \
        --num-requests 200 --gpu-memory-gb 24 --micro-batches 4 --calibrate run.stats.json

Nothing is approximated on the planning side: each stage's KV room comes from the runtime's
own sizing (stages/kv_cache.py: the card's memory, the stage's weights, the CUDA context, one
step's workspace), the plan and the scheduler's settings from ``kv_setup.layout`` (the
planner, with the preset's figures standing in for what a stage measures at start), and the
requests (tools/workload.py, the lines tools/bench.py writes) go through the real
``pipemax.engine.Engine`` and ``Scheduler``: admission, chunked prefill, preemption, offload
to the host pool, streaming and prefix caching make the same decisions, step for step, as in
a run. Only the pipeline is simulated (tools/pipeline_sim.py): each step's time on each stage
comes from the planner's cost model (``stage_step`` for the step at its sequences and
context, plus ``prompt_seconds`` for its prompt tokens beyond one per sequence), divided by a
measured / predicted ratio per step kind (``--calibrate``); offloaded sequences' prefetch and
offload (the real timetable's block runs, ``staging_for``) and streamed sequences' in-place
reads cross PCIe at ``min(h2d_gbs, host_gbs / GPUs)``: every GPU copies in the same step
rhythm, so they share the host's memory bandwidth.

Hardware presets (``--figures key=value,...`` overrides any figure):

    h200     140.4 GiB (143,771 MiB as the lent H200 reports it; vendor 141 GB), HBM 4,300
             GB/s, pinned H2D 46 GB/s, 790 TFLOP/s bf16: the figures measured on the lent H200
             (the design reference's table: HBM copy 4.3 TB/s, H2D 46 GB/s, bf16 GEMM 783-791
             TFLOP/s; vendor: 4.8 TB/s, PCIe 5.0 x16 ~55 GB/s usable, ~990 TFLOP/s dense);
             host 89 GB/s (H2D to two GPUs at once, measured), 128 GiB host memory
    l20      48 GiB, 864 GB/s, PCIe 4.0 x16 25 GB/s, 119.5 TFLOP/s bf16 (vendor; the design
             reference)
    rtx4090  24 GiB, 1,008 GB/s, 25 GB/s, 165 TFLOP/s (vendor; the design reference)
    a10      24 GiB, 600 GB/s, 25 GB/s, 125 TFLOP/s (vendor; the design reference)

For the three commodity cards the host figures are assumptions, not measurements: 160 GB/s
of host memory bandwidth shared by the cards' copies (a two-socket DDR4-3200 server is 410
GB/s in theory; 8 cards at 25 GB/s would want 200) and 512 GiB of host memory. The host pool
defaults to half the host memory, as a run's does. Ring hand-offs between stages: 0.07 ms
plus the activations at 8 GB/s (docs/benchmarks.md, the ring latency on the H200 machine).

``--calibrate`` takes ``decode=0.65,mixed=0.7,prompt=0.74`` (measured over predicted time
ratios per step kind, and ``pcie`` for the copies; a kind not named stays 1.0), optionally
``layer_us=74``: a fixed time per layer and step, the launches and small kernels a step pays
whatever its batch, so that step time = model / ratio + layers * layer_us; or a JSON
file of a real run (``--stats-json``, or a ``tools.bench --json`` file, ``FILE:SYSTEM`` for one
of its systems): the simulator first runs uncalibrated with the flags given, which should be
that run's, and takes each kind's ratio from the run's GPU seconds per kind
(``finals[].step_kinds``) against its own (``FILE,layer_us=74`` keeps that fixed term); the ratios are printed for reuse elsewhere. The
ratios are relative to the preset's figures: from a run on one card they carry the
implementation's efficiency to another only approximately.

Prints output tok/s, the step counts by kind, bubble and PCIe shares per stage, the mean
number of sequences whose KV is in the host pool; ``--json``: the same as one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from pipemax import kv_setup
from pipemax.config import KV_OFFLOAD, SCHEDULING_POLICIES, ConfigError, RunConfig
from pipemax.engine import Engine
from pipemax.model_config import BUILTIN_MODELS, ModelConfig, ModelConfigError, apply_overrides
from pipemax.partition import split_layers
from pipemax.planner import DeviceFigures, PlanError, StageShape, prompt_seconds, stage_step
from pipemax.requests import Parser
from pipemax.scheduler import Scheduler, StepPlan
from pipemax.stages.timetable import staging_for
from pipemax.workload import estimate
from pipemax.stages.kv_cache import CUDA_CONTEXT_BYTES, KVCache, device_budget, workspace_bytes
from tools.pipeline_sim import PipelineSim, StageWork
from tools.workload import requests

GiB = 1 << 30
KINDS = ("prompt", "mixed", "decode")
TOKEN = 10                      # what every simulated step samples (workload ids are >= 10)


@dataclass(frozen=True)
class Hardware:
    memory_gb: float            # per card, GiB
    hbm_gbs: float
    h2d_gbs: float
    tflops: float
    host_gbs: float             # host memory bandwidth all the cards' copies share
    host_memory_gb: float
    handoff_ms: float = 0.07    # ring hand-off latency between stages
    ring_gbs: float = 8.0       # and its rate for the activations

    def figures(self) -> DeviceFigures:
        return DeviceFigures(self.hbm_gbs, self.h2d_gbs, self.tflops)


PRESETS = {
    "h200": Hardware(143771 / 1024, 4300.0, 46.0, 790.0, 89.0, 128.0),
    "l20": Hardware(48.0, 864.0, 25.0, 119.5, 160.0, 512.0),
    "rtx4090": Hardware(24.0, 1008.0, 25.0, 165.0, 160.0, 512.0),
    "a10": Hardware(24.0, 600.0, 25.0, 125.0, 160.0, 512.0),
}


def step_kind(q_lens: np.ndarray) -> str:
    """The stage's own label of a step (stages/worker.py)."""
    n = int(q_lens.sum())
    return "decode" if n == len(q_lens) else "prompt" if (q_lens > 1).all() else "mixed"


# ---- the stages, as they would report themselves ------------------------------------------
def stage_reports(cfg: RunConfig, model: ModelConfig, hw: Hardware, max_len: int) -> list[dict]:
    """What each stage's start-up report would say on ``hw``: its layers, block bytes and the
    blocks its KV budget holds (the runtime's sizing), and the preset's figures as measured."""
    dtype = getattr(torch, cfg.dtype)
    esize = torch.empty(0, dtype=dtype).element_size()
    total = int(hw.memory_gb * GiB)
    cap = int(cfg.gpu_memory_gb * GiB) if cfg.gpu_memory_gb else total
    useful = cfg.max_num_seqs * (-(-max_len // cfg.block_size))
    out = []
    for i, (a, b) in enumerate(split_layers(model, cfg.gpus)):
        last = i == cfg.gpus - 1
        read = StageShape.params_read(model, b - a, last) * esize     # weights a step reads
        if cfg.quantization == "fp8":                                 # linear weights: 1 byte
            read -= (b - a) * model.layer_linear_params() * (esize - 1)
        weights = read + (model.embed_params() * esize if i == 0 else 0)
        spec = SimpleNamespace(model=model, max_tokens_per_step=cfg.step_tokens,
                               max_model_len=max_len, max_seqs_per_step=cfg.max_seqs_per_mb,
                               is_last=last, quantization=cfg.quantization,
                               kv_cache_dtype=cfg.kv_cache_dtype)
        used = weights + CUDA_CONTEXT_BYTES
        budget = device_budget(cap, used, total - used, workspace_bytes(spec, dtype, True))
        if cfg.kv_cache_gb:
            budget = min(budget, cfg.kv_cache_gb * GiB)
        kv_dtype = torch.float8_e4m3fn if cfg.kv_cache_dtype == "fp8" else dtype
        block = KVCache.block_bytes(model, b - a, cfg.block_size, kv_dtype)
        out.append({"stage": i, "layers": [a, b], "weight_bytes": weights,
                    "step_weight_bytes": read,
                    "block_bytes": block,
                    "max_blocks": int(min(max(0, budget) // block, useful)),
                    "figures": hw.figures().as_dict()})
    return out


# ---- the cost of one step on each stage ---------------------------------------------------
class StepCost:
    def __init__(self, model: ModelConfig, shapes: list[StageShape], figs: DeviceFigures,
                 hw: Hardware, esize: int, sched_cfg, calibrate: dict[str, float]):
        self.model, self.shapes, self.figs, self.esize = model, shapes, figs, esize
        self.sc = sched_cfg
        self.cal = calibrate
        n = len(shapes)
        # every GPU copies in the same step rhythm: the host's bandwidth is shared
        self.pcie = dataclasses.replace(figs, h2d_gbs=min(figs.h2d_gbs, hw.host_gbs / n))
        self.handoff_s = hw.handoff_ms / 1e3
        self.ring_gbs = hw.ring_gbs
        self.model_s = {k: [0.0] * n for k in KINDS}    # uncalibrated compute, per stage
        self.sim_s = {k: [0.0] * n for k in KINDS}      # calibrated
        self.counts = {k: {"steps": 0, "tokens": 0, "seqs": 0} for k in KINDS}
        self.bytes_prefetched = self.bytes_offloaded = self.bytes_streamed = 0

    def _pcie_s(self, stage: StageShape, tokens: int) -> float:
        """Seconds to move ``tokens`` tokens of this stage's KV over PCIe (the planner's
        prefetch term, t_p, for one sequence of that context)."""
        if tokens <= 0:
            return 0.0
        return stage_step(stage, self.model, 0, tokens, 1, self.pcie, self.esize)[1] / \
            self.cal.get("pcie", 1.0)

    def work(self, plan: StepPlan, step_no: int) -> list[StageWork]:
        q, ctx = plan.q_lens, plan.ctx_lens
        B, N = len(q), int(q.sum())
        kind = step_kind(q)
        c = self.counts[kind]
        c["steps"] += 1
        c["tokens"] += N
        c["seqs"] += B
        on_gpu = int(ctx[~plan.streamed].sum())          # contexts attention reads from HBM
        streamed = int(ctx[plan.streamed].sum())          # ... and in the host pool, in place
        pre = off = 0
        if plan.offloaded.any():
            st = staging_for(q, ctx, plan.block_tables, plan.offloaded, self.sc.block_size,
                             self.sc.num_blocks, self.sc.staging_blocks, step_no % 2,
                             plan.gpu_prefix)
            pre = st.prefetch_blocks * self.sc.block_size
            off = st.offload_blocks * self.sc.block_size
        ratio = self.cal.get(kind, 1.0)
        fixed = self.cal.get("layer_us", 0.0) / 1e6
        out = []
        for i, s in enumerate(self.shapes):
            t = (stage_step(s, self.model, B, on_gpu / B, 0, self.figs, self.esize)[0]
                 + prompt_seconds(self.model, [s], self.figs, N - B))
            self.model_s[kind][i] += t
            last = i == len(self.shapes) - 1
            hand = self.handoff_s + (0 if last else N * self.model.hidden_size * self.esize
                                     / (self.ring_gbs * 1e9))
            self.sim_s[kind][i] += t / ratio + s.layers * fixed
            out.append(StageWork(t / ratio + s.layers * fixed, self._pcie_s(s, pre), self._pcie_s(s, off),
                                 self._pcie_s(s, streamed), hand))
        per_token = sum(s.block_bytes for s in self.shapes) // self.sc.block_size
        self.bytes_prefetched += pre * per_token
        self.bytes_offloaded += off * per_token
        self.bytes_streamed += streamed * per_token
        return out


class SimPipeline:
    """The engine's pipeline (send_step / recv), with simulated time instead of stages."""

    def __init__(self, cost: StepCost, num_stages: int, handoff_s: float, plans: bool = True,
                 early: bool = False):
        self.cost = cost
        self.pipe = PipelineSim(num_stages, plans, early)
        self.handoff_s = handoff_s
        self.now = 0.0
        self.inflight: list[tuple[float, int, int, int]] = []
        self.sched: Scheduler | None = None
        self.host_seq_s = 0.0              # integral of the sequences with host KV over time

    def send_step(self, plan: StepPlan, step_no: int, sampling: dict, num_top: int) -> None:
        done = self.pipe.submit(self.now + self.handoff_s, self.cost.work(plan, step_no))
        heapq.heappush(self.inflight, (done, step_no, plan.mb, len(plan.sample_rows)))

    def recv(self) -> tuple[dict, dict]:
        done, _, mb, n = heapq.heappop(self.inflight)
        on_host = sum(s.placement.on_host for run in self.sched.running for s in run)
        self.host_seq_s += on_host * (done - self.now)
        self.now = done
        return {"mb": mb}, {"token_ids": np.full(n, TOKEN, dtype=np.int64),
                            "logprobs": np.zeros(n, dtype=np.float32),
                            "top_ids": np.zeros((n, 0), dtype=np.int64),
                            "top_logprobs": np.zeros((n, 0), dtype=np.float32)}


# ---- one simulated run --------------------------------------------------------------------
def simulate(cfg: RunConfig, model: ModelConfig, reports: list[dict], lines: list[bytes],
             hw: Hardware, host_bytes: int, max_len: int,
             calibrate: dict[str, float] | None = None) -> dict:
    """The run of ``lines`` (request lines) on stages that report ``reports``."""
    parser = lambda: Parser(None, max_model_len=max_len, vocab_size=model.vocab_size)
    wl = estimate(enumerate(lines), parser(), max_len,
                  block_size=cfg.block_size if cfg.prefix_caching else 0)
    plan, sched_cfg = kv_setup.layout(cfg, model, reports, wl, host_bytes, max_len,
                                      h2d_gbs=min(hw.h2d_gbs, hw.host_gbs / cfg.gpus))
    shapes = kv_setup.stage_shapes(model, reports)
    figs = kv_setup.figures(cfg, reports)
    esize = 4 if cfg.dtype == "float32" else 2
    cost = StepCost(model, shapes, figs, hw, esize, sched_cfg, calibrate or {})
    pipe = SimPipeline(cost, len(shapes), hw.handoff_ms / 1e3,
                       plans=cfg.prefetch_plans and cfg.offload_overlap,
                       early=cfg.offload_overlap and plan.staging_blocks > 0)
    sched = Scheduler(sched_cfg)
    pipe.sched = sched
    results = []
    engine = Engine(pipeline=pipe, sched=sched, tokenizer=None,
                    eos_ids=tuple(model.eos_token_ids), max_model_len=max_len,
                    model_name=model.name, seed=cfg.seed, write=results.append,
                    requests=parser().parse_all(enumerate(lines)),
                    policy=cfg.scheduling_policy)
    stats = engine.run()
    t = pipe.now
    shares = pipe.pipe.shares(t)
    return {"output_tok_s": stats.output_tokens / t if t > 0 else 0.0,
            "total_tok_s": (stats.prompt_tokens + stats.output_tokens) / t if t > 0 else 0.0,
            "seconds": t, "requests_ok": stats.requests_ok,
            "requests_error": stats.requests_error, "output_tokens": stats.output_tokens,
            "prompt_tokens": stats.prompt_tokens,
            "prompt_tokens_computed": stats.prompt_tokens - stats.prompt_tokens_cached,
            "steps": stats.steps, "preemptions": sched.num_preemptions,
            "offloaded_admitted": sched.num_offloaded_admitted,
            "streamed_admitted": sched.num_streamed_admitted,
            "swapped_out": sched.num_swapped_out, "tokens_recomputed": sched.tokens_recomputed,
            "moved_to_host": sched.num_to_host, "moved_to_gpu": sched.num_to_gpu,
            "moved_between_micro_batches": sched.num_moved,
            "host_cache_blocks": sched_cfg.host_cache_blocks,
            "tier_blocks_out": sched.tier_blocks_out, "tier_blocks_in": sched.tier_blocks_in,
            "host_seqs_mean": pipe.host_seq_s / t if t > 0 else 0.0,
            "bubble_share": [s["bubble"] for s in shares],
            "stall_share": [s["stall"] for s in shares],
            "busy_share": [s["busy"] for s in shares],
            "pcie_h2d_share": [s["h2d"] for s in shares],
            "pcie_d2h_share": [s["d2h"] for s in shares],
            "bytes_prefetched": cost.bytes_prefetched, "bytes_offloaded": cost.bytes_offloaded,
            "bytes_streamed": cost.bytes_streamed,
            "step_kinds": {k: {**cost.counts[k],
                               "model_s": cost.model_s[k], "sim_s": cost.sim_s[k],
                               "ratio": (calibrate or {}).get(k, 1.0)}
                           for k in KINDS if cost.counts[k]["steps"]},
            "plan": json.loads(plan.to_json()), "plan_text": plan.describe(),
            "micro_batches": sched_cfg.num_micro_batches,
            "max_seqs_per_mb": sched_cfg.max_seqs_per_mb,
            "max_tokens_per_step": sched_cfg.max_tokens_per_step,
            "num_blocks": sched_cfg.num_blocks, "stages": reports}


# ---- calibration --------------------------------------------------------------------------
def parse_ratios(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        k, _, v = item.partition("=")
        k = k.strip()
        if k not in KINDS + ("pcie", "layer_us"):
            raise ValueError(f"--calibrate: {k!r} is not one of {', '.join(KINDS)}, pcie, "
                             "layer_us")
        try:
            out[k] = float(v)
        except ValueError:
            raise ValueError(f"--calibrate: {item!r} is not kind=number") from None
        if not (out[k] > 0 or k == "layer_us" and out[k] == 0):
            raise ValueError(f"--calibrate: {k} must be positive")
    return out


def measured_kinds(path: str) -> dict[str, float]:
    """GPU seconds per step kind (all stages) of a real run's stats JSON, or of one system of
    a tools.bench --json file (``FILE:SYSTEM``; default: the first with stage reports)."""
    system = None
    if ":" in path and not path.endswith(".json"):
        path, system = path.rsplit(":", 1)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--calibrate: cannot read {path}: {e}") from None
    runs = data if isinstance(data, list) else [data]
    runs = [r for r in runs if isinstance(r, dict) and r.get("finals")
            and (system is None or r.get("system") == system)]
    if not runs:
        raise ValueError(f"--calibrate: {path} holds no run with stage reports (finals)"
                         + (f" of system {system!r}" if system else ""))
    out = {k: 0.0 for k in KINDS}
    for f in runs[0]["finals"]:
        for k, v in (f.get("step_kinds") or {}).items():
            if k in out:
                out[k] += v["gpu_s"]
    if not any(out.values()):
        raise ValueError(f"--calibrate: {path} has no GPU step times (a CPU run?)")
    return out


def fit(sim: dict, measured: dict[str, float], layer_us: float = 0.0) -> dict[str, float]:
    """Measured over predicted time ratios per kind: the model's seconds over the run's
    (less ``layer_us`` per layer and step, kept as given)."""
    layers = sum(b - a for a, b in (r["layers"] for r in sim["stages"]))
    out = {"layer_us": layer_us} if layer_us else {}
    for k, v in sim["step_kinds"].items():
        rest = measured.get(k, 0.0) - v["steps"] * layers * layer_us / 1e6
        if rest > 0:
            out[k] = sum(v["model_s"]) / rest
    return out


# ---- the command --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(BUILTIN_MODELS))
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--preset", choices=sorted(PRESETS), default="h200")
    p.add_argument("--figures", default="", metavar="KEY=VALUE,...",
                   help="override preset figures: " + ", ".join(
                       f.name for f in dataclasses.fields(Hardware)))
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory-gb", type=float, default=None)
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--kv-offload", choices=KV_OFFLOAD, default="auto")
    p.add_argument("--offload-policy", choices=("first-come", "selection"),
                   default=RunConfig.offload_policy)
    p.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES,
                   default=RunConfig.scheduling_policy)
    p.add_argument("--host-kv-gb", type=float, default=None,
                   help="default: half the preset's host memory")
    p.add_argument("--micro-batches", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="default: the run's (2048 on one stage; over several at most 512, steps kept "
                        "near the GPU's compute-bound point)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefix-caching", choices=("on", "off"), default="on")
    p.add_argument("--prefix-cache-host", choices=("on", "off"), default="off",
                   help="the host pool as the prefix cache's second tier (with KV offload)")
    p.add_argument("--prefetch-plans", choices=("on", "off"), default="on",
                   help="stages learn a step's copies from the driver when it is sent (off: "
                        "when its activations arrive)")
    p.add_argument("--workload", default="fixed:512/256")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibrate", default=None,
                   metavar="KIND=RATIO,... | STATS.json[:SYSTEM]")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the text")
    return p


def hardware(preset: str, text: str) -> Hardware:
    hw = PRESETS[preset]
    if not text:
        return hw
    names = {f.name for f in dataclasses.fields(Hardware)}
    kw = {}
    for item in text.split(","):
        k, _, v = item.partition("=")
        k = k.strip()
        try:
            kw[k] = float(v)
        except ValueError:
            raise ValueError(f"--figures: {item!r} is not key=number") from None
        if k not in names or not kw[k] > 0:
            raise ValueError(f"--figures: {k}={v} is not one of {', '.join(sorted(names))} "
                             "with a positive value")
    return dataclasses.replace(hw, **kw)


def report(r: dict, a, hw: Hardware) -> str:
    pct = lambda xs: " ".join(f"{100 * x:.0f}%" for x in xs)
    kinds = ", ".join(f"{k} {v['steps']} ({v['seqs'] / v['steps']:.0f} seqs, "
                      f"{v['tokens'] / v['steps']:.0f} tokens each; ratio {v['ratio']:.2f})"
                      for k, v in r["step_kinds"].items())
    return "\n".join([
        f"{a.gpus} x {a.preset} ({hw.memory_gb if not a.gpu_memory_gb else a.gpu_memory_gb:g}"
        f" GiB), {a.model}, {a.workload} x {a.num_requests}, --kv-offload {a.kv_offload}, "
        f"--scheduling-policy {a.scheduling_policy}",
        f"plan: {r['plan_text']}; steps of at most {r['max_tokens_per_step']} tokens",
        f"output {r['output_tok_s']:.0f} tok/s, total {r['total_tok_s']:.0f} tok/s, "
        f"{r['seconds']:.1f} s; {r['requests_ok']} requests ok, {r['requests_error']} failed",
        f"steps {r['steps']}: {kinds}; preemptions {r['preemptions']}",
        f"bubble share per stage {pct(r['bubble_share'])}; stalled on PCIe "
        f"{pct(r['stall_share'])}",
        f"PCIe busy per stage (host to GPU) {pct(r['pcie_h2d_share'])}, (GPU to host) "
        f"{pct(r['pcie_d2h_share'])}; {r['bytes_prefetched'] / 1e9:.1f} GB prefetched, "
        f"{r['bytes_streamed'] / 1e9:.1f} GB streamed",
        f"sequences on the host: mean {r['host_seqs_mean']:.1f} ({r['offloaded_admitted']} "
        f"offloaded, {r['streamed_admitted']} streamed admissions); --offload-policy "
        f"{a.offload_policy}: {r['moved_to_host']} moved to the host, {r['moved_to_gpu']} "
        f"back to the GPU, {r['moved_between_micro_batches']} between micro-batches; "
        f"{r['swapped_out']} preemptions swapped, {r['tokens_recomputed']} tokens recomputed"])


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        if a.num_requests < 1:
            raise ValueError("--num-requests must be at least 1")
        hw = hardware(a.preset, a.figures)
        model = apply_overrides(BUILTIN_MODELS[a.model], a.override)
        if a.gpus > model.num_layers:
            raise ValueError(f"--gpus {a.gpus} is more stages than the model's "
                             f"{model.num_layers} layers")
        if a.gpu_memory_gb and a.gpu_memory_gb > hw.memory_gb:
            raise ValueError(f"--gpu-memory-gb {a.gpu_memory_gb:g} is more than the "
                             f"{a.preset}'s {hw.memory_gb:.1f} GiB")
        cfg = RunConfig(gpus=a.gpus, device="cuda", model=a.model, load_format="dummy",
                        dtype="bfloat16", gpu_memory_gb=a.gpu_memory_gb,
                        kv_cache_gb=a.kv_cache_gb, block_size=a.block_size,
                        max_num_seqs=a.max_num_seqs, micro_batches=a.micro_batches,
                        max_num_batched_tokens=a.max_num_batched_tokens, seed=a.seed,
                        kv_offload=a.kv_offload, host_kv_gb=a.host_kv_gb,
                        offload_policy=a.offload_policy,
                        scheduling_policy=a.scheduling_policy,
                        prefix_caching=a.prefix_caching == "on",
                        prefix_cache_host=a.prefix_cache_host == "on",
                        prefetch_plans=a.prefetch_plans == "on")
        max_len = min(model.max_position_embeddings, a.max_model_len or 1 << 62)
        lines = [json.dumps(r, separators=(",", ":")).encode()
                 for r in requests(a.workload, a.num_requests, model.vocab_size, a.seed)]
        host = int((a.host_kv_gb or hw.host_memory_gb / 2) * GiB)
        reports = stage_reports(cfg, model, hw, max_len)
        cal = None
        if a.calibrate:
            path, _, fixed = a.calibrate.partition(",")
            if "=" in path:
                cal = parse_ratios(a.calibrate)
            else:
                layer_us = parse_ratios(fixed).get("layer_us", 0.0) if fixed else 0.0
                cal = fit(simulate(cfg, model, reports, lines, hw, host, max_len),
                          measured_kinds(path), layer_us)
        r = simulate(cfg, model, reports, lines, hw, host, max_len, cal)
    except (ValueError, ConfigError, ModelConfigError, PlanError) as e:
        print(f"simulate: error: {e}", file=sys.stderr)
        return 2
    r.update(preset=a.preset, hardware=dataclasses.asdict(hw), model=a.model, gpus=a.gpus,
             workload=a.workload, num_requests=a.num_requests, kv_offload=a.kv_offload,
             calibration=cal or {})
    print(json.dumps(r) if a.json else report(r, a, hw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
