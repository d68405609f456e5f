"""The offload timetable, the host extent allocator and the planner: pure, no processes."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from pipemax.block_manager import ExtentAllocator
from pipemax.model_config import builtin_config
from pipemax.placement import SWAPPED_PER_MB
from pipemax.planner import (DeviceFigures, PlanError, StageShape, Workload, plan,
                             prompt_seconds, run_tok_s, stage_step)
from pipemax.stages.timetable import Run, Timetable, _overlap, staging_for


# ---- staging_for ---------------------------------------------------------------------------
def test_staging_remaps_offloaded_rows_and_moves_only_what_is_needed():
    bs = 4
    q = np.array([1, 5, 1])
    ctx = np.array([9, 5, 3])
    # row 0 offloaded (host extent 100..103), row 1 offloaded (host 40..41), row 2 resident
    bt = np.array([[100, 101, 102, 103], [40, 41, 0, 0], [7, 0, 0, 0]])
    offl = np.array([True, True, False])
    st = staging_for(q, ctx, bt, offl, bs, resident_blocks=10, staging_blocks=6, buffer=1)
    base = 10 + 6
    assert st.table[0].tolist() == [base, base + 1, base + 2, 0]
    assert st.table[1].tolist() == [base + 3, base + 4, 0, 0]
    assert st.table[2].tolist() == [7, 0, 0, 0]
    # row 0 had 8 tokens before the step: blocks 0-1 come in; it writes token 8 into block 2
    # row 1 is a fresh prefill: nothing comes in, blocks 0-1 go out
    assert st.prefetch == [Run(100, base, 2)]
    assert st.offload == [Run(base + 2, 102, 1), Run(base + 3, 40, 2)]
    assert st.blocks_used == 5


def test_staging_refuses_more_than_the_buffer():
    with pytest.raises(ValueError, match="staging blocks"):
        staging_for(np.array([1]), np.array([20]), np.array([list(range(5))]),
                    np.array([True]), 4, 0, 4, 0)


def test_no_offloaded_rows_keeps_the_table():
    bt = np.array([[3, 4], [5, 0]])
    st = staging_for(np.array([1, 1]), np.array([5, 2]), bt, np.array([False, False]), 4, 8, 4, 0)
    assert (st.table == bt).all() and not st.prefetch and not st.offload


# ---- the timetable, checked by simulating random plans --------------------------------------
def simulate(mbs: list[int], overlap: bool, rng, tt: Timetable | None = None,
             ahead: bool = False) -> None:
    """Run a stage's sequence of steps through the timetable with random completion times and
    check: compute never runs on data not yet arrived; a prefetch never overwrites a buffer
    still in use; a prefetch reads the host copy only after the previous step of its
    micro-batch was offloaded. ``ahead``: prefetch the next step early even when
    ``prefetch_ready`` says no (to show that the check is needed)."""
    tt = tt or Timetable()
    done: dict[tuple[str, int], float] = {}
    now = 0.0

    def run(kind, k, waits):
        start = max([now] + [done[w] for w in waits if w in done])
        end = start + rng.uniform(0.1, 2.0)
        done[(kind, k)] = end
        return start, end

    buffer_busy_until = {0: 0.0, 1: 0.0}      # last offload end of a step that used it
    host_fresh_at: dict[int, float] = {}       # mb -> when its host copy is up to date
    prefetch_span = {}
    issued = set()
    for k, mb in enumerate(mbs):
        if k not in issued:
            tt.begin(k, mb)
            prefetch_span[k] = run("prefetch", k, tt.prefetch_waits(k))
        s, e = prefetch_span[k]
        assert s >= buffer_busy_until[k % 2], f"step {k} prefetched into a busy buffer"
        assert s >= host_fresh_at.get(mb, 0.0), f"step {k} read a stale host copy"
        # the next message is already here: its prefetch goes ahead of this step's compute
        if overlap and k + 1 < len(mbs) and (ahead or tt.prefetch_ready(k + 1, mbs[k + 1])):
            tt.begin(k + 1, mbs[k + 1])
            prefetch_span[k + 1] = run("prefetch", k + 1, tt.prefetch_waits(k + 1))
            issued.add(k + 1)
        cs, ce = run("compute", k, tt.compute_waits(k))
        assert cs >= e, f"step {k} computed before its data arrived"
        os_, oe = run("offload", k, tt.offload_waits(k))
        assert os_ >= ce
        tt.offloaded(k)
        buffer_busy_until[k % 2] = oe
        host_fresh_at[mb] = oe
        now = cs                               # the host moves on once compute is launched


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("seed", range(30))
def test_timetable_is_safe_on_random_plans(overlap, seed):
    rng = np.random.default_rng(seed)
    M = int(rng.integers(1, 6))
    # micro-batches come round-robin, with some missing (empty micro-batches are skipped)
    mbs = [m for _ in range(40) for m in range(M) if rng.random() > 0.2]
    simulate(mbs, overlap, rng)


class NoWaits(Timetable):
    def prefetch_waits(self, k):
        return []


class NoFreshness(Timetable):
    def prefetch_waits(self, k):
        return [("offload", k - 2)] if k >= 2 else []


@pytest.mark.parametrize("broken", [NoWaits, NoFreshness])
def test_simulation_catches_a_broken_timetable(broken):
    """The checker must be able to fail: drop a wait and some random plan breaks."""
    failures = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        M = 1 + seed % 3
        try:
            simulate([m for _ in range(30) for m in range(M)], True, rng, broken())
        except AssertionError:
            failures += 1
    assert failures > 0


def test_prefetch_ahead_needs_the_readiness_check():
    """Prefetching the next step before this one is offloaded is only safe for another
    micro-batch: without ``prefetch_ready`` a plan where a micro-batch follows itself reads a
    stale host copy."""
    rng = np.random.default_rng(0)
    with pytest.raises(AssertionError, match="stale host copy"):
        simulate([0] * 10, True, rng, ahead=True)
    simulate([0] * 10, True, rng)
    tt = Timetable()
    tt.begin(0, 0)
    assert not tt.prefetch_ready(1, 0) and tt.prefetch_ready(1, 1)
    assert not tt.prefetch_ready(3, 1)          # offload(1) not issued yet
    tt.offloaded(0)
    assert tt.prefetch_ready(1, 0)


# ---- the host extent allocator -------------------------------------------------------------
def test_extents_are_contiguous_and_merge_back():
    a = ExtentAllocator(10)
    x = a.alloc(4)
    y = a.alloc(3)
    z = a.alloc(3)
    assert (x, y, z) == (0, 4, 7) and a.alloc(1) is None
    a.free(y, 3)
    assert a.alloc(4) is None          # only 3 free in one piece
    a.free(x, 4)
    assert a.alloc(7) == 0             # 0..3 and 4..6 merged
    a.free(0, 7)
    a.free(z, 3)
    assert a.alloc(10) == 0 and a.num_free == 0


def test_extents_random_never_overlap():
    rng = np.random.default_rng(1)
    a = ExtentAllocator(200)
    live = {}
    for _ in range(3000):
        if live and rng.random() < 0.5:
            start = list(live)[int(rng.integers(len(live)))]
            a.free(start, live.pop(start))
        else:
            n = int(rng.integers(1, 30))
            s = a.alloc(n)
            if s is not None:
                for t, m in live.items():
                    assert s + n <= t or t + m <= s
                live[s] = n
        assert a.num_free == 200 - sum(live.values())


# ---- the planner -----------------------------------------------------------------------------
H200 = DeviceFigures(hbm_gbs=4300, h2d_gbs=46, tflops=780)


def shapes(name, stages, gpu_gb):
    """Stage shapes at a card's memory, as tools/plan.py estimates them (no reserve)."""
    from tools.plan import shapes as plan_shapes
    cfg = builtin_config(name)
    return cfg, plan_shapes(cfg, stages, gpu_gb, 2, 16, 0.0)


def test_stage_step_by_hand():
    cfg = builtin_config("llama3-8b")
    st = StageShape(32, 32 * cfg.layer_params(), 0, 0)
    figs = DeviceFigures(hbm_gbs=1000, h2d_gbs=10, tflops=100)
    B, ctx = 64, 1000
    t_w = 32 * cfg.layer_params() * 2 / 1e12
    t_f = 2 * 32 * cfg.layer_params() * B / 1e14
    t_a = B * ctx * 32 * (2 * 8 * 128 * 2) / 1e12
    step, t_p, bound = stage_step(st, cfg, B, ctx, 0, figs, 2)
    assert step == pytest.approx(max(t_w, t_f) + t_a) and t_p == 0
    assert bound == ("compute" if t_f > t_w else "hbm")
    step, t_p, bound = stage_step(st, cfg, B, ctx, 64, figs, 2)
    assert t_p == pytest.approx(64 * ctx * 32 * 4096 / 1e10) and bound == "pcie" and step == t_p


def test_whole_run_prediction_adds_each_prompt_by_hand():
    """llama3-8b on one stage at 790 TFLOP/s: a 512-token prompt is 2 * params * 512 flops;
    with 256 output tokens at a steady 10,000 tok/s the run makes 256 / (t_p + 0.0256) tok/s."""
    cfg = builtin_config("llama3-8b")
    st = [StageShape(32, 32 * cfg.layer_params(), 0, 0)]
    figs = DeviceFigures(hbm_gbs=3350, h2d_gbs=46, tflops=790)
    t_p = 2 * 32 * cfg.layer_params() * 512 / 790e12
    assert prompt_seconds(cfg, st, figs, 512) == pytest.approx(t_p)
    assert t_p == pytest.approx(0.0089, rel=0.05)             # 6.98e9 layer params
    assert run_tok_s(10_000, t_p, 256) == pytest.approx(256 / (t_p + 0.0256))
    halves = [StageShape(16, 16 * cfg.layer_params(), 0, 0)] * 2
    assert prompt_seconds(cfg, halves, figs, 512) == pytest.approx(t_p / 2)
    assert run_tok_s(0, t_p, 256) == 0


def test_auto_offloads_when_memory_caps_the_batch_and_pcie_keeps_up():
    cfg, st = shapes("llama3-70b", 8, 24)
    fast_link = DeviceFigures(hbm_gbs=1000, h2d_gbs=400, tflops=160)
    wl = Workload(512, 256, 768)
    p = plan(cfg, st, fast_link, 2, wl, mode="auto", micro_batches=9, max_seqs=8192,
             block_size=16, host_blocks=10**7)
    off = plan(cfg, st, fast_link, 2, wl, mode="off", micro_batches=9, max_seqs=8192,
               block_size=16, host_blocks=10**7)
    assert p.offload and p.predicted_tok_s > 1.5 * off.predicted_tok_s
    assert p.seqs_per_mb > off.seqs_per_mb
    assert p.resident_blocks + 2 * p.staging_blocks <= min(s.gpu_blocks for s in st)
    assert p.prefetch_ms <= p.predicted_step_ms + 1e-9


def test_auto_leaves_offload_off_when_pcie_cannot_keep_up():
    """Llama-2-13B on two H200s capped at 24 GB: one offloaded sequence's context (640 tokens,
    20 layers, 20 KB per token and layer) takes 5.7 ms over PCIe at 46 GB/s, more than a whole
    weight-bound step (4 ms): offload cannot win, and auto must see it."""
    cfg, st = shapes("llama2-13b", 2, 24)
    wl = Workload(512, 256, 768)
    p = plan(cfg, st, H200, 2, wl, mode="auto", micro_batches=3, max_seqs=4096, block_size=16,
             host_blocks=10**6)
    on = plan(cfg, st, H200, 2, wl, mode="on", micro_batches=3, max_seqs=4096, block_size=16,
              host_blocks=10**6)
    assert not p.offload and on.offload and on.bound == "pcie"
    assert on.predicted_tok_s < p.predicted_tok_s


def test_auto_leaves_offload_off_when_memory_is_plenty():
    cfg, st = shapes("llama3-8b", 1, 141)
    wl = Workload(128, 32, 160)                      # short: the GPU holds every sequence
    p = plan(cfg, st, H200, 2, wl, mode="auto", micro_batches=2, max_seqs=512, block_size=16,
             host_blocks=10**6)
    assert not p.offload and p.staging_blocks == 0


def test_plan_is_made_for_the_requests_that_fit():
    """With offload on, one sampled request longer than a staging buffer: plan for the others,
    and keep host blocks to run it streamed (one per micro-batch), and say so; with none
    left that fits the GPU, the error stays."""
    cfg, st = shapes("llama3-8b", 1, 24)
    G = min(s.gpu_blocks for s in st)
    kw = dict(mode="on", micro_batches=4, max_seqs=512, block_size=16, host_blocks=10**6)
    base = plan(cfg, st, H200, 2, Workload.of([(500, 200)] * 9), **kw)
    # longer than a staging buffer (half the GPU at most) and than the resident blocks
    too_long = max(G // 2, base.resident_blocks) * 16 + 100
    need = math.ceil((too_long + 10) / 16)
    wl = Workload.of([(500, 200)] * 9 + [(too_long, 10)])
    p = plan(cfg, st, H200, 2, wl, **kw)
    assert p.offload and p.streamed == 1 and p.too_long == 0
    assert p == dataclasses.replace(base, streamed=1, stream_blocks=4 * need,
                                    host_blocks=base.host_blocks + 4 * need)   # the pool
    # the offloaded ones' share, and room to swap 2 of the longest per micro-batch
    assert base.swap_blocks == SWAPPED_PER_MB * 4 * math.ceil(700 / 16) < base.resident_blocks
    assert 0 < base.host_blocks - base.swap_blocks <= 4 * base.staging_blocks
    assert "1 of the sampled requests are too long for the GPU" in p.describe()
    every = plan(cfg, st, H200, 2, Workload.of([(too_long, 10)] * 3), **kw)
    assert every.streamed == 3 and every.stream_blocks == 4 * need    # no request refused
    assert every.predicted_tok_s == 0      # and no prediction: none of them is in the batch
    with pytest.raises(PlanError, match="staging buffers"):           # the host too small
        plan(cfg, st, H200, 2, Workload.of([(too_long, 10)]), **{**kw, "host_blocks": 50})
    assert plan(cfg, st, H200, 2, Workload.of([(500, 200)] * 3), **kw).stream_blocks == 0
    # longer than a staging buffer but within the resident blocks: it runs resident, as the
    # scheduler places it (whole prompt's blocks at admission), and nothing is kept for it
    if base.resident_blocks > G // 2 + 10:
        mid = Workload.of([(500, 200)] * 9 + [((G // 2 + 5) * 16, 10)])
        assert plan(cfg, st, H200, 2, mid, **kw).stream_blocks == 0


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_a_request_longer_than_the_gpu_streams_unless_offload_is_off(mode):
    """A sampled request the GPU's blocks cannot hold at all: auto keeps the plan the others
    want (offload off here) plus host blocks to stream it; off, or a host pool too small for
    it, gives it an error line; the others' plan is the same in every case."""
    cfg, st = shapes("llama3-8b", 1, 24)
    G = min(s.gpu_blocks for s in st)
    too_long = G * 16 + 100
    need = math.ceil((too_long + 10) / 16)
    wl = Workload.of([(500, 200)] * 9 + [(too_long, 10)])
    kw = dict(mode=mode, micro_batches=2, max_seqs=512, block_size=16)
    p = plan(cfg, st, H200, 2, wl, **kw, host_blocks=10**6)
    base = plan(cfg, st, H200, 2, wl.within(G * 16), **kw, host_blocks=10**6)
    assert not p.offload and not base.offload
    if mode == "auto":
        # (and, the batch bound by the GPU's blocks, swap-only: host blocks for the preempted)
        assert base.swap_blocks == SWAPPED_PER_MB * 2 * math.ceil(700 / 16) == base.host_blocks
        assert p == dataclasses.replace(base, streamed=1, stream_blocks=2 * need,
                                        host_blocks=base.host_blocks + 2 * need)
    else:
        assert p == dataclasses.replace(base, too_long=1)
    small = plan(cfg, st, H200, 2, wl, **kw, host_blocks=need - 1)
    assert small.too_long == 1 and small.stream_blocks == 0
    assert small.host_blocks == small.swap_blocks == (base.swap_blocks if mode == "auto" else 0)
    assert "1 of the sampled requests are longer than it can hold" in small.describe()
    every = Workload.of([(too_long, 10)] * 2)
    if mode == "off":
        with pytest.raises(PlanError, match="too few for one sequence"):
            plan(cfg, st, H200, 2, every, **kw, host_blocks=10**6)
    else:
        assert plan(cfg, st, H200, 2, every, **kw, host_blocks=10**6).streamed == 2


def test_plan_errors_name_the_figures():
    cfg, st = shapes("llama2-13b", 1, 27)            # weights nearly fill the card
    wl = Workload(4000, 4000, 8000)
    with pytest.raises(PlanError, match="blocks"):
        plan(cfg, st, H200, 2, wl, mode="on", micro_batches=2, max_seqs=64, block_size=16,
             host_blocks=10)


def test_a_sequence_from_the_step_before_waits_for_its_offload():
    """A sequence that left step k-1's micro-batch (moved, or preempted with its extent
    kept) and is in step k: prefetch(k) reads host blocks offload(k-1) writes, so it waits
    for that offload; a step reading other blocks does not."""
    tt = Timetable()
    tt.begin(0, 0)
    tt.offloaded(0, [Run(src=50, dst=10, n=3), Run(src=53, dst=40, n=1)])
    tt.begin(1, 1)
    assert ("offload", 0) in tt.prefetch_waits(1, [Run(src=12, dst=60, n=1)])
    assert ("offload", 0) in tt.prefetch_waits(1, [Run(src=38, dst=60, n=4)])
    assert ("offload", 0) not in tt.prefetch_waits(1, [Run(src=13, dst=60, n=27)])
    assert ("offload", 0) not in tt.prefetch_waits(1, [Run(src=0, dst=60, n=10)])
    assert tt.prefetch_waits(1) == []


@pytest.mark.parametrize("seed", range(20))
def test_host_block_overlap_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(200, size=12, replace=False))
    writes = [Run(0, int(a), int(rng.integers(1, b - a + 1)))
              for a, b in zip(cuts[::2], cuts[1::2])]          # disjoint runs
    written = {w.dst + i for w in writes for i in range(w.n)}
    for _ in range(50):
        a, n = int(rng.integers(0, 200)), int(rng.integers(1, 8))
        r = [Run(a, 0, n)]
        assert _overlap(r, writes) == any(a + i in written for i in range(n))
