"""Host <-> device copies of a step's inputs and outputs (stages/transfer.py), on the CPU."""
import numpy as np
import torch

from pipemax.stages.transfer import Outbound, host_copy, staged, to_device


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
