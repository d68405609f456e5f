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
