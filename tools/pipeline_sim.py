"""A discrete-event pipeline of N stages: when each micro-batch step starts and ends on each.

Pure arithmetic, no scheduler and no cost model (tools/simulate.py brings both). A step is
given as one ``StageWork`` per stage. Stages take steps in the order they were submitted (the
rings are FIFO). On each stage, the host side and the GPU side of step k are followed as
stages/worker.py runs them:

    launch(k)   the host launches step k when its message is there (stage s-1 finished it,
                plus the hand-off; stage 0: submitted) and it has handed on step k-2's
                outputs; if the message was not there by then, it first waits for step k-1's
                outputs, so it launches at max(message, end of k-1); with ``early`` (a stage
                that offloads, with the copies overlapped) it waits for the message while
                step k-1 computes and launches at max(message, end of k-2)
    issue(k)    its prefetch (host -> GPU copy of its offloaded KV, on the stage's copy
                stream) is issued ahead, at launch(k-1), if step k was known by then: its
                message already there, or, with ``plans`` (the driver's copy plans,
                ``--prefetch-plans``), sent by the driver, whose plan reaches every stage at
                once; else at launch(k)
    copy(k)     starts at issue(k) once the copy stream is free and staging buffer k % 2 is
                free again (the offload of step k-2 has finished)
    start(k)    the GPU computes step k once launched, the stage is free (step k-1 ended) and
                its prefetch has landed

and then occupies the stage for ``compute_s + streamed_s`` (a streamed sequence's attention
reads the host pool in place: part of the compute). Its offload (GPU -> host, the KV the step
wrote) runs on a second copy stream after the compute. So a prefetch hides under the previous
step when it was issued in time and stalls this one when it takes longer; a stage idles (a
bubble) when no step is there for it. Every stage's time splits into busy, bubble and stall.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageWork:
    compute_s: float
    prefetch_s: float = 0.0     # host -> GPU before the compute (overlaps the previous step)
    offload_s: float = 0.0      # GPU -> host after it
    streamed_s: float = 0.0     # host pool read in place during the compute
    handoff_s: float = 0.0      # to the next stage (the last: to the driver)


@dataclass
class StageClock:
    free: float = 0.0           # its last step's compute ended
    h2d_free: float = 0.0       # its prefetch stream is free
    d2h_free: float = 0.0
    offload_ends: list[float] = field(default_factory=lambda: [0.0, 0.0])  # steps k-2, k-1
    ends: list[float] = field(default_factory=lambda: [0.0, 0.0])  # compute, steps k-2, k-1
    launch: float = 0.0         # the host launched its last step
    steps: int = 0
    busy_s: float = 0.0
    bubble_s: float = 0.0       # idle, no step there
    stall_s: float = 0.0        # a step there, waiting for its prefetch
    h2d_s: float = 0.0          # prefetch and streamed reads
    d2h_s: float = 0.0


class PipelineSim:
    def __init__(self, num_stages: int, plans: bool = True, early: bool = False):
        if num_stages < 1:
            raise ValueError("a pipeline has at least one stage")
        self.plans = plans           # every stage knows a step when it is submitted
        self.early = early           # a message is taken while the step before it computes
        self.stages = [StageClock() for _ in range(num_stages)]
        self.end = 0.0               # the last result back at the driver

    def submit(self, t: float, work: list[StageWork]) -> float:
        """Step entering stage 0 at ``t``; returns when its result reaches the driver."""
        if len(work) != len(self.stages):
            raise ValueError(f"{len(work)} stage works for {len(self.stages)} stages")
        arrive = t
        for st, w in zip(self.stages, work):
            launch = (st.ends[0] if arrive <= st.ends[0] else arrive if self.early
                      else max(arrive, st.ends[1]))
            known = t if self.plans else arrive
            issue = st.launch if st.steps and known <= st.launch else launch
            copied = launch
            if w.prefetch_s > 0:
                copied = max(issue, st.h2d_free, st.offload_ends[0]) + w.prefetch_s
                st.h2d_free = copied
            start = max(launch, st.free, copied)
            st.launch = launch
            st.bubble_s += max(0.0, min(arrive, start) - st.free)
            st.stall_s += max(0.0, start - max(arrive, st.free))
            end = start + w.compute_s + w.streamed_s
            st.busy_s += end - start
            st.h2d_s += w.prefetch_s + w.streamed_s
            st.free = end
            st.ends = [st.ends[1], end]
            off_end = end
            if w.offload_s > 0:
                off_end = max(end, st.d2h_free) + w.offload_s
                st.d2h_free = off_end
                st.d2h_s += w.offload_s
            st.offload_ends = [st.offload_ends[1], off_end]
            st.steps += 1
            arrive = end + w.handoff_s
        self.end = max(self.end, arrive)
        return arrive

    def shares(self, span: float | None = None) -> list[dict]:
        """Per stage, the shares of ``span`` (default: up to the last result) spent busy, in
        bubbles (the drain after its last step included) and stalled on a prefetch, and the
        share of it each PCIe direction was moving data."""
        span = self.end if span is None else span
        if span <= 0:
            return [{"busy": 0.0, "bubble": 0.0, "stall": 0.0, "h2d": 0.0, "d2h": 0.0}
                    for _ in self.stages]
        return [{"busy": st.busy_s / span,
                 "bubble": (st.bubble_s + max(0.0, span - st.free)) / span,
                 "stall": st.stall_s / span, "h2d": st.h2d_s / span, "d2h": st.d2h_s / span}
                for st in self.stages]
