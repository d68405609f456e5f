"""Prefix caching: shared blocks are reference-counted, never written while shared, and freed
(left cached, idle) exactly when the last holder lets go; through the CLI, the same tokens as
transformers and as caching off, at 1-3 stages, with offload and with preemption forced."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipemax.block_manager import BlockManager
from pipemax.prefix_cache import (HostTier, PrefixCache, cached_tokens, extend_keys,
                                   shareable_blocks)
from pipemax.requests import Request, SamplingParams
from pipemax.scheduler import Scheduler, SchedulerConfig
from pipemax.sequence import Sequence
from pipemax.stages.timetable import staging_for


# ---- keys and the cache ---------------------------------------------------------------------
def test_a_key_names_the_whole_prefix():
    a = extend_keys([], [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = extend_keys([], [1, 2, 3, 4, 5, 6, 7, 0], 4)
    c = extend_keys([], [9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]   # the first difference splits them
    assert c[1] != a[1]                                    # same tokens, other parent
    assert extend_keys(a[:1], [1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == a   # extends in place
    assert shareable_blocks(8, 4) == 1 and shareable_blocks(9, 4) == 2   # last token computed


def test_lru_eviction_and_reuse():
    bm = BlockManager(4, 2, prefix_caching=True)
    x, y = [], []
    assert bm.grow(x, 4) and bm.grow(y, 4)        # two blocks each, all four taken
    keys = extend_keys([], [1, 2, 3, 4], 2)
    bm.register(keys[0], x[0])
    bm.register(keys[1], x[1])
    held = list(x)
    bm.release(x)
    assert bm.num_free == 2 and bm.num_idle_cached == 2
    assert bm.match(keys) == held                 # still cached while idle
    z = []
    bm.share(z, bm.match(keys[:1]))               # one taken back: no longer idle
    assert bm.num_idle_cached == 1 and bm.refs[held[0]] == 1
    w = []
    assert bm.grow(w, 2) and w == [held[1]]       # no free block: the idle one is evicted
    assert bm.match(keys) == [held[0]]            # ... and forgotten
    assert not bm.grow([], 2)                     # nothing left
    for b in (y, z, w):
        bm.release(b)
    assert bm.num_free == 4 and bm.refs == [0] * 4


def test_only_blocks_that_were_hits_are_kept_for_the_host_tier():
    """An evicted block goes to the second tier only if a later sequence mapped it while it
    was cached (a shared prefix); a block only its own sequence used (a unique part) does not."""
    bm = BlockManager(2, 2, prefix_caching=True, keep_evicted=True)
    x = []
    assert bm.grow(x, 4)
    ka = extend_keys([], [1, 2, 3, 4], 2)
    bm.register(ka[0], x[0])
    bm.register(ka[1], x[1])
    shared, unique = x
    z = []
    bm.share(z, bm.match(ka[:1]))             # a hit on the first block only
    bm.release(z)
    bm.release(x)                             # both idle; LRU: shared first, then unique
    assert bm.grow([], 4) and bm.match(ka) == []
    assert bm.evicted == [(shared, ka[0])]    # the unique block was evicted, not kept
    # a block id cached again under a new key starts as never hit
    bm2 = BlockManager(1, 2, prefix_caching=True, keep_evicted=True)
    y = []
    assert bm2.grow(y, 2)
    (block,) = y
    kb = extend_keys([], [5, 6], 2)
    bm2.register(kb[0], block)
    w = []
    bm2.share(w, bm2.match(kb))               # a hit
    bm2.release(w)
    bm2.release(y)
    assert bm2.grow(y, 2) and y == [block] and bm2.evicted == [(block, kb[0])]
    bm2.evicted.clear()
    kc = extend_keys([], [7, 8], 2)
    bm2.register(kc[0], block)                # the same block, new tokens, no hit yet
    bm2.release(y)
    assert bm2.grow([], 2) and bm2.evicted == []


def test_a_key_cached_twice_keeps_the_first_block():
    c = PrefixCache()
    assert c.insert(b"k", 3) and not c.insert(b"k", 5) and c.lookup([b"k", b"j"]) == [3]


def test_host_tier_room_pins_and_lru():
    """Random puts, pins and unpins: never more keys than slots, one key per slot, a pinned
    slot is never handed to another key, the least recently used unpinned slot goes first."""
    rng = np.random.default_rng(0)
    t = HostTier(100, 5)
    pinned: dict[int, bytes] = {}
    for _ in range(2000):
        op = rng.integers(3)
        if op == 0:
            key = bytes([int(rng.integers(12))])
            lru_first = next(iter(t.lru), None)
            had = key in t.slot_of
            slot = t.put(key)
            if slot is not None:
                assert not had and 100 <= slot < 105 and t.slot_of[key] == slot
                if len(t) == 5 and lru_first is not None and lru_first == slot:
                    pass                                  # reused the LRU one
            else:
                assert had or not t.lru and len(t) == 5
        elif op == 1 and len(t):
            slot = int(rng.choice(list(t.key_of)))
            t.pin(slot)
            pinned.setdefault(slot, t.key_of[slot])
        elif op == 2 and t.pins:
            slot = int(rng.choice(list(t.pins)))
            t.unpin(slot)
            if slot not in t.pins:
                del pinned[slot]
        assert len(t) <= 5 and len(t.slot_of) == len(t.key_of)
        assert all(t.slot_of[k] == sl for sl, k in t.key_of.items())
        assert all(t.key_of.get(sl) == k for sl, k in pinned.items())   # pinned: kept
        assert set(t.lru).isdisjoint(t.pins) and set(t.lru) | set(t.pins) == set(t.key_of)
        assert len(t._free) + len(t) == 5
    t2 = HostTier(0, 2)
    a, b = t2.put(b"a"), t2.put(b"b")
    t2.touch(a)                                   # b is now the least recently used
    assert t2.put(b"c") == b and t2.lookup([b"a", b"c", b"b"]) == [a, b]


def test_staging_keeps_an_offloaded_rows_gpu_prefix():
    bs = 4
    # row 0: 2 cached GPU blocks (5, 6), then its host extent 100..; 13 tokens, 1 new
    bt = np.array([[5, 6, 100, 101, 102]])
    st = staging_for(np.array([1]), np.array([13]), bt, np.array([True]), bs, 10, 6, 0,
                     np.array([2]))
    assert st.table[0].tolist() == [5, 6, 10, 11, 0]
    assert [(r.src, r.dst, r.n) for r in st.prefetch] == [(100, 10, 1)]
    assert [(r.src, r.dst, r.n) for r in st.offload] == [(11, 101, 1)]
    assert st.blocks_used == 2
    with pytest.raises(ValueError, match="GPU prefix"):     # a write into the prefix
        staging_for(np.array([6]), np.array([13]), bt, np.array([True]), bs, 10, 6, 0,
                    np.array([2]))


def test_cached_tokens_counts_what_sharers_reuse():
    p = list(range(100, 120))
    prompts = [p + [i, i + 1, i + 2] for i in range(5)]
    hit, shared = cached_tokens(prompts, 4)
    assert shared == 5 and hit == 4 * 5 * 4       # 4 sharers x 5 blocks of 4 tokens


# ---- the scheduler, randomized ----------------------------------------------------------------
def req(i, prompt, max_tokens):
    return Request(i, f"r{i}", "completion", tuple(prompt),
                   SamplingParams(max_tokens=max_tokens, temperature=0), False, None)


def shared_seqs(rng, n, prefixes=3, bs=4):
    heads = [rng.integers(3, 50, size=int(rng.integers(bs, 6 * bs))).tolist()
             for _ in range(prefixes)]
    out = []
    for i in range(n):
        head = heads[int(rng.integers(prefixes))]
        tail = rng.integers(3, 50, size=int(rng.integers(0, 10))).tolist()
        out.append(Sequence(req(i, head + tail or [5], int(rng.integers(1, 12))), i))
    return out


def check(sch: Scheduler):
    """Every GPU block's count is the number of running sequences that hold it (resident
    ones, and offloaded ones' cached prefix); idle cached blocks and free blocks are disjoint
    from held ones; the host tier's slots lie after the extents, one key each, within its
    room, pinned exactly while a step reading them is out."""
    bm = sch.blocks
    held: dict[int, int] = {}
    for run in sch.running:
        for s in run:
            for b in (s.blocks[:s.gpu_prefix] if s.placement.on_host else s.blocks):
                held[b] = held.get(b, 0) + 1
            if s.placement.on_host:
                assert all(b < sch.cfg.host_blocks for b in s.blocks[s.gpu_prefix:])
    assert all(bm.refs[b] == c for b, c in held.items())
    assert all(bm.refs[b] == 0 for b in range(bm.num_blocks) if b not in held)
    idle = set(bm.cache.idle)
    free = set(bm._free)
    assert not idle & free and not idle & held.keys() and not free & held.keys()
    assert len(idle) + len(free) + len(held) == bm.num_blocks
    assert all(b in bm.cache.key_of for b in idle)
    assert len(set(bm.cache.block_of.values())) == len(bm.cache.block_of)   # a key per block
    t = sch.tier
    if t is not None:
        assert len(t) <= t.num_slots and len(set(t.slot_of.values())) == len(t)
        assert all(sch.cfg.host_blocks <= x < sch.cfg.host_blocks + t.num_slots
                   for x in t.key_of)
        pins: dict[int, int] = {}
        for xs in sch._unpin_after:
            for x in xs:
                pins[x] = pins.get(x, 0) + 1
        assert pins == t.pins


class KVModel:
    """What the GPU and host blocks hold, token by token, as the stages would: a step's swap
    copies out, then in, then the staging prefetch, then its writes (every row's reads
    checked against its tokens), then the staging offload."""

    def __init__(self, sch: Scheduler):
        self.sch, self.bs = sch, sch.cfg.block_size
        self.gpu: dict[int, list] = {}
        self.host: dict[int, list] = {}
        self.k = 0

    def step(self, plan):
        cfg, bs = self.sch.cfg, self.bs
        cp = lambda a, x: list(a.get(x, [None] * bs))
        for g, h in plan.swap_out:
            self.host[int(h)] = cp(self.gpu, int(g))
        for h, g in plan.swap_in:
            self.gpu[int(g)] = cp(self.host, int(h))
        st = staging_for(plan.q_lens, plan.ctx_lens, plan.block_tables, plan.offloaded, bs,
                         cfg.num_blocks, cfg.staging_blocks, self.k % 2, plan.gpu_prefix)
        self.k += 1
        for r in st.prefetch:
            for i in range(r.n):
                self.gpu[r.dst + i] = cp(self.host, r.src + i)
        for row, s in enumerate(plan.seqs):
            mem = self.host if plan.streamed[row] else self.gpu
            ctx, q = int(plan.ctx_lens[row]), int(plan.q_lens[row])
            for pos in range(ctx - q, ctx):
                mem.setdefault(int(st.table[row, pos // bs]), [None] * bs)[pos % bs] = \
                    s.token_ids[pos]
            got = [mem.get(int(st.table[row, pos // bs]), [None] * bs)[pos % bs]
                   for pos in range(ctx)]
            assert got == s.token_ids[:ctx], f"row {row} reads other tokens"
        for r in st.offload:
            for i in range(r.n):
                self.host[r.dst + i] = cp(self.gpu, r.src + i)


def writes_go_to_own_blocks(sch: Scheduler, plan):
    """The blocks a step writes (its new tokens' positions) are held by that sequence alone
    and not cached: a sampled or computed token never lands in a shared block."""
    bs = sch.cfg.block_size
    for s, q, c in zip(plan.seqs, plan.q_lens, plan.ctx_lens):
        if s.placement.on_host:
            continue
        for pos in range(int(c - q), int(c)):
            b = s.blocks[pos // bs]
            assert sch.blocks.refs[b] == 1, "a write into a shared block"
            assert b not in sch.blocks.cache.key_of, "a write into a cached block"


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("offload", [False, True])
def test_random_admit_finish_preempt(seed, offload):
    """Random admissions, finishes, cancellations and preemptions; with offload, offloaded
    sequences beside resident ones, swaps, and the host tier: the blocks' counts and the
    tokens every step reads (KVModel) stay right."""
    random_run(seed, offload)


def random_run(seed, offload) -> Scheduler:
    rng = np.random.default_rng(seed)
    cfg = SchedulerConfig(3, 4, 24, 4, 40, staging_blocks=16 if offload else 0,
                          host_blocks=200 if offload else 0, prefix_caching=True,
                          swap_blocks_per_step=40, host_cache_blocks=80 if offload else 0)
    sch = Scheduler(cfg)
    kv = KVModel(sch)
    todo = shared_seqs(rng, 50, prefixes=8 if offload else 3)
    queue = list(todo)          # taken in as the engine does: a few waiting at a time
    done = 0
    for _ in range(5000):
        while queue and len(sch.waiting) < 3:
            sch.add(queue.pop(0))
        progressed = False
        for mb in rng.permutation(cfg.num_micro_batches):
            plan = sch.schedule(int(mb))
            if plan is None:
                continue
            progressed = True
            check(sch)
            writes_go_to_own_blocks(sch, plan)
            kv.step(plan)
            for s in sch.complete(plan, rng.integers(3, 50, len(plan.sample_rows)).tolist()):
                if s.num_output >= s.params.max_tokens or rng.random() < 0.05:
                    sch.finish(s)             # finished, or cancelled early
                    done += 1
            check(sch)
            if sch.running[int(mb)] and rng.random() < 0.1:   # a preemption from outside
                sch._preempt(sch.running[int(mb)][-1])
                check(sch)
        if not sch.has_work() and not queue:
            break
        assert progressed, "stalled with work left"
    assert done == len(todo)
    assert sch.blocks.refs == [0] * cfg.num_blocks and sch.blocks.num_free == cfg.num_blocks
    assert not sch.computing
    assert sum(s.num_cached for s in todo) > 0
    if offload:
        assert not sch.tier.pins
    return sch


def test_the_random_runs_use_the_host_tier_and_offloaded_prefixes():
    """The random runs with offload exercise what they check: offloaded sequences mapped
    cached prefixes, the host tier kept evicted blocks and brought some back."""
    runs = [random_run(seed, True) for seed in range(4)]
    got = [(r.num_offloaded_cached, r.tier_blocks_out, r.tier_blocks_in) for r in runs]
    print(got)
    assert all(sum(x[i] for x in got) > 0 for i in range(3)), got


def lockstep_plans(tier: bool, seed: int, steps: int = 3000):
    """The plans of a deterministic run (fixed micro-batch order, seeded tokens) with the
    host tier on or off, each with the tier's counters at that step."""
    rng = np.random.default_rng(seed)
    cfg = SchedulerConfig(2, 4, 24, 4, 40, staging_blocks=16, host_blocks=200,
                          prefix_caching=True, swap_blocks_per_step=40,
                          host_cache_blocks=80 if tier else 0)
    sch = Scheduler(cfg)
    todo = shared_seqs(rng, 40, prefixes=8)
    toks = np.random.default_rng(seed + 1)
    out = []
    for _ in range(steps):
        while todo and len(sch.waiting) < 3:
            sch.add(todo.pop(0))
        for mb in range(cfg.num_micro_batches):
            plan = sch.schedule(mb)
            if plan is None:
                continue
            out.append((plan, sch.tier_blocks_out, sch.tier_blocks_in))
            for s in sch.complete(plan, toks.integers(3, 50, len(plan.sample_rows)).tolist()):
                if s.num_output >= s.params.max_tokens:
                    sch.finish(s)
        if not sch.has_work() and not todo:
            break
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_host_tier_changes_no_plan_until_it_has_a_hit(seed):
    """Until the tier brings a block back, a run with it plans every step as one without it
    (the same sequences, tokens, contexts and block tables) but for the tier's copies out:
    its bookkeeping costs the stages nothing else (measured at the few-shot mix, 24 GB,
    offload on: 2,470 steps alike, 7 blocks copied to the tier, 0 hits)."""
    off, on = lockstep_plans(False, seed), lockstep_plans(True, seed)
    compared = copied = 0
    for (a, _, _), (b, out_, in_) in zip(off, on):
        if in_:
            break                       # a hit: from here on the tier saves computation
        assert [s.req.custom_id for s in a.seqs] == [s.req.custom_id for s in b.seqs]
        for f in ("q_lens", "ctx_lens", "block_tables", "tokens", "sample_rows", "offloaded",
                  "streamed", "gpu_prefix", "swap_in"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), f
        extra = {tuple(x) for x in b.swap_out.tolist()} - {tuple(x) for x in a.swap_out.tolist()}
        assert all(h >= 200 for _, h in extra), "a copy out other than into the tier's slots"
        compared += 1
        copied = out_
    assert compared >= 15 and copied > 0, (compared, copied)


def test_host_tier_slots_are_sized_by_the_shared_prefixes():
    """The tier only ever holds blocks that were hits, so it gets twice the shared prefixes'
    blocks of the workload, not twice the GPU's blocks (pinned host memory for the whole
    run: 11.5 GiB where 250 blocks are shared); none without sharing, the caching or the
    tier; never more than twice the resident blocks nor than the host has spare."""
    from types import SimpleNamespace
    from pipemax.config import RunConfig
    from pipemax.kv_setup import host_cache_blocks
    from pipemax.planner import Workload
    on = RunConfig(prefix_caching=True, prefix_cache_host=True)
    p = SimpleNamespace(resident_blocks=2933, staging_blocks=163, host_blocks=326)
    wl = lambda shared: Workload(1200.0, 170.0, 4000, cached_blocks=shared)
    assert host_cache_blocks(on, p, 30000, wl(248)) == 496
    assert host_cache_blocks(on, p, 30000, wl(0)) == 0
    assert host_cache_blocks(on, p, 30000, wl(5000)) == 2 * 2933
    assert host_cache_blocks(on, p, 326 + 100, wl(248)) == 100
    assert host_cache_blocks(RunConfig(prefix_caching=True), p, 30000, wl(248)) == 0
    assert host_cache_blocks(on, SimpleNamespace(resident_blocks=2933, staging_blocks=0,
                                                 host_blocks=0), 30000, wl(248)) == 0


def test_a_shared_prefix_is_computed_once_before_its_sharers():
    """32 requests with a 64-token prefix: the first computes it, the others wait for it and
    then compute only their own 8 tokens (and their outputs)."""
    bs = 4
    head = list(range(100, 164))
    seqs = [Sequence(req(i, head + [i] * 8, 4), i) for i in range(32)]
    cfg = SchedulerConfig(2, 8, 256, bs, 400, prefix_caching=True)
    sch = Scheduler(cfg)
    for s in seqs:
        sch.add(s)
    computed = 0
    while sch.has_work():
        for mb in range(2):
            plan = sch.schedule(mb)
            if plan is None:
                continue
            computed += plan.num_tokens
            for s in sch.complete(plan, [7] * len(plan.sample_rows)):
                if s.num_output >= 4:
                    sch.finish(s)
    prompt = 32 * 72
    assert sum(s.num_cached for s in seqs) == 31 * 64
    assert computed == prompt - 31 * 64 + 32 * 3     # each output token but the last computed


def test_sharers_queue_together_and_seeds_stay_theirs():
    bs = 4
    a, b = list(range(10, 18)), list(range(30, 38))
    seqs = [Sequence(req(i, (a if i % 2 == 0 else b) + [i], 2), 1000 + i) for i in range(6)]
    sch = Scheduler(SchedulerConfig(1, 4, 64, bs, 100, prefix_caching=True))
    for s in seqs:
        sch.add(s)
    assert [s.req.index for s in sch.waiting] == [0, 2, 4, 1, 3, 5]
    off = Scheduler(SchedulerConfig(1, 4, 64, bs, 100, prefix_caching=False))
    for s in seqs:
        off.add(s)
    assert [s.req.index for s in off.waiting] == list(range(6))   # caching off: line order


def test_a_preempted_sequence_finds_its_own_blocks_cached():
    bs = 4
    s = Sequence(req(0, list(range(10, 30)), 10), 0)
    sch = Scheduler(SchedulerConfig(1, 2, 64, bs, 20, prefix_caching=True))
    sch.add(s)
    for _ in range(4):
        plan = sch.schedule(0)
        sch.complete(plan, [7] * len(plan.sample_rows))
    assert s.num_computed == 23 and len(s.token_ids) == 24
    sch._preempt(s)
    plan = sch.schedule(0)
    assert s.num_cached == 20 and plan.q_lens.tolist() == [4]   # 5 full blocks back


# ---- through the CLI, against transformers -----------------------------------------------------
MAX_NEW = 40
BS = ["--block-size", "4"]
TINY_KV = ["--kv-cache-gb", "0.00012"]     # 41 blocks of 4: preemptions, offload
OFFLOAD = ["--kv-cache-gb", "0.0006", "--kv-offload", "on", "--prefix-cache-host", "on",
           "--offload-policy", "first-come"]     # admitted to the host as they come


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from checkpoints import checkpoint_root, make_checkpoint
    return make_checkpoint(checkpoint_root(tmp_path_factory), "llama-gqa-sharded")


def shared_prompts(n=18, seed=4):
    """Three prefixes (of 9, 16 and 23 tokens: not all whole blocks), unique tails of 0-6
    tokens; one prompt is a prefix alone, one a prefix plus one token."""
    rng = np.random.default_rng(seed)
    heads = [rng.integers(3, 500, size=k).tolist() for k in (9, 16, 23)]
    out = [heads[i % 3] + rng.integers(3, 500, size=int(rng.integers(0, 7))).tolist()
           for i in range(n - 2)]
    return out + [heads[1], heads[1] + [77]]


def cli(tmp_path, model_dir, rows, name, *flags):
    from cli import read_results, run_cli, write_jsonl
    inp = write_jsonl(tmp_path / f"{name}.in.jsonl", rows)
    out = tmp_path / f"{name}.out.jsonl"
    stats = tmp_path / f"{name}.stats.json"
    p = run_cli(["--model", str(model_dir), "--input", str(inp), "--output", str(out),
                 "--stats-json", str(stats), *BS, *flags])
    assert p.returncode == 0, p.stderr
    res = read_results(out)
    assert all(v["error"] is None for v in res.values()), res
    return ({k: v["response"]["body"]["choices"][0] for k, v in res.items()},
            json.loads(stats.read_text()), p)


def greedy_rows(ids_list):
    return [{"custom_id": f"r{i}", "body": {"prompt": ids, "max_tokens": MAX_NEW,
             "temperature": 0, "ignore_eos": True, "return_token_ids": True},
             "url": "/v1/completions", "method": "POST"} for i, ids in enumerate(ids_list)]


@pytest.fixture(scope="module")
def reference(model_dir):
    from checkpoints import hf_greedy
    ids = shared_prompts()
    return ids, hf_greedy(model_dir, ids, MAX_NEW)


# offloaded ones beside resident ones; preemptions (all swapped: none is re-admitted to map a
# prefix); at 1 stage the host tier keeps evicted shared blocks and brings them back, and at
# a little less KV fresh offloaded admissions map cached prefixes
OFFLOAD_MAPS = ["--kv-cache-gb", "0.0005", *OFFLOAD[2:]]


@pytest.mark.parametrize("stages,flags", [
    (1, []), (2, []), (3, []),
    (2, TINY_KV + ["--kv-offload", "off"]),     # preemptions forced
    (1, OFFLOAD), (2, OFFLOAD), (1, OFFLOAD_MAPS),
])
def test_caching_on_matches_transformers(tmp_path, model_dir, reference, stages, flags):
    ids, ref = reference
    got, st, p = cli(tmp_path, model_dir, greedy_rows(ids), "on", "--gpus", str(stages),
                     "--prefix-caching", "on", *flags)
    for i in range(len(ids)):
        assert got[f"r{i}"]["token_ids"] == ref[i], f"prompt {i}"
    assert st["prompt_tokens"] == sum(map(len, ids))
    assert 0 < st["prompt_tokens_computed"] < st["prompt_tokens"]
    assert st["prompt_cache_hit_share"] == pytest.approx(
        1 - st["prompt_tokens_computed"] / st["prompt_tokens"])
    assert "from the prefix cache" in p.stdout
    if "--kv-offload" in flags and "off" in flags:
        assert st["preemptions"] > 0
    if flags in (OFFLOAD, OFFLOAD_MAPS):
        assert st["offloaded_admitted"] > 0 and st["preemptions"] > 0
        assert "brought back instead of recomputed" in p.stdout + p.stderr
    if flags is OFFLOAD_MAPS:
        assert st["offloaded_cached"] > 0          # offloaded sequences mapped a prefix
    if flags is OFFLOAD and stages == 1:  # (at 2 stages no evicted block here was a hit)
        assert st["host_cache_blocks_out"] > 0     # evicted shared blocks kept in the tier
        assert st["host_cache_hits"] > 0           # ... and brought back, not recomputed


def test_caching_off_computes_every_prompt_token(tmp_path, model_dir, reference):
    ids, ref = reference
    got, st, p = cli(tmp_path, model_dir, greedy_rows(ids), "off", "--gpus", "2",
                     "--prefix-caching", "off")
    assert [got[f"r{i}"]["token_ids"] for i in range(len(ids))] == ref
    assert st["prompt_tokens_computed"] == st["prompt_tokens"]
    assert st["prompt_cache_hit_share"] == 0.0 and "prefix cache" not in p.stdout


def test_seeded_sampling_same_text_with_caching_on_or_off(tmp_path, model_dir):
    ids = shared_prompts(12, seed=9)
    rows = [{"custom_id": f"r{i}", "body": {"prompt": x, "max_tokens": MAX_NEW,
             "temperature": 0.9, "top_p": 0.95, "seed": 50 + i, "ignore_eos": True,
             "return_token_ids": True}, "url": "/v1/completions", "method": "POST"}
            for i, x in enumerate(ids)]
    on, st, _ = cli(tmp_path, model_dir, rows, "s_on", "--gpus", "2", "--prefix-caching", "on")
    off, _, _ = cli(tmp_path, model_dir, rows, "s_off", "--gpus", "2",
                    "--prefix-caching", "off")
    assert st["prompt_tokens_computed"] < st["prompt_tokens"]
    assert {k: v["token_ids"] for k, v in on.items()} == {k: v["token_ids"]
                                                           for k, v in off.items()}


def test_bench_compares_caching_on_and_off_on_the_shared_workload(tmp_path, capsys):
    from test_bench import TINY
    from tools import bench
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "llama3-8b", *TINY, "--device", "cpu", "--dtype", "float32",
                       "--gpus", "1", "--workload", "shared:64/8/4", "--num-requests", "12",
                       "--systems", "pipemax-cache,pipemax-nocache",
                       "--pipemax-args", "--threads 1 --block-size 4", "--json", str(out)]) == 0
    assert "prompt_cache_hit_share" in capsys.readouterr().out.splitlines()[0]
    rows = {r["system"]: r for r in json.loads(out.read_text())}
    on, off = rows["pipemax-cache"], rows["pipemax-nocache"]
    assert on["prompt_tokens"] == off["prompt_tokens"] == 12 * 72
    assert off["prompt_tokens_computed"] == 12 * 72
    assert on["prompt_tokens_computed"] == 72 + 11 * 8      # the prefix once, then own parts
    assert on["plan"]["cached_prompt"] == pytest.approx(11 * 64 / 12)


def test_workloads_with_shared_prefixes():
    from tools.workload import layout, requests
    rows = requests("shared:20/5/3", 4, 1000)
    assert all(r["body"]["prompt"][:20] == rows[0]["body"]["prompt"][:20] for r in rows)
    assert len({tuple(r["body"]["prompt"][20:]) for r in rows}) == 4
    assert all(len(r["body"]["prompt"]) == 25 and r["body"]["max_tokens"] == 3 for r in rows)
    few = layout("fewshot:3", 200, 0, 4096)
    assert {w for _, _, w, _ in few} == {0, 1, 2}
    assert len({pre for _, _, _, pre in few}) == 3 and all(p > pre for p, _, _, pre in few)
    rows = requests("fewshot:3", 30, 1000)
    heads = {tuple(r["body"]["prompt"][:500]) for r in rows}
    assert len(heads) == 3
    with pytest.raises(ValueError):
        layout("shared:1/2", 3, 0, 4096)


def test_replay_on_the_shared_workload_computes_a_ninth_of_the_prompts(capsys):
    """The scheduler alone on shared:128/16/16 (the target's shape, scaled): the prefix is
    computed once, so prompt tokens computed are the own parts plus one prefix."""
    from tools.replay_scheduler import main
    args = ["--workload", "shared:128/16/16", "--num-requests", "64", "--seqs-per-mb", "16",
            "--resident", "2000", "--block-size", "16", "--max-tokens-per-step", "512"]
    assert main(args + ["--prefix-caching"]) == 0
    on = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    off = json.loads(capsys.readouterr().out)
    prompt = 64 * 144
    assert on["finished"] and on["prompt_tokens_cached"] == 63 * 128
    assert (prompt - on["prompt_tokens_cached"]) / prompt <= 0.15
    assert on["tokens_computed"] == off["tokens_computed"] - 63 * 128 and on["steps"] < off["steps"]
