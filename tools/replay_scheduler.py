"""Replay the scheduler alone on a workload: how many tokens it has the model compute.

    python -m tools.replay_scheduler --workload fixed:512/256+4x7900/100 --num-requests 128 \
        --micro-batches 2 --seqs-per-mb 9 --resident 672 --staging 48 --host 1048

No model and no device: every step "samples" a fixed token, so the figures are the scheduler's
alone. Tokens computed over tokens needed (prompt plus output, each once) shows the work lost
to preemptions (a preempted sequence is recomputed from its first token, unless it is
swapped to the host pool: with ``--staging`` and ``--host``), and with
``--prefix-caching`` the work saved by shared prefixes (the prompts are then the workload's
tokens, tools/workload.py). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json

from pipemax.requests import Request, SamplingParams
from pipemax.scheduler import Scheduler, SchedulerConfig
from pipemax.sequence import Sequence
from tools.workload import lengths, requests


def replay(cfg: SchedulerConfig, lens: list[tuple[int, int]], max_steps: int = 10**6,
           prompts: list[list[int]] | None = None) -> dict:
    """Run ``lens`` ((prompt, output) per request; the prompts' tokens ``prompts``, by
    default distinct) through a scheduler of ``cfg``."""
    sch = Scheduler(cfg)
    seqs = []
    for i, (p, o) in enumerate(lens):
        ids = tuple(prompts[i]) if prompts is not None else tuple(range(3 + i, 3 + i + p))
        r = Request(i, f"r{i}", "completion", ids,
                    SamplingParams(max_tokens=o, temperature=0, ignore_eos=True), False, None)
        seqs.append(Sequence(r, i))
        sch.add(seqs[-1])
    steps = computed = 0
    while sch.has_work() and steps < max_steps:
        for mb in range(cfg.num_micro_batches):
            plan = sch.schedule(mb)
            if plan is None:
                continue
            steps += 1
            computed += int(plan.q_lens.sum())
            for s in sch.complete(plan, [7] * len(plan.sample_rows)):
                if s.num_output >= s.params.max_tokens:
                    sch.finish(s)
    return {"steps": steps, "finished": not sch.has_work(), "tokens_computed": computed,
            "tokens_needed": sum(p + o - 1 for p, o in lens),
            "prompt_tokens_cached": sum(s.num_cached for s in seqs),
            "preemptions": sch.num_preemptions, "offloaded": sch.num_offloaded_admitted,
            "streamed": sch.num_streamed_admitted, "swapped_out": sch.num_swapped_out,
            "tokens_recomputed": sch.tokens_recomputed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="fixed:512/256")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--seqs-per-mb", type=int, default=8)
    p.add_argument("--max-tokens-per-step", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--resident", type=int, required=True, help="GPU-resident blocks")
    p.add_argument("--staging", type=int, default=0, help="blocks per staging buffer")
    p.add_argument("--host", type=int, default=0, help="host pool blocks")
    p.add_argument("--prefix-caching", action="store_true")
    a = p.parse_args(argv)
    cfg = SchedulerConfig(a.micro_batches, a.seqs_per_mb, a.max_tokens_per_step, a.block_size,
                          a.resident, a.staging, a.host, prefix_caching=a.prefix_caching)
    prompts = ([r["body"]["prompt"] for r in requests(a.workload, a.num_requests, 32000,
                                                      max_len=1 << 20)]
               if a.prefix_caching else None)
    print(json.dumps(replay(cfg, lengths(a.workload, a.num_requests, 0, 1 << 20),
                            prompts=prompts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
