"""A stage's inbox of the driver's copy plans: drained without waiting, stale plans dropped,
each plan handed out once, with the tensors the driver wrote."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipemax.ipc import protocol as P
from pipemax.stages.plan_inbox import PlanInbox


@pytest.fixture
def rings(ring_pair):
    return ring_pair("plan1", 1 << 20)


def plan(step: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(step)
    t = {"q_lens": torch.from_numpy(rng.integers(1, 9, 3).astype(np.int32)),
         "ctx_lens": torch.from_numpy(rng.integers(9, 99, 3).astype(np.int32)),
         "block_tables": torch.from_numpy(rng.integers(0, 50, (3, 7)).astype(np.int32)),
         "offloaded": torch.tensor([True, False, True]),
         "swap_out": torch.zeros((0, 2), dtype=torch.int32),
         "swap_in": torch.from_numpy(rng.integers(0, 50, (2, 2)).astype(np.int32)),
         "gpu_prefix": torch.tensor([0, 0, 2], dtype=torch.int32)}
    return {"op": P.OP_PLAN, "mb": step % 3, "step": step}, t


def test_a_plan_is_handed_out_once_and_stale_ones_are_dropped(rings):
    w, r = rings
    inbox = PlanInbox(r, lambda: True)
    assert inbox.take(4) is None                       # nothing sent yet: no wait
    for k in (3, 4, 5):
        w.write(*plan(k), timeout=1.0, alive=lambda: True)
    meta, t = inbox.take(4)
    assert meta["step"] == 4 and meta["mb"] == 1
    for key, v in plan(4)[1].items():
        assert torch.equal(t[key], v), key
    assert set(inbox.plans) == {5}                     # 3 was for a step already handled
    assert inbox.take(4) is None                       # once
    w.write(*plan(7), timeout=1.0, alive=lambda: True)
    assert inbox.take(6) is None                       # 6 carried no copies: never sent
    assert inbox.take(7)[0]["step"] == 7 and not inbox.plans


def test_a_message_that_is_not_a_plan_is_an_error(rings):
    w, r = rings
    w.write({"op": P.OP_STEP, "mb": 0, "step": 1}, None, timeout=1.0, alive=lambda: True)
    with pytest.raises(RuntimeError, match="unexpected op"):
        PlanInbox(r, lambda: True).take(1)
