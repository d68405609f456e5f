"""What a finished run reports: the summary line, the plan's prediction against the measured
figure (with the KV offload and ring hand-off figures), and the ``--stats-json`` file. Built
from the engine's stats, the runtime (pipemax/runtime.py) and the stages' final reports; the
command (pipemax/launch.py) prints it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from pipemax.engine import Stats
from pipemax.runtime import weights_name
from pipemax.scheduler import Scheduler


def handoff_summary(finals: list[dict]) -> str:
    """The ring hand-offs the stages waited for (writer's stamp to the copy out)."""
    n = sum(f.get("handoffs", 0) for f in finals)
    if not n:
        return ""
    mean = sum(f["handoff_s"] for f in finals) / n
    worst = max(f["handoff_max_s"] for f in finals)
    return f"; ring hand-offs {mean * 1e3:.2f} ms mean, {worst * 1e3:.1f} ms max ({n})"


def _total(finals: list[dict], key: str) -> int:
    """A counter of the stages' final reports, added over the stages."""
    return sum(f.get(key, 0) for f in finals)


def offload_summary(finals: list[dict], sched: Scheduler) -> str:
    streamed = (f"; {sched.num_streamed_admitted} sequences streamed from the host pool"
                if sched.num_streamed_admitted else "")
    if not sched.offload:
        return streamed
    gib = lambda x: x / 2**30
    peak = max((f.get("peak_staging_blocks", 0) for f in finals), default=0)
    planned = _total(finals, "prefetched_from_plans")
    ahead = (f", {planned} prefetches issued from the driver's copy plans" if planned else "")
    early = _total(finals, "taken_early")
    ahead += f", {early} steps taken while the one before computed" if early else ""
    return (f"; KV offload: {sched.num_offloaded_admitted} sequences offloaded, "
            f"{gib(_total(finals, 'bytes_prefetched')):.2f} GiB prefetched, "
            f"{gib(_total(finals, 'bytes_offloaded')):.2f} GiB offloaded, peak staging "
            f"{peak} blocks per buffer" + ahead + streamed)


def preemption_summary(finals: list[dict], sched: Scheduler) -> str:
    """What preemptions cost: the sequences swapped to the host pool and back (no
    recomputation), and the tokens recomputed for the others."""
    if not sched.num_preemptions:
        return ""
    mib = lambda key: _total(finals, key) / 2**20
    kept = (f", {sched.num_kept_on_host} of them offloaded ones kept where they were"
            if sched.num_kept_on_host else "")
    swapped = (f"{sched.num_swapped_out} swapped to the host pool ({mib('bytes_swapped_out'):.1f} "
               f"MiB out, {mib('bytes_swapped_in'):.1f} MiB back in{kept}), "
               if sched.num_swapped_out else "")
    return (f"; {sched.num_preemptions} preemptions: {swapped}{sched.tokens_recomputed} "
            "tokens recomputed")


def host_tier_summary(sched: Scheduler) -> str:
    """The prefix cache with offload: offloaded sequences that mapped a cached prefix, and
    the host tier's blocks (copied in when evicted from the GPU, brought back)."""
    parts = []
    if sched.num_offloaded_cached:
        parts.append(f"{sched.num_offloaded_cached} offloaded sequences mapped a cached prefix")
    if sched.tier is not None:
        parts.append(f"host tier of the prefix cache: {sched.tier_blocks_out} blocks kept, "
                     f"{sched.tier_blocks_in} brought back instead of recomputed")
    return "".join("; " + p for p in parts)


def figures(stats: Stats, rt, finals: list[dict]) -> dict:
    """The ``--stats-json`` figures of a run."""
    sched, sched_cfg = rt.sched, rt.sched_cfg
    return {**stats.as_dict(), "load_seconds": rt.load_s, "num_blocks": sched_cfg.num_blocks,
            "peak_gpu_gb": [f["peak_gpu_bytes"] / 2**30 for f in finals],
            "block_size": rt.cfg.block_size, "stages": rt.reports,
            "preemptions": sched.num_preemptions,
            "swapped_out": sched.num_swapped_out,
            "kept_on_host": sched.num_kept_on_host,
            "blocks_swapped_out": sched.blocks_swapped_out,
            "blocks_swapped_in": sched.blocks_swapped_in,
            "tokens_recomputed": sched.tokens_recomputed,
            # the stages' swap copies: preempted sequences' and the host tier's blocks
            "bytes_swapped_out": _total(finals, "bytes_swapped_out"),
            "bytes_swapped_in": _total(finals, "bytes_swapped_in"),
            "micro_batches": sched_cfg.num_micro_batches,
            "max_seqs_per_mb": sched_cfg.max_seqs_per_mb,
            "max_tokens_per_step": sched_cfg.max_tokens_per_step,
            "plan": json.loads(rt.kv_plan.to_json()),
            "kv_cache_dtype": rt.cfg.kv_dtype_name,
            "kv_scales": rt.cfg.kv_scales if rt.cfg.kv_cache_dtype == "fp8" else None,
            "offloaded_admitted": sched.num_offloaded_admitted,
            "streamed_admitted": sched.num_streamed_admitted,
            "offload_policy": sched_cfg.offload_policy, "moved_to_host": sched.num_to_host,
            "moved_to_gpu": sched.num_to_gpu, "moved_between_micro_batches": sched.num_moved,
            "bytes_prefetched": _total(finals, "bytes_prefetched"),
            "bytes_offloaded": _total(finals, "bytes_offloaded"),
            "offloaded_cached": sched.num_offloaded_cached,
            "host_cache_blocks": sched_cfg.host_cache_blocks,
            "host_cache_blocks_out": sched.tier_blocks_out,
            "host_cache_hits": sched.tier_blocks_in,
            "finals": finals}


def measured_line(rt, stats: Stats, finals: list[dict]) -> str:
    """The weights' dtype and the measured figure, beside the plan's prediction on CUDA (the
    CPU's figures are nominal: no prediction)."""
    plan = rt.kv_plan
    measured = stats.as_dict()["output_tok_s"]
    predicted = (f"plan predicted {plan.predicted_tok_s:.0f} output tok/s "
                 f"({plan.decode_tok_s:.0f} in steady decode); measured {measured:.0f}"
                 f" ({measured / plan.predicted_tok_s:.2f} of it)"
                 if rt.cfg.device == "cuda" and plan.predicted_tok_s > 0 else
                 f"measured {measured:.0f}")
    return (f"weights {weights_name(rt.cfg)}; {predicted} output tok/s over the whole run"
            + offload_summary(finals, rt.sched) + host_tier_summary(rt.sched)
            + preemption_summary(finals, rt.sched)
            + handoff_summary(finals))


def report(rt, stats: Stats, finals: list[dict], *, summary: Callable[[str], None],
           log: Callable[[str], None]) -> None:
    """Write ``--stats-json`` (if asked for); the summary line, then the measured line."""
    if rt.cfg.stats_json:
        Path(rt.cfg.stats_json).write_text(
            json.dumps(figures(stats, rt, finals), indent=1) + "\n")
    summary(f"{stats.summary()} | KV cache {rt.cfg.kv_dtype_name}")
    log(measured_line(rt, stats, finals))


def service_line(outcome: str, totals: dict) -> str:
    return (f"service {outcome}: {totals['requests_ok']} requests ok, "
            f"{totals['requests_error']} failed, {totals['output_tokens']} output tokens")
