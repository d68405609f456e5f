"""pipemax/placement.py: the one rule for where a sequence's KV lives, and the planner and the
scheduler agreeing on it."""
from __future__ import annotations

import itertools
import math

import pytest

from pipemax.model_config import builtin_config
from pipemax.placement import (MAX_STREAMED_PER_MB, Admission, Placement, Room, offload_share,
                               place, stream_share)
from pipemax.planner import DeviceFigures, StageShape, Workload, plan
from pipemax.requests import Request, SamplingParams
from pipemax.scheduler import Scheduler, SchedulerConfig
from pipemax.sequence import Sequence

R, H, S = Placement.RESIDENT, Placement.HOST, Placement.STREAMED


def adm(extent, need=None, *, first=1, free=100, watermark=1, alone=False, staged=0,
        streamed=0):
    return Admission(extent, extent if need is None else need, first, free, watermark, alone,
                     staged, streamed)


def test_resident_when_the_gpu_has_room_for_its_prompt_and_can_hold_it_whole():
    room = Room(resident_blocks=20, staging_blocks=8, host_blocks=100)
    assert place(adm(5, free=20), room) is R
    assert place(adm(5, free=5), room) is H            # the watermark stays free...
    assert place(adm(5, free=5, alone=True), room) is R  # ...unless nothing else runs
    assert place(adm(5, free=4, alone=True), room) is H  # never more than is free
    assert place(adm(21, need=2, free=100), room) is S   # its whole length does not fit


def test_offloaded_when_its_first_chunk_and_one_more_block_fit_the_staging_buffer():
    room = Room(resident_blocks=0, staging_blocks=8, host_blocks=100)
    assert place(adm(8, first=7), room) is H
    assert place(adm(8, first=7, staged=1), room) is S   # buffer busy: 8 > 8 - 1 streams
    assert place(adm(7, first=7, staged=1), room) is None  # it fits the GPU: it waits
    assert place(adm(9, first=2), room) is S               # it could never finish staged
    assert place(adm(5), Room(0, 0, 100)) is S             # no staging at all


def test_streamed_only_when_the_gpu_can_never_hold_it_and_a_host_pool_exists():
    room = Room(resident_blocks=10, staging_blocks=6, host_blocks=100)
    assert room.fits_gpu(10) and not room.fits_gpu(11)
    assert Room(3, 6).fits_gpu(5) and not Room(3, 6).fits_gpu(6)
    assert place(adm(11, free=0), room) is S
    assert place(adm(11, free=0, streamed=MAX_STREAMED_PER_MB), room) is None
    assert place(adm(11, free=0), Room(10, 6, 0)) is None   # no host pool
    assert place(adm(10, free=0, first=9), room) is None    # fits the GPU: waits for room
    assert S.on_host and H.on_host and not R.on_host


def test_the_longest_sequence_and_the_host_pool_shares():
    assert Room(10, 4, 0).longest == 10 and Room(10, 4, 300).longest == 300
    assert offload_share(1000, 3, 40) == 120 and offload_share(100, 3, 40) == 100
    assert offload_share(1000, 3, 0) == 0
    # GPU holds <= 10 blocks; spare host 50: 11 and 50 stream (room for 50 in each of 2
    # micro-batches, within the spare 50), 51 is refused
    assert stream_share([3, 10, 11, 50, 51], Room(10, 6, 50), 2) == (2, 1, 50)
    assert stream_share([3, 11, 20], Room(10, 6, 1000), 3) == (2, 0, 3 * 20)
    assert stream_share([3, 11], Room(10, 6, 0), 3) == (0, 1, 0)
    assert stream_share([3, 10], Room(10, 6, 1000), 3) == (0, 0, 0)


def admitted(cfg: SchedulerConfig, prompt: int, max_tokens: int) -> Placement | None:
    """Where the scheduler puts one sequence alone (None: not admitted)."""
    sch = Scheduler(cfg)
    req = Request(0, "a", "completion", tuple(range(3, 3 + prompt)),
                  SamplingParams(max_tokens=max_tokens, temperature=0), False, None)
    s = Sequence(req, 0)
    sch.add(s)
    return s.placement if sch.schedule(0) is not None else None


@pytest.mark.parametrize("chunk", [8, 64])
@pytest.mark.parametrize("resident,staging,host", [(12, 0, 0), (12, 0, 40), (4, 9, 40),
                                                   (0, 8, 30), (9, 9, 20)])
def test_planner_rule_and_scheduler_admission_agree(resident, staging, host, chunk):
    """For every length, the planner's reading of the rule (held on the GPU, streamed from the
    host's spare blocks, or refused) is what the scheduler does with that sequence alone."""
    bs = 4
    cfg = SchedulerConfig(1, 4, chunk, bs, resident, staging, host)
    room = Room(resident, staging, host)
    for prompt, out in itertools.product(range(1, 45 * bs, 3), (1, 5)):
        extent = math.ceil((prompt + out) / bs)
        streamed, refused, _ = stream_share([extent], room, 1)
        got = admitted(cfg, prompt, out)
        if refused:                     # the engine refuses it before it is queued
            assert extent * bs > Scheduler(cfg).max_tokens_servable() and got is None
        elif streamed:                  # (at exactly a staging buffer it may still stage)
            assert got is S or got is H and extent == staging, (prompt, out, got)
        else:
            assert got in (R, H), (prompt, out, got)


def test_a_plans_streamed_requests_are_streamed_by_its_scheduler():
    """The plan (its blocks and host pool, as the run sets them up) and the scheduler built
    from it place the same sampled requests on the host: those the plan counts streamed are
    admitted streamed, the others on the GPU."""
    cfg = builtin_config("llama3-8b")
    st = [StageShape(32, 32 * cfg.layer_params(), 32 * 2 * 16 * cfg.kv_size * 2, 400)]
    figs = DeviceFigures(hbm_gbs=4300, h2d_gbs=46, tflops=780)
    # one longer than the GPU's 400 blocks, one that the resident blocks still hold
    samples = [(500, 200)] * 6 + [(400 * 16 + 50, 10), (300 * 16, 40)]
    for mode in ("auto", "on"):
        p = plan(cfg, st, figs, 2, Workload.of(samples), mode=mode, micro_batches=2,
                 max_seqs=64, block_size=16, host_blocks=10**5)
        assert p.streamed == 1 and p.offload == (mode == "on")
        assert p.host_blocks == (offload_share(10**5, 2, p.staging_blocks) + p.stream_blocks
                                 + p.swap_blocks)
        sched = SchedulerConfig(p.micro_batches, p.seqs_per_mb, 2048, 16, p.resident_blocks,
                                p.staging_blocks, p.host_blocks)
        places = [admitted(sched, a, b) for a, b in samples]
        assert sum(x is S for x in places) == p.streamed and None not in places
