"""The engine's control verbs without a model: cancel (waiting, running, in flight), pause,
drain; every request gets exactly one line, and the queue is left empty."""
from __future__ import annotations

import json
from collections import deque

import numpy as np

from pipemax.engine import Engine
from pipemax.requests import Parser
from pipemax.scheduler import Scheduler, SchedulerConfig

VOCAB = 64


class EchoPipeline:
    """Each step comes back with token 7 for every sampling row."""

    def __init__(self):
        self.sent = deque()

    def send_step(self, plan, step, sampling, num_top):
        self.sent.append(plan)

    def recv(self):
        plan = self.sent.popleft()
        n = len(plan.sample_rows)
        return {"mb": plan.mb}, {"token_ids": np.full(n, 7), "logprobs": np.zeros(n),
                                 "top_ids": np.zeros((n, 0), np.int64),
                                 "top_logprobs": np.zeros((n, 0))}


def engine(n: int, written: list) -> Engine:
    lines = [(i, json.dumps({"custom_id": f"r{i}", "prompt": [3, 4, 5], "max_tokens": 6,
                             "ignore_eos": True}).encode()) for i in range(n)]
    cfg = SchedulerConfig(num_micro_batches=2, max_seqs_per_mb=2, max_tokens_per_step=64,
                          block_size=4, num_blocks=64)
    return Engine(pipeline=EchoPipeline(), sched=Scheduler(cfg), tokenizer=None, eos_ids=(2,),
                  max_model_len=32, model_name="tiny", seed=0, write=written.append,
                  requests=Parser(None, max_model_len=32, vocab_size=VOCAB).parse_all(lines))


def codes(written: list) -> dict:
    out = {}
    for line in written:
        assert line["custom_id"] not in out, line["custom_id"]       # one line each
        out[line["custom_id"]] = (line["error"] or {}).get("code")
    return out


def test_cancel_waiting_running_and_in_flight():
    written = []
    e = engine(8, written)
    e.step()                      # intake, both micro-batches launched, one lands
    assert e.inflight and e.sched.waiting
    in_flight = next(s.req.custom_id for plan, _ in e.inflight.values() for s in plan.seqs)
    landed = next(s.req.custom_id for run in e.sched.running for s in run
                  if s.mb not in e.inflight)
    waiting = e.sched.waiting[-1].req.custom_id
    got = e.cancel([in_flight, landed, waiting, "nope"])
    assert got == {in_flight: "cancelling (running): dropped when its micro-batch lands",
                   landed: "cancelled (running)", waiting: "cancelled (waiting)",
                   "nope": "not found"}
    assert in_flight not in codes(written)              # not before its micro-batch lands
    while e.step():
        pass
    c = codes(written)
    assert set(c) == {f"r{i}" for i in range(8)}
    assert {k for k, v in c.items() if v == "cancelled"} == {in_flight, landed, waiting}
    assert all(v is None for k, v in c.items() if k not in (in_flight, landed, waiting))
    assert e.stats.requests_error == 3 and e.stats.requests_ok == 5
    assert not e.cancelling and not e.sched.has_work()


def test_pause_holds_and_drain_drops_the_waiting_queue():
    written = []
    e = engine(8, written)
    e.step()
    assert e.pause() == len(e.inflight)
    while e.inflight:             # what is in flight still lands; nothing new is launched
        e.step()
    assert e.held()
    done = len(written)
    e.step()
    assert len(written) == done and not e.inflight
    assert e.resume() and not e.resume()
    left = len(e.sched.waiting)
    assert e.drain() == left and not e.sched.waiting
    running = {s.req.custom_id for run in e.sched.running for s in run}
    while e.step():
        pass
    c = codes(written)
    assert running <= set(c) and all(v is None for v in c.values())
    assert len(c) == 8 - left     # the dropped ones have no line: a restart serves them


# ---- the admission order (pipemax/lookahead.py) ----------------------------------------------
def lengths_engine(max_tokens: list[int], written: list, policy: str) -> Engine:
    lines = [(i, json.dumps({"custom_id": f"r{i}", "prompt": [3, 4, 5], "max_tokens": m,
                             "ignore_eos": True}).encode()) for i, m in enumerate(max_tokens)]
    cfg = SchedulerConfig(num_micro_batches=2, max_seqs_per_mb=2, max_tokens_per_step=64,
                          block_size=4, num_blocks=64)
    return Engine(pipeline=EchoPipeline(), sched=Scheduler(cfg), tokenizer=None, eos_ids=(2,),
                  max_model_len=32, model_name="tiny", seed=0, write=written.append,
                  requests=Parser(None, max_model_len=32, vocab_size=VOCAB).parse_all(lines),
                  policy=policy)


def test_the_longest_requests_are_admitted_first():
    """Read ahead, the requests with the most tokens left to sample go first (ties in the
    input's order; max_tokens beyond the model's length count as that length), and every
    request still gets its line once; fcfs keeps the input's order."""
    mt = [2, 9, 4, 40, 9, 1, 6, 3, 5, 7, 2, 8]          # 40: beyond 32 - 3 prompt tokens
    for policy, order in (("longest", sorted(range(len(mt)), key=lambda i: (-min(mt[i], 29), i))),
                          ("fcfs", list(range(len(mt))))):
        written = []
        e = lengths_engine(mt, written, policy)
        admitted = []
        e.sched.add = lambda s, add=e.sched.add: (admitted.append(int(s.req.custom_id[1:])),
                                                  add(s))[1]
        e.intake()                # (the queue takes 8: twice the sequences that run)
        assert admitted == order[:8], policy
        # longest reads all 12 ahead (16 per sequence that runs); fcfs what the queue takes
        assert e.queue_sizes()["waiting"] == (len(mt) if policy == "longest" else 8)
        while e.step():
            pass
        assert admitted == order, policy
        assert set(codes(written)) == {f"r{i}" for i in range(len(mt))}
        assert e.stats.requests_ok == len(mt) and not e.has_work()


def test_drain_and_cancel_reach_the_requests_read_ahead():
    written = []
    e = lengths_engine([5] * 12, written, "longest")
    e.intake()
    assert len(e.sched.waiting) == 8 and len(e.ahead) == 4
    assert e.cancel(["r11"]) == {"r11": "cancelled (waiting)"}       # read, not yet queued
    assert codes(written) == {"r11": "cancelled"}
    assert e.drain() == 11 and not len(e.ahead) and not e.sched.waiting
    while e.step():
        pass
    assert codes(written) == {"r11": "cancelled"}        # the dropped ones: left for a restart


def test_the_look_ahead_stops_at_its_prompt_tokens(monkeypatch):
    """Past 9 prompt tokens held (3 prompts) nothing more is read ahead, but the queue is
    still filled (8: twice the sequences that run); without the bound all 20 are read."""
    import pipemax.engine as eng
    free = lengths_engine([5] * 20, [], "longest")
    free.intake()
    assert len(free.sched.waiting) == 8 and len(free.ahead) == 12
    monkeypatch.setattr(eng, "MAX_LOOKAHEAD_TOKENS", 9)
    written = []
    e = lengths_engine([5] * 20, written, "longest")
    e.intake()
    assert len(e.sched.waiting) == 8 and len(e.ahead) == 0
    while e.step():
        pass
    assert set(codes(written)) == {f"r{i}" for i in range(20)}
