"""The CPU-resident selection (pipemax/selection.py): its limits on random running sets, and
that it chooses what the paper says (cheapest first, balanced micro-batches)."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from pipemax.selection import Budget, Candidate, StepModel, micro_batch_loads, select, step_seconds

MODEL = StepModel(fixed=1.0, per_seq=0.01, per_token=0.001, per_host_token=0.01)


def budget(**kw) -> Budget:
    base = dict(model=MODEL, block_size=4, gpu_room=200, staging_blocks=60, max_seqs=8,
                num_micro_batches=3)
    return Budget(**{**base, **kw})


cand_lists = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 150), st.booleans(),
                                st.booleans()), min_size=1, max_size=18)


@settings(max_examples=300, deadline=None)
@given(cand_lists, st.integers(0, 300), st.integers(0, 80), st.integers(0, 50),
       st.integers(0, 6))
def test_limits_hold_and_never_worse_than_first_come(raw, room, staging, short, overhead):
    cands = [Candidate(i, mb, ctx, host, movable) for i, (mb, ctx, host, movable)
             in enumerate(raw)]
    b = budget(gpu_room=room, staging_blocks=staging, short=short, overhead_tokens=overhead)
    first = {c.key: (c.mb, c.on_host) for c in cands}
    where = select(cands, b)
    assert sorted(where) == sorted(first), "a sequence lost or made up"
    for c in cands:
        if not c.movable:
            assert where[c.key] == first[c.key]
    before, after = micro_batch_loads(cands, first, b), micro_batch_loads(cands, where, b)
    limit = b.prefetch_tokens(before)
    for mb, (x, y) in enumerate(zip(before, after)):
        went_up = any(where[c.key] == (mb, True) and first[c.key] != (mb, True) for c in cands)
        if went_up:      # something moved to this micro-batch's host set: within its budget
            assert y.host_cost <= limit + 1e-9 and y.host_blocks <= staging
        assert y.n <= max(x.n, b.max_seqs)
    gpu = lambda w: sum(b.blocks(c.ctx) for c in cands if c.movable and not w[c.key][1])
    assert gpu(where) <= max(room, gpu(first)), "resident blocks beyond the GPU's room"
    assert max(step_seconds(cands, where, b)) <= max(step_seconds(cands, first, b)) + 1e-12


def test_over_budget_the_longest_comes_back_to_the_gpu():
    # one micro-batch: prefetch budget = compute / per_host_token; 3 host sequences too many
    cands = [Candidate(0, 0, 100, True), Candidate(1, 0, 20, True), Candidate(2, 0, 24, True),
             Candidate(3, 0, 40, False)]
    b = budget(num_micro_batches=1, gpu_room=1000)
    limit = b.prefetch_tokens(micro_batch_loads(cands, {c.key: (0, c.on_host) for c in cands}, b))
    assert b.cost(100) + b.cost(20) + b.cost(24) > limit >= b.cost(20) + b.cost(24)
    where = select(cands, b)
    assert where[0] == (0, False) and where[1] == (0, True) and where[2] == (0, True)


def test_short_of_gpu_blocks_the_cheapest_go_to_the_host():
    cands = [Candidate(i, 0, ctx, False) for i, ctx in enumerate([90, 10, 60, 14, 30])]
    b = budget(num_micro_batches=1, short=5, staging_blocks=1000)
    where = select(cands, b)
    host = sorted(c.ctx for c in cands if where[c.key][1])
    assert host and host == sorted(c.ctx for c in cands)[:len(host)], "cheapest first"
    loads = micro_batch_loads(cands, where, b)
    assert loads[0].host_cost <= b.prefetch_tokens(loads)
    # one more would not fit the budget
    nxt = sorted(c.ctx for c in cands)[len(host)] if len(host) < len(cands) else None
    assert nxt is None or loads[0].host_cost + b.cost(nxt) > b.prefetch_tokens(loads)
    assert select(cands, budget(num_micro_batches=1, short=0)) == {c.key: (0, False)
                                                                  for c in cands}


def test_refinement_balances_the_micro_batches():
    # all six in micro-batch 0, micro-batch 1 empty but for one fixed sequence
    cands = [Candidate(i, 0, 200, False) for i in range(6)] + [Candidate(9, 1, 10, False,
                                                                         movable=False)]
    b = budget(num_micro_batches=2)
    where = select(cands, b)
    counts = [sum(where[c.key][0] == m for c in cands) for m in (0, 1)]
    assert counts in ([4, 3], [3, 4])
    assert max(step_seconds(cands, where, b)) < max(
        step_seconds(cands, {c.key: (c.mb, c.on_host) for c in cands}, b))


# ---- carried out by the scheduler, against a model of the KV memory (tests/test_swap.py) ----
def test_the_scheduler_moves_sequences_and_keeps_every_context():
    """Selection on: running sequences go to the host and back and change micro-batches;
    every step's copies (in the stages' order) leave every context holding its own tokens,
    no block is given twice, none leaks, and every sequence finishes."""
    import numpy as np

    from test_swap import drive
    from pipemax.scheduler import SchedulerConfig

    got = {"to_host": 0, "to_gpu": 0, "moved": 0}
    for seed in range(6):
        cfg = SchedulerConfig(3, 4, 16, 4, 30, staging_blocks=14, host_blocks=160,
                              offload_policy="selection",
                              step_model=StepModel(1e-3, 1e-5, 2e-6, 2e-5))
        sch = drive(cfg, np.random.default_rng(seed))
        got["to_host"] += sch.num_to_host
        got["to_gpu"] += sch.num_to_gpu
        got["moved"] += sch.num_moved
    assert all(got.values()), got


# ---- no churn ---------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(cand_lists, st.integers(0, 300), st.integers(0, 80), st.integers(0, 50))
def test_no_churn_repeated_calls_settle_and_moves_are_bounded(raw, room, staging, short):
    """Called again and again on the choice it made (nothing grows, nothing finishes), the
    selection moves at most MAX_MOVES sequences a call and settles: within a few calls a call
    moves nothing, and the next one neither (no back and forth). Recently moved sequences
    stay put, even when the GPU is short."""
    from pipemax.selection import MAX_MOVES

    cands = [Candidate(i, mb, ctx, host, movable) for i, (mb, ctx, host, movable)
             in enumerate(raw)]
    b = budget(gpu_room=room, staging_blocks=staging, short=0)
    calls = 0
    while True:
        where = select(cands, b)
        n = sum(where[c.key] != (c.mb, c.on_host) for c in cands)
        assert n <= MAX_MOVES
        if n == 0:
            break
        calls += 1
        assert calls <= 2 + len(cands) // MAX_MOVES, "the selection does not settle"
        cands = [Candidate(c.key, where[c.key][0], c.ctx, where[c.key][1], c.movable)
                 for c in cands]
    assert select(cands, b) == where
    settled = [Candidate(c.key, c.mb, c.ctx, c.on_host, c.movable, recent=True) for c in cands]
    assert select(settled, budget(gpu_room=room, staging_blocks=staging, short=short)) == {
        c.key: (c.mb, c.on_host) for c in cands}


def test_a_host_sequence_a_little_over_budget_stays_on_the_host():
    # one micro-batch: a host sequence whose cost is just past the budget (by less than
    # HYSTERESIS) stays; well past it, it comes back to the GPU
    from pipemax.selection import HYSTERESIS

    def case(ctx_host):
        cands = [Candidate(0, 0, ctx_host, True), Candidate(1, 0, 40, False)]
        b = budget(num_micro_batches=1, gpu_room=1000, staging_blocks=1000)
        limit = b.prefetch_tokens(micro_batch_loads(cands, {c.key: (0, c.on_host) for c in cands}, b))
        return b.cost(ctx_host) / limit, select(cands, b)[0]

    over, where = case(116)
    assert 1 < over < 1 + HYSTERESIS and where == (0, True)
    over, where = case(124)
    assert over > 1 + HYSTERESIS and where == (0, False)
