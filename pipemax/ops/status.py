"""The status snapshot's renderings: Prometheus text exposition format and a few lines for people.

The snapshot is the plain dict that the engine loop publishes (pipemax/ops/supervisor.py) and
that ``status`` returns; this module only reads it (no torch: the client imports it too).
"""
from __future__ import annotations

from pipemax.ops.progress import fmt_duration

PHASES = ("loading", "running", "paused", "draining", "idle", "stopping", "done")


def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v) -> str:
    if v is None:
        return "NaN"
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        if v != v:
            return "NaN"
        if v in (float("inf"), float("-inf")):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(int(v))


class _Text:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples) -> None:
        """samples: value, or a list of (labels dict, value)."""
        if not isinstance(samples, list):
            samples = [({}, samples)]
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, v in samples:
            lab = ",".join(f'{k}="{_esc(x)}"' for k, x in labels.items())
            self.lines.append(f"{name}{{{lab}}} {_num(v)}" if lab else f"{name} {_num(v)}")


def _share(totals: dict) -> float:
    """Prompt tokens from the prefix cache over prompt tokens (0 before any)."""
    total = int(totals.get("prompt_tokens") or 0)
    return int(totals.get("prompt_tokens_cached") or 0) / total if total else 0.0


def prometheus(s: dict) -> str:
    """The snapshot in the Prometheus text exposition format (version 0.0.4)."""
    t = _Text()
    req = s.get("requests") or {}
    tot = s.get("totals") or {}
    kv = s.get("kv") or {}
    t.metric("pipemax_up", "gauge", "1 while the pipemax process runs.", 1)
    t.metric("pipemax_phase", "gauge", "The run's phase (1 for the current one).",
             [({"phase": p}, int(s.get("phase") == p)) for p in PHASES])
    t.metric("pipemax_paused", "gauge", "1 while paused by a control command.",
             bool(s.get("paused")))
    t.metric("pipemax_uptime_seconds", "gauge", "Seconds since the process started.",
             float(s.get("uptime_s") or 0.0))
    t.metric("pipemax_job_requests", "gauge",
             "Requests of the current job: total (input lines), done (answered, including "
             "by earlier runs of the same output), resumed, running, waiting.",
             [({"state": k}, int(req.get(k) or 0))
              for k in ("total", "done", "resumed", "running", "waiting")])
    t.metric("pipemax_requests_total", "counter",
             "Requests answered by this process, by outcome.",
             [({"outcome": "ok"}, int(tot.get("requests_ok") or 0)),
              ({"outcome": "error"}, int(tot.get("requests_error") or 0))])
    t.metric("pipemax_prompt_tokens_total", "counter", "Prompt tokens of answered requests.",
             int(tot.get("prompt_tokens") or 0))
    t.metric("pipemax_prompt_tokens_computed_total", "counter",
             "Prompt tokens of answered requests that were computed (the rest came from the "
             "prefix cache).",
             int(tot.get("prompt_tokens") or 0) - int(tot.get("prompt_tokens_cached") or 0))
    t.metric("pipemax_prefix_cache_hit_ratio", "gauge",
             "Share of answered requests' prompt tokens taken from the prefix cache.",
             _share(tot))
    t.metric("pipemax_output_tokens_total", "counter", "Tokens generated for answered requests.",
             int(tot.get("output_tokens") or 0))
    t.metric("pipemax_output_tokens_per_second", "gauge",
             "Output tokens per second over the last 30 s.", float(s.get("tok_s") or 0.0))
    t.metric("pipemax_eta_seconds", "gauge", "Estimated seconds until the current job is done.",
             s.get("eta_s"))
    t.metric("pipemax_steps_total", "counter", "Micro-batch steps landed.",
             int(tot.get("steps") or 0))
    t.metric("pipemax_preemptions_total", "counter",
             "Sequences preempted (KV blocks ran out; recomputed later).",
             int(s.get("preemptions") or 0))
    kv_samples = [({"memory": "gpu", "state": "used"}, kv.get("gpu_used")),
                  ({"memory": "gpu", "state": "total"}, kv.get("gpu_total"))]
    if kv.get("host_total") is not None:
        kv_samples += [({"memory": "host", "state": "used"}, kv.get("host_used")),
                       ({"memory": "host", "state": "total"}, kv.get("host_total"))]
    t.metric("pipemax_kv_blocks", "gauge", "KV cache blocks, used and total.",
             [(lab, v if v is not None else 0) for lab, v in kv_samples])
    t.metric("pipemax_stage_busy_ratio", "gauge",
             "Estimated share of time each stage has work (see status: stage_busy_method).",
             [({"stage": str(st["stage"])}, float(st["busy"])) for st in s.get("stages") or []])
    if s.get("driver_busy") is not None:
        t.metric("pipemax_driver_busy_ratio", "gauge",
                 "Share of the job's time the driver spent on its own work (not waiting for "
                 "the pipeline).", float(s["driver_busy"]))
    jobs = s.get("jobs") or []
    states = ("queued", "running", "done", "failed", "stopped", "cancelled")
    t.metric("pipemax_jobs", "gauge", "Jobs of this process by state.",
             [({"state": st}, sum(1 for j in jobs if j.get("state") == st)) for st in states])
    return "\n".join(t.lines) + "\n"


def describe(s: dict) -> str:
    """A few lines for a person (``python -m pipemax.ctl status``)."""
    req = s.get("requests") or {}
    kv = s.get("kv") or {}
    total, done = int(req.get("total") or 0), int(req.get("done") or 0)
    pct = f" ({100.0 * done / total:.1f}%)" if total else ""
    lines = [f"phase      {s.get('phase')} (pid {s.get('pid')}, {s.get('mode')} mode, up "
             f"{fmt_duration(s.get('uptime_s'))})"]
    job = s.get("job")
    if job:
        lines.append(f"job        {job.get('id')}: {job.get('input')} -> {job.get('output')}")
    lines.append(f"requests   {done}/{total} done{pct}, {req.get('resumed', 0)} from earlier runs"
                 f", {req.get('running', 0)} running, {req.get('waiting', 0)} waiting, "
                 f"{req.get('failed', 0)} failed")
    lines.append(f"speed      {float(s.get('tok_s') or 0):.1f} output tok/s, ETA "
                 f"{fmt_duration(s.get('eta_s'))}")
    tot = s.get("totals") or {}
    if tot.get("prompt_tokens"):
        lines.append(f"prompts    {tot['prompt_tokens']} tokens, "
                     f"{tot['prompt_tokens'] - int(tot.get('prompt_tokens_cached') or 0)} "
                     f"computed ({100 * _share(tot):.0f}% from the prefix cache)")
    if kv:
        host = (f", host {kv.get('host_used')}/{kv.get('host_total')}"
                if kv.get("host_total") is not None else "")
        if kv.get("host_cached"):
            host += f" (+{kv['host_cached']} cached in the host tier)"
        idle = (f" (+{kv['gpu_cached_idle']} cached, idle)" if kv.get("gpu_cached_idle")
                else "")
        lines.append(f"KV blocks  GPU {kv.get('gpu_used')}/{kv.get('gpu_total')}{idle}{host} "
                     f"(blocks of {kv.get('block_size')} tokens)")
    stages = s.get("stages") or []
    if stages:
        lines.append("stages     " + "  ".join(f"{st['stage']}: {100 * st['busy']:.0f}% busy"
                                              for st in stages) + " (estimated)"
                     + (f"; driver {100 * s['driver_busy']:.0f}% busy"
                        if s.get("driver_busy") is not None else ""))
    return "\n".join(lines)
