"""Host <-> device copies of a step's inputs and outputs (stages/transfer.py), on the CPU, and
taking the next step's message while one computes."""
import threading
import time

import numpy as np
import pytest
import torch

from pipemax.stages.transfer import Outbound, host_copy, staged, take, take_while, to_device


def test_inputs_reach_the_device_with_their_values():
    a = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]       # not contiguous
    t = to_device(a, torch.device("cpu"))
    assert t.tolist() == a.tolist()
    assert staged(t, torch.device("cpu")) is t


def test_host_copy_outlives_its_source():
    src = torch.arange(6, dtype=torch.float32)
    c = host_copy(src, pin=False)
    src.zero_()
    assert c.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_outbound_gives_the_step_outputs():
    meta = {"op": 1, "mb": 2}
    ids = torch.tensor([5, 7])
    m, t = Outbound(meta, {"token_ids": ids}).ready()
    assert m == meta and t["token_ids"].tolist() == [5, 7]


def test_an_outbound_on_the_cpu_is_done_at_once():
    assert Outbound({"op": 1}, {"token_ids": torch.tensor([1])}).done()


@pytest.fixture
def ring(ring_pair):
    return ring_pair("early", 1 << 16)


def test_the_next_step_is_taken_while_one_computes(ring):
    """take_while: a message written while the step in flight is busy is returned as soon as
    it is there (no waiting for the step to end); its tensors outlive the ring slot."""
    w, r = ring
    polls = []

    def busy():                       # the step in flight never ends by itself here
        polls.append(time.monotonic())
        return len(polls) < 10_000
    writer = threading.Timer(0.05, lambda: w.write({"op": 1, "step": 7},
                                                   {"x": torch.arange(3)}))
    writer.start()
    t0 = time.monotonic()
    got = take_while(r, lambda: True, False, busy, 2e-4)
    writer.join()
    assert got is not None and got[0]["step"] == 7 and got[1]["x"].tolist() == [0, 1, 2]
    assert 0.04 < time.monotonic() - t0 < 2.0
    assert len(polls) < 10_000 and len(polls) > 2       # waited in slices, stopped on arrival


def test_nothing_is_taken_once_the_step_has_ended(ring):
    """No message: take_while returns None when the step in flight ends, after waiting in
    bounded slices (each poll at least a slice apart: no spinning), and leaves the ring's
    next message for the blocking read."""
    w, r = ring
    polls = []

    def busy():
        polls.append(time.monotonic())
        return len(polls) <= 5
    assert take_while(r, lambda: True, False, busy, 0.01) is None
    assert len(polls) == 6
    assert all(b - a >= 0.009 for a, b in zip(polls, polls[1:]))
    w.write({"op": 1, "step": 8}, None)
    assert take(r, lambda: True, 1.0, False)[0]["step"] == 8
