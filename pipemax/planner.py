"""The planner: how many sequences per micro-batch, and how much of their KV lives on the host.

Pure functions of (model, stage layout, device figures, memory budgets, workload), following
the cost model of the design reference. Per stage s with L_s layers, a decode step of a
micro-batch of B sequences at mean context c takes

    t_w = weight bytes / BW_hbm            (weights streamed once per step; 1 byte each in fp8)
    t_f = 2 * params * B / F_decode         (GEMMs, at the rate measured at a decode batch)
    t_a = B * c * L_s * k / BW_hbm          (attention reads the KV; k = 2 * kv_heads * head_dim * b,
                                             b the KV cache's bytes per element: 1 in fp8)
    t_p = n_off * c * L_s * k / BW_h2d      (offloaded sequences' KV, prefetched every step)
    step = max(max(t_w, t_f) + t_a, t_p)

and the pipeline delivers B tokens per slowest-stage step (``decode_tok_s``). Every request
also brings its prompt, computed once at the GEMM rate on each stage,

    t_prompt = 2 * layer params * mean_prompt / F      (per request, slowest stage; F: the
                                                        rate measured at a prompt chunk)

so the whole run's prediction is mean_output / (t_prompt + mean_output / decode_tok_s): the
prompt and decode work of a request, done back to back on the slowest stage. With prefix
caching the prompt tokens a resident sequence takes from the cache (``Workload.cached_prompt``)
are not computed, and its blocks of them are held once for all its sharers
(``Workload.cached_blocks``), not once per sequence. Without offload every micro-batch's
KV sits on the GPU, so GPU memory caps B * M. With offload, the GPU holds the resident
sequences plus two staging buffers (the active micro-batch's offloaded KV and the next one's,
being prefetched), and B grows until t_p no longer hides under the step.
"""
from __future__ import annotations

import json
import math
import dataclasses
from dataclasses import asdict, dataclass

from pipemax.model_config import ModelConfig
from pipemax.placement import Room, offload_share, stream_share, swap_share


@dataclass(frozen=True)
class DeviceFigures:
    hbm_gbs: float       # device memory bandwidth
    h2d_gbs: float       # pinned host -> device
    tflops: float        # GEMM rate of a prompt chunk, at the model's shapes and weight dtype
    decode_tflops: float = 0.0   # the same at a decode batch (0: tflops)

    @property
    def decode_rate(self) -> float:
        return self.decode_tflops or self.tflops

    def as_dict(self) -> dict:
        return asdict(self)


# Nominal figures for the CPU (only the shape of the plan matters there: tests, dry runs).
CPU_FIGURES = DeviceFigures(hbm_gbs=20.0, h2d_gbs=10.0, tflops=0.2)


@dataclass(frozen=True)
class StageShape:
    layers: int
    params: int             # parameters read per step (layers, + lm_head on the last stage)
    block_bytes: int        # one KV block of this stage (all its layers)
    gpu_blocks: int         # KV blocks this stage's memory can hold
    weight_bytes: int | None = None   # bytes streamed per step (None: params x the dtype's size)

    @staticmethod
    def params_read(cfg: ModelConfig, layers: int, last: bool) -> int:
        """Parameters a stage streams per step: its layers, and the lm_head on the last."""
        return layers * cfg.layer_params() + (cfg.head_params() if last else 0)


@dataclass(frozen=True)
class Workload:
    mean_prompt: float
    mean_output: float
    max_total: int          # longest prompt + max_tokens
    samples: tuple[tuple[int, int], ...] = ()   # (prompt, output) of the requests sampled
    cached_prompt: float = 0.0  # mean prompt tokens per request from the prefix cache
    cached_blocks: int = 0      # blocks the shared prefixes hold (once, for all sharers)

    @property
    def mean_context(self) -> float:
        """Mean context over a sequence's decode life."""
        return self.mean_prompt + self.mean_output / 2

    @staticmethod
    def of(samples: list[tuple[int, int]]) -> "Workload":
        n = len(samples)
        return Workload(sum(p for p, _ in samples) / n, sum(o for _, o in samples) / n,
                        max(p + o for p, o in samples), tuple(samples))

    def within(self, limit: int) -> "Workload | None":
        """The sampled requests of at most ``limit`` tokens (None: none, or no samples)."""
        kept = [(p, o) for p, o in self.samples if p + o <= limit]
        if not kept:
            return None
        w = Workload.of(kept)
        return dataclasses.replace(w, cached_prompt=min(self.cached_prompt, w.mean_prompt),
                                   cached_blocks=self.cached_blocks)


@dataclass(frozen=True)
class Plan:
    offload: bool
    micro_batches: int
    seqs_per_mb: int
    resident_blocks: int
    staging_blocks: int
    host_blocks: int        # the host pool: the offloaded sequences' share + stream_blocks
    offloaded_per_mb: int
    predicted_tok_s: float
    predicted_step_ms: float
    prefetch_ms: float
    bound: str
    other_tok_s: float      # the best plan of the other kind (offload on vs off), for the summary
    decode_tok_s: float = 0.0   # the steady decode state alone (no prompts)
    too_long: int = 0           # sampled requests longer than the plan can hold (error lines)
    streamed: int = 0           # sampled requests too long for the GPU, served streamed
    stream_blocks: int = 0      # host blocks kept for streamed sequences
    cached_prompt: float = 0.0  # mean prompt tokens per request counted as cached
    kv_bound: bool = False      # the batch is as large as the GPU's KV blocks allow
    swap_blocks: int = 0        # host blocks kept for preempted sequences (swap-only)

    def describe(self, prediction: bool = True) -> str:
        """The plan in one line; ``prediction=False`` leaves out the predicted figures (a run
        on nominal figures, the CPU's)."""
        kind = ("offload on" if self.offload else
                "offload off, swap" if self.swap_blocks else "offload off")
        return (f"{kind}: {self.micro_batches} micro-batches x {self.seqs_per_mb} sequences "
                f"({self.offloaded_per_mb} offloaded each), resident {self.resident_blocks} "
                f"blocks, staging 2 x {self.staging_blocks}, host {self.host_blocks}"
                + (f"; predicted {self.predicted_tok_s:.0f} output tok/s "
                   f"({self.decode_tok_s:.0f} in steady decode; step "
                   f"{self.predicted_step_ms:.2f} ms, prefetch {self.prefetch_ms:.2f} ms, "
                   f"{self.bound}-bound; the other choice {self.other_tok_s:.0f})"
                   if prediction else "")
                + (f"; preempted sequences wait in {self.swap_blocks} host blocks, not "
                   "recomputed" if self.swap_blocks else "")
                + (f"; {self.cached_prompt:.0f} prompt tokens per request from the prefix "
                   "cache" if self.cached_prompt else "")
                + (f"; {self.streamed} of the sampled requests are too long for the GPU and "
                   f"run streamed from {self.stream_blocks} host blocks (not in the prediction)"
                   if self.streamed else "")
                + (f"; {self.too_long} of the sampled requests are longer than it can hold "
                   "and get error lines" if self.too_long else ""))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class PlanError(ValueError):
    """No plan fits the memory; one line with the figures."""


def stage_step(stage: StageShape, cfg: ModelConfig, B: int, ctx: float, n_off: int,
               figs: DeviceFigures, esize: int,
               kv_esize: int | None = None) -> tuple[float, float, str]:
    """(step seconds, prefetch seconds, what bounds it) for one stage; ``esize``: bytes per
    (16-bit) weight element, ``kv_esize``: per KV element (default the same)."""
    k = cfg.kv_bytes_per_token_layer(kv_esize or esize)
    wbytes = stage.weight_bytes if stage.weight_bytes is not None else stage.params * esize
    t_w = wbytes / (figs.hbm_gbs * 1e9)
    t_f = 2 * stage.params * B / (figs.decode_rate * 1e12)
    t_a = B * ctx * stage.layers * k / (figs.hbm_gbs * 1e9)
    t_p = n_off * ctx * stage.layers * k / (figs.h2d_gbs * 1e9)
    compute = max(t_w, t_f) + t_a
    if t_p > compute:
        return t_p, t_p, "pcie"
    return compute, t_p, "compute" if t_f > t_w else "hbm"


def pipeline_step_tokens(stages: list[StageShape], figs: DeviceFigures, esize: int, cap: int,
                         block_size: int, seqs_per_mb: int = 0,
                         wl: Workload | None = None) -> int:
    """Tokens per step in a pipeline of several stages: where a stage's step turns
    compute-bound (its GEMMs take as long as its weight read), or, if more, what keeps the
    prompts coming (a micro-batch's decode tokens, plus 1.5 x the prompt tokens its finishing
    sequences leave to fill: ``seqs_per_mb`` x mean prompt / mean output); rounded up to
    whole blocks, at least 64, at most ``cap``. Up to the first, prompt tokens ride with the
    decode tokens at almost no cost; past it a step with a long prompt chunk takes many
    decode steps' time, and since every micro-batch passes every stage in turn, the whole
    pipeline waits behind it (tools/simulate.py: the chat mix over 8 x rtx4090 at 2,048
    tokens per step idles each stage 42% of the time)."""
    n = max(figs.tflops * 1e12 * (s.weight_bytes if s.weight_bytes is not None
                                  else s.params * esize)
            / (2 * s.params * figs.hbm_gbs * 1e9) for s in stages)
    if wl is not None and wl.mean_output > 0:
        n = max(n, seqs_per_mb * (1 + 1.5 * wl.mean_prompt / wl.mean_output))
    n = -(-math.ceil(n) // block_size) * block_size
    return min(cap, max(64, n))


def prompt_seconds(cfg: ModelConfig, stages: list[StageShape], figs: DeviceFigures,
                   mean_prompt: float) -> float:
    """GEMM time of one request's prompt on the slowest stage."""
    return max(2 * s.layers * cfg.layer_params() * mean_prompt / (figs.tflops * 1e12)
               for s in stages)


def run_tok_s(decode_tok_s: float, t_prompt: float, mean_output: float) -> float:
    """Output tokens/s of a whole run: each request's prompt, then its decode."""
    if decode_tok_s <= 0:
        return 0.0
    return mean_output / (t_prompt + mean_output / decode_tok_s)


def _predict(cfg, stages, figs, esize, wl, M, B, n_off, kv_esize=None):
    """(whole-run tok/s, steady decode tok/s, (step, prefetch, bound) of the slowest stage)."""
    ctx = wl.mean_context
    steps = [stage_step(s, cfg, B, ctx, n_off, figs, esize, kv_esize) for s in stages]
    worst = max(steps, key=lambda x: x[0])
    bubble = min(1.0, M / len(stages))
    decode = B / worst[0] * bubble
    computed = wl.mean_prompt - wl.cached_prompt * (B - n_off) / B   # offloaded: no cache
    return run_tok_s(decode, prompt_seconds(cfg, stages, figs, computed),
                     wl.mean_output), decode, worst


def plan(cfg: ModelConfig, stages: list[StageShape], figs: DeviceFigures, esize: int,
         wl: Workload, *, mode: str, micro_batches: int, max_seqs: int, block_size: int,
         host_blocks: int, kv_esize: int | None = None) -> Plan:
    """Choose the plan that maximises predicted tokens/s (mode: auto | on | off | swap).
    ``esize``: bytes per weight element; ``kv_esize``: per KV cache element (default the same;
    1 for an fp8 cache, whose blocks, in ``stages``, are half as large too).

    When no plan holds the longest requests, plan for those that fit (one sequence alone in
    the GPU's blocks; with offload on, in a staging buffer). Unless offload is off, the longer
    ones run streamed (their KV read in place in the host pool; pipemax/placement.py, the rule
    the scheduler admits by) from host blocks kept for them, one at a time per micro-batch;
    those the host cannot hold either get error lines instead of the whole run being refused.
    The plan's ``host_blocks`` is the host pool to start. PlanError when not even those that
    fit the GPU can run.

    *Swap-only* (mode ``swap``; ``auto`` when it chooses offload off for a batch that the
    GPU's KV blocks bound, so that sequences outgrowing them are preempted) is the off plan
    with a host pool kept for preempted sequences (``placement.swap_share``): their KV waits
    there and comes back into GPU blocks, instead of being recomputed. Its prediction is the
    off plan's (the cost model has no preemptions: it costs copies where off recomputes). A
    plan with offload keeps the same share beside its offloaded sequences' extents, so that
    its preempted resident sequences swap too."""
    kw = dict(mode=mode, micro_batches=micro_batches, max_seqs=max_seqs,
              block_size=block_size, host_blocks=host_blocks, kv_esize=kv_esize)
    try:
        p = _plan(cfg, stages, figs, esize, wl, **kw)
        limit = max(p.resident_blocks, p.staging_blocks) * block_size
    except PlanError as e:
        G = min(s.gpu_blocks for s in stages)
        limit = (G // 2 if mode == "on" else G) * block_size
        fit = wl.within(limit)
        if not wl.samples or mode == "off" and fit is None or (
                fit is not None and len(fit.samples) == len(wl.samples)):
            raise
        refused = e
        # every sampled request too long for the GPU: a plan for short ones, with no prediction
        p = (_plan(cfg, stages, figs, esize, fit, **kw) if fit is not None else
             dataclasses.replace(_plan(cfg, stages, figs, esize, Workload(1.0, 1.0, 2), **kw),
                                 predicted_tok_s=0.0, decode_tok_s=0.0, other_tok_s=0.0))
    else:
        refused = None
    long = [a + b for a, b in wl.samples if a + b > limit]
    if long and len(long) < len(wl.samples):  # the batch's plan, from the requests it holds
        p = _plan(cfg, stages, figs, esize, wl.within(limit), **kw)
    # which of the long ones stream, from the host blocks the offloaded ones leave spare
    spare = host_blocks - p.host_blocks if mode != "off" else 0
    streamed, too_long, keep = stream_share([math.ceil(n / block_size) for n in long],
                                            Room(p.resident_blocks, p.staging_blocks, spare),
                                            p.micro_batches)
    if refused is not None and streamed + too_long == len(wl.samples) and not streamed:
        raise refused
    swap = 0
    if p.offload or mode == "swap" or mode == "auto" and p.kv_bound:
        held = [a + b for a, b in wl.samples if a + b <= limit]  # the GPU holds: not streamed
        need = math.ceil((max(held) if held else min(wl.max_total, limit)) / block_size)
        swap = swap_share(spare - keep, p.resident_blocks, p.micro_batches, need)
        if swap < need:
            if mode == "swap":
                raise PlanError(f"swap-only needs a host pool of at least {need} blocks (the "
                                f"longest request the GPU holds, {need * block_size} tokens); "
                                f"the host pool holds {host_blocks} (raise --host-kv-gb)")
            swap = 0
    return dataclasses.replace(p, too_long=too_long, streamed=streamed, stream_blocks=keep,
                               host_blocks=p.host_blocks + keep + swap, swap_blocks=swap)


def _plan(cfg: ModelConfig, stages: list[StageShape], figs: DeviceFigures, esize: int,
          wl: Workload, *, mode: str, micro_batches: int, max_seqs: int, block_size: int,
          host_blocks: int, kv_esize: int | None = None) -> Plan:
    M = micro_batches
    G = min(s.gpu_blocks for s in stages)
    foot = max(1, math.ceil(wl.mean_context / block_size))       # mean blocks held per seq
    own = max(1, math.ceil((wl.mean_context - wl.cached_prompt) / block_size))  # resident:
    # its blocks beside the shared ones (held once, of the resident blocks)
    ext = max(1, math.ceil((wl.mean_prompt + wl.mean_output) / block_size))  # host extent
    staged = max(1, math.ceil(foot * 1.1))     # staging blocks per offloaded seq, with margin
    longest = math.ceil(wl.max_total / block_size)
    per_mb_cap = max(1, max_seqs // M)

    def make(S: int):
        R = G - 2 * S
        if R < 0:
            return None
        n_off = 0
        if S:
            if S < longest or host_blocks < longest:
                return None
            n_off = min(S // staged, host_blocks // (M * ext), per_mb_cap)
            if n_off == 0:
                return None
        fit = (R - min(wl.cached_blocks, R // 2)) // own // M
        n_res = min(fit, per_mb_cap - n_off)
        B = n_res + n_off
        if B < 1:
            return None
        tok_s, decode, (step, t_p, bound) = _predict(cfg, stages, figs, esize, wl, M, B, n_off,
                                                     kv_esize)
        return (tok_s, S, R, B, n_off, step, t_p, bound, decode, fit < per_mb_cap - n_off)

    off = make(0)
    ons = [p for p in (make(S) for S in _staging_grid(G, longest)) if p is not None]
    best_on = max(ons, key=lambda p: p[0]) if ons else None
    if mode in ("off", "swap") or (mode == "auto" and (best_on is None or
                                             (off is not None and best_on[0] < 1.05 * off[0]))):
        chosen, other = off, best_on
        if chosen is None:
            raise PlanError(f"GPU memory holds {G} KV blocks of {block_size} tokens per stage: "
                            f"too few for one sequence of {wl.max_total} tokens "
                            "(raise --gpu-memory-gb, use more stages, or --kv-offload on)")
    else:
        chosen, other = best_on, off
        if chosen is None:
            raise PlanError(f"KV offload needs two staging buffers of at least {longest} blocks "
                            f"(the longest request, {wl.max_total} tokens) and as many host "
                            f"blocks; the GPU holds {G} blocks per stage and the host pool "
                            f"{host_blocks} (raise --gpu-memory-gb or --host-kv-gb)")
    tok_s, S, R, B, n_off, step, t_p, bound, decode, kv_bound = chosen
    return Plan(offload=S > 0, micro_batches=M, seqs_per_mb=B, resident_blocks=R,
                staging_blocks=S, host_blocks=offload_share(host_blocks, M, S),
                offloaded_per_mb=n_off,
                predicted_tok_s=tok_s, predicted_step_ms=step * 1e3, prefetch_ms=t_p * 1e3,
                bound=bound, other_tok_s=other[0] if other else 0.0, decode_tok_s=decode,
                cached_prompt=wl.cached_prompt, kv_bound=kv_bound)


def _staging_grid(G: int, longest: int) -> list[int]:
    """Staging sizes worth trying: from one longest sequence up to all of the GPU."""
    top = G // 2
    if top < longest:
        return []
    return sorted({longest + (top - longest) * i // 24 for i in range(25)})
