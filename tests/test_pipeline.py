"""The driver's view of the stage processes: which death a failed run names."""
import multiprocessing as mp
import os
import signal
import time

import pytest

from pipemax.config import RunConfig
from pipemax.ipc import protocol as P
from pipemax.model_config import ModelConfig
from pipemax.pipeline import PEER_GRACE_S, Pipeline, StageFailed


def _exit(code: int, after_s: float) -> None:
    time.sleep(after_s)
    if code < 0:
        os.kill(os.getpid(), -code)
    os._exit(code)


def _pipeline(exits: list[tuple[int, float] | None]) -> Pipeline:
    """A driver whose stage processes exit with (code, after seconds), or live (None)."""
    model = ModelConfig(name="m", architecture="llama", vocab_size=64, hidden_size=32,
                        intermediate_size=64, num_layers=len(exits), num_heads=4,
                        num_kv_heads=4, head_dim=8)
    pipe = Pipeline(RunConfig(gpus=len(exits)), model, "test", 64)
    ctx = mp.get_context("fork")
    for e in exits:
        code, after = e if e is not None else (0, 60.0)
        p = ctx.Process(target=_exit, args=(code, after), daemon=True)
        p.start()
        pipe.procs.append(p)
    return pipe


def _failure(pipe: Pipeline) -> str:
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pipe.check()
            time.sleep(0.01)
        raise AssertionError("no stage death noticed within 10 s")
    except StageFailed as e:
        return str(e)
    finally:
        for p in pipe.procs:
            p.kill()
            p.join(5)


def test_the_stage_killed_is_named_not_the_one_that_left_after_it():
    # stage 2 leaves at once because its neighbour went away; stage 1's death (the cause)
    # is reaped only later: the error names stage 1
    pipe = _pipeline([None, (-signal.SIGKILL, 0.5), (P.EXIT_PEER_GONE, 0.0)])
    msg = _failure(pipe)
    assert msg.startswith("stage 1 ") and "exited with code -9 (killed by a signal)" in msg, msg


def test_a_stage_that_left_alone_is_named_after_the_grace():
    pipe = _pipeline([None, (P.EXIT_PEER_GONE, 0.0)])
    t0 = time.monotonic()
    msg = _failure(pipe)
    assert msg.startswith("stage 1 ") and f"exited with code {P.EXIT_PEER_GONE}" in msg, msg
    assert time.monotonic() - t0 >= PEER_GRACE_S * 0.9


def test_a_stage_that_failed_is_named_at_once():
    pipe = _pipeline([(1, 0.0), None])
    t0 = time.monotonic()
    msg = _failure(pipe)
    assert msg.startswith("stage 0 ") and "exited with code 1" in msg, msg
    assert time.monotonic() - t0 < PEER_GRACE_S
