"""Swap instead of recompute: a preempted resident sequence's KV goes to the host pool and
comes back (staged, or copied into GPU blocks) without recomputation.

The scheduler is driven against a model of the KV memory (every GPU, staging and host slot
holds the token it was written with), applying each step's copies in the stages' order, so a
lost, stale or shared block shows up as a wrong token in some sequence's context. Then the
CLI: the same greedy tokens as transformers at 1-3 stages with swaps forced, and recompute
when offload is off."""
from __future__ import annotations

import numpy as np
import pytest

from pipemax.block_manager import ExtentAllocator
from pipemax.placement import Placement as P, Room, swaps
from pipemax.requests import Request, SamplingParams
from pipemax.scheduler import Scheduler, SchedulerConfig
from pipemax.sequence import Sequence
from pipemax.stages.timetable import staging_for, swap_runs

EMPTY = -1


def seqs(rng, n, longest, max_new=20):
    out = []
    for i in range(n):
        p = int(rng.integers(1, longest))
        prompt = tuple(int(x) for x in rng.integers(3, 1000, size=p))
        r = Request(i, f"r{i}", "completion", prompt,
                    SamplingParams(max_tokens=int(rng.integers(1, max_new)), temperature=0),
                    False, None)
        out.append(Sequence(r, i))
    return out


class Memory:
    """Token ids held in every KV slot: GPU (resident + two staging buffers) and host."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        bs = cfg.block_size
        self.gpu = np.full((cfg.num_blocks + 2 * cfg.staging_blocks, bs), EMPTY)
        self.host = np.full((max(cfg.host_blocks, 1), bs), EMPTY)
        self.k = 0

    def step(self, plan) -> None:
        """One step as a stage runs it: swap-out, swap-in and prefetch, compute (check every
        row's context, then write its new tokens), offload."""
        cfg, bs = self.cfg, self.cfg.block_size
        st = staging_for(plan.q_lens, plan.ctx_lens, plan.block_tables, plan.offloaded, bs,
                         cfg.num_blocks, cfg.staging_blocks, self.k % 2)
        self.k += 1
        for r in swap_runs(plan.swap_out):
            self.host[r.dst:r.dst + r.n] = self.gpu[r.src:r.src + r.n]
        for r in swap_runs(plan.swap_in) + st.prefetch:
            self.gpu[r.dst:r.dst + r.n] = self.host[r.src:r.src + r.n]
        pos = 0
        for row, s in enumerate(plan.seqs):
            ctx, q = int(plan.ctx_lens[row]), int(plan.q_lens[row])
            mem = self.host if plan.streamed[row] else self.gpu
            table = st.table[row]
            want = s.token_ids[:ctx]
            for t in range(ctx):
                b, o = table[t // bs], t % bs
                if t >= ctx - q:                       # written by this step
                    mem[b, o] = plan.tokens[pos + t - (ctx - q)]
                else:
                    assert mem[b, o] == want[t], (
                        f"{s.req.custom_id}: token {t} of its context lost (swapped "
                        f"{s.num_preemptions} times)")
            pos += q
        for r in st.offload:
            self.host[r.dst:r.dst + r.n] = self.gpu[r.src:r.src + r.n]


def drive(cfg: SchedulerConfig, rng, n=40, longest=30) -> Scheduler:
    sch = Scheduler(cfg)
    mem = Memory(cfg)
    todo = seqs(rng, n, longest)
    for s in todo:
        sch.add(s)
    done = 0
    resumed = {"resident": 0, "offloaded": 0}
    preempted = {"swapped": 0, "recomputed": 0}     # resident and offloaded ones preempted
    kept = 0                # blocks of preempted offloaded sequences kept in their extents
    for _ in range(5000):
        progressed = False
        for mb in range(cfg.num_micro_batches):
            before = [(s, s.num_preemptions, s.placement) for s in sch.running[mb]
                      if s.placement is not P.STREAMED]
            swapped_before = sch.num_swapped_out
            plan = sch.schedule(mb)
            hit = sum(s.num_preemptions > n for s, n, _ in before)
            kept += sum(sch.blocks.blocks_for(s.num_computed) for s, n, where in before
                        if s.num_preemptions > n and where is P.HOST)   # (0 if recomputed)
            preempted["swapped"] += sch.num_swapped_out - swapped_before
            preempted["recomputed"] += hit - (sch.num_swapped_out - swapped_before)
            if plan is None:
                continue
            progressed = True
            owned = [b for run in sch.running for s in run if s.placement is P.RESIDENT
                     for b in s.blocks]
            refs = {b: owned.count(b) for b in owned}
            assert all(sch.blocks.refs[b] == c for b, c in refs.items()), "a block given twice"
            hosted = [b for s in [*(x for run in sch.running for x in run), *sch.waiting]
                      if s.placement.on_host for b in s.blocks]
            assert len(hosted) == len(set(hosted)), "a host block given twice"
            used = sch.host.used if sch.host is not None else 0
            assert len(hosted) == used - sum(n for _, n in sch._freed_after[mb]), "leaked"
            waiting_swapped = [s for s in sch.waiting if s.swapped]
            assert len(waiting_swapped) == len(sch._swapped)
            resumed["resident"] += len(plan.swap_in) > 0
            resumed["offloaded"] += sum(1 for s, o in zip(plan.seqs, plan.offloaded)
                                        if o and s.num_preemptions and s.num_computed)
            mem.step(plan)
            sampled = sch.complete(plan, [int(rng.integers(3, 1000))
                                          for _ in plan.sample_rows])
            for s in sampled:
                if s.num_output >= s.params.max_tokens:
                    sch.finish(s)
                    done += 1
        if not sch.has_work():
            break
        assert progressed, "stalled with work left"
    assert done == n, "a sequence was lost"
    assert sch.blocks.num_free == cfg.num_blocks and not sch._swapped
    assert sch.host is None or sch.host.used == 0
    assert kept == 0 or sch.num_kept_on_host > 0
    sch.resumed, sch.preempted, sch.blocks_kept = resumed, preempted, kept
    return sch


@pytest.mark.parametrize("seed", range(6))
def test_swapped_sequences_keep_their_kv(seed):
    """Resident blocks for about two sequences per micro-batch, a staging buffer, a host
    pool: preempted sequences swap out and resume, both offloaded and resident again, and
    every context holds its own tokens."""
    cfg = SchedulerConfig(2, 4, 16, 4, 24, staging_blocks=12, host_blocks=120,
                          offload_policy="first-come")
    sch = drive(cfg, np.random.default_rng(seed))
    assert sch.num_swapped_out > 0 and sch.blocks_swapped_out > 0
    assert sch.preempted == {"swapped": sch.num_swapped_out, "recomputed": 0}  # room for all
    assert sch.resumed["offloaded"] > 0 or sch.resumed["resident"] > 0


@pytest.mark.parametrize("policy", ["first-come", "selection"])
@pytest.mark.parametrize("seed", range(3))
def test_a_preempted_offloaded_sequence_keeps_its_extent(policy, seed):
    """An offloaded sequence preempted when its staging buffer is outgrown keeps its host
    extent (its KV is there already): nothing copied, nothing recomputed, and its context
    holds its own tokens when it comes back, staged or resident."""
    cfg = SchedulerConfig(2, 4, 16, 4, 24, staging_blocks=12, host_blocks=120,
                          offload_policy=policy)
    sch = drive(cfg, np.random.default_rng(seed))
    assert sch.num_kept_on_host > 0 and sch.blocks_kept > 0
    assert sch.tokens_recomputed == 0


def test_both_ways_back():
    """Over a few seeds, swapped sequences come back both as offloaded and as resident."""
    got = {"resident": 0, "offloaded": 0}
    for seed in range(6):
        cfg = SchedulerConfig(2, 4, 16, 4, 24, staging_blocks=8, host_blocks=120,
                              offload_policy="first-come")
        sch = drive(cfg, np.random.default_rng(seed))
        for k in got:
            got[k] += sch.resumed[k]
        # (what comes back resident was copied out, or was an offloaded one's extent)
        assert sch.blocks_swapped_in <= sch.blocks_swapped_out + sch.blocks_kept
    assert got["resident"] > 0 and got["offloaded"] > 0, got


@pytest.mark.parametrize("seed", range(4))
def test_a_full_host_pool_falls_back_to_recompute(seed):
    """A host pool with room for little more than the offloaded sequences: some preempted
    sequences swap, the others are recomputed, and none is lost or corrupted."""
    cfg = SchedulerConfig(2, 4, 16, 4, 24, staging_blocks=12, host_blocks=24,
                          offload_policy="first-come")
    sch = drive(cfg, np.random.default_rng(seed))
    assert sch.preempted["swapped"] > 0 and sch.preempted["recomputed"] > 0, sch.preempted
    assert sch.tokens_recomputed > 0


@pytest.mark.parametrize("seed", range(4))
def test_swap_only_brings_preempted_sequences_back_resident(seed):
    """Offload off with a host pool kept for swaps (``--kv-offload swap``): a preempted
    sequence's KV waits in the host pool and is copied back into GPU blocks; nothing is
    offloaded or recomputed, and every context holds its own tokens."""
    cfg = SchedulerConfig(2, 4, 16, 4, 24, host_blocks=120, swap_blocks=120)
    sch = drive(cfg, np.random.default_rng(seed))
    assert sch.num_swapped_out > 0 and sch.blocks_swapped_out > 0
    assert sch.preempted == {"swapped": sch.num_swapped_out, "recomputed": 0}
    assert sch.resumed["resident"] > 0 and sch.resumed["offloaded"] == 0
    assert sch.num_offloaded_admitted == 0 and sch.tokens_recomputed == 0
    assert sch.blocks_swapped_in == sch.blocks_swapped_out


@pytest.mark.parametrize("seed", range(3))
def test_without_offload_preemption_recomputes(seed):
    cfg = SchedulerConfig(2, 4, 16, 4, 24)
    sch = drive(cfg, np.random.default_rng(seed))
    assert sch.preempted["recomputed"] > 0 and sch.num_swapped_out == 0
    assert sch.tokens_recomputed > 0 and sch.blocks_swapped_out == 0


def test_swap_policy():
    assert swaps(Room(10, 8, 100), 3)
    assert not swaps(Room(10, 0, 100), 3)        # a host pool for streaming only
    assert swaps(Room(10, 0, 100, swap_blocks=60), 3)   # swap-only
    assert not swaps(Room(10, 8, 0), 3)
    assert not swaps(Room(10, 8, 100), 0)         # nothing computed to keep


def test_a_swapped_sequence_dropped_from_the_queue_gives_its_extent_back():
    """A control command may drop a waiting sequence: a swapped one's extent is taken back
    (once) when the host pool runs short."""
    cfg = SchedulerConfig(1, 4, 16, 4, 16, staging_blocks=4, host_blocks=40)
    sch = Scheduler(cfg)      # (staging too small for them: a swapped one waits)
    rng = np.random.default_rng(0)
    for s in seqs(rng, 6, 12, max_new=30):
        sch.add(s)
    swapped = None
    for _ in range(200):
        plan = sch.schedule(0)
        if plan is None:
            break
        sch.complete(plan, [5] * len(plan.sample_rows))
        swapped = next((s for s in sch.waiting if s.swapped), None)
        if swapped is not None:
            break
    assert swapped is not None
    used = sch.host.used
    sch.waiting.remove(swapped)                  # what cancel does
    assert sch._host_alloc(cfg.host_blocks - used + len(swapped.blocks)) is not None
    assert not swapped.swapped and not swapped.blocks and id(swapped) not in sch._swapped


def test_an_extent_freed_twice_raises():
    a = ExtentAllocator(10)
    x = a.alloc(4)
    a.free(x, 4)
    with pytest.raises(AssertionError, match="not in use"):
        a.free(x, 4)
    y = a.alloc(3)
    with pytest.raises(AssertionError):
        a.free(y + 1, 3)                          # overlapping a free range


# ---- through the CLI, against transformers -----------------------------------------------
MAX_NEW = 40
# short prompts, long outputs, few KV blocks: resident sequences outgrow the GPU's blocks
TIGHT = ["--kv-cache-gb", "0.0003", "--block-size", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from checkpoints import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama-gqa-sharded")


@pytest.fixture(scope="module")
def work(model_dir):
    from checkpoints import hf_greedy
    rng = np.random.default_rng(3)
    ids = [rng.integers(3, 500, size=int(rng.integers(1, 12))).tolist() for _ in range(16)]
    return ids, hf_greedy(model_dir, ids, MAX_NEW)


def run(tmp_path, model_dir, ids, *flags):
    import json

    from cli import read_results, run_cli, write_jsonl
    rows = [{"custom_id": f"r{i}", "url": "/v1/completions", "method": "POST",
             "body": {"prompt": x, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
                      "return_token_ids": True}} for i, x in enumerate(ids)]
    inp, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    write_jsonl(inp, rows)
    p = run_cli(["--model", str(model_dir), "--input", str(inp), "--output", str(out),
                 "--stats-json", str(stats), *TIGHT, *flags])
    assert p.returncode == 0, p.stderr
    res = read_results(out)
    toks = [res[f"r{i}"]["response"]["body"]["choices"][0]["token_ids"] for i in range(len(ids))]
    return toks, json.loads(stats.read_text()), p.stdout + p.stderr


@pytest.mark.parametrize("stages,overlap", [(1, "on"), (2, "on"), (3, "on"), (2, "off")])
def test_swapped_sequences_give_transformers_tokens(tmp_path, model_dir, work, stages, overlap):
    ids, ref = work
    toks, st, log = run(tmp_path, model_dir, ids, "--gpus", str(stages), "--kv-offload", "on",
                        "--offload-overlap", overlap, "--offload-policy", "first-come")
    assert toks == ref
    assert st["swapped_out"] > 0 and st["blocks_swapped_out"] > 0
    per_block = sum(r["block_bytes"] for r in st["stages"])      # one block id, every stage
    # the stages' swap copies: the preempted sequences' and the prefix cache's host tier's
    assert st["bytes_swapped_out"] == (st["blocks_swapped_out"]
                                       + st["host_cache_blocks_out"]) * per_block
    assert st["bytes_swapped_in"] == (st["blocks_swapped_in"] + st["host_cache_hits"]) * per_block
    assert st["preemptions"] >= st["swapped_out"]
    assert f"{st['swapped_out']} swapped to the host pool" in log
    # offloaded sequences outgrow their staging buffer too: preempted, they keep their extent
    # (here at 2 and 3 stages; at 1 the resident ones are preempted first)
    assert st["kept_on_host"] > 0 or stages == 1
    assert (f"{st['kept_on_host']} of them offloaded ones kept where they were" in log) == (
        st["kept_on_host"] > 0)
    assert f"{st['tokens_recomputed']} tokens recomputed" in log


@pytest.mark.parametrize("stages", [1, 3])
def test_swap_only_gives_transformers_tokens(tmp_path, model_dir, work, stages):
    """--kv-offload swap: nothing offloaded, but preempted sequences swap out and back in
    (every stage copying its own layers), with transformers' tokens and nothing recomputed."""
    ids, ref = work
    toks, st, log = run(tmp_path, model_dir, ids, "--gpus", str(stages), "--kv-offload", "swap")
    assert toks == ref
    assert st["plan"]["swap_blocks"] > 0 and st["plan"]["staging_blocks"] == 0
    assert st["offloaded_admitted"] == 0 and st["bytes_prefetched"] == 0
    assert st["swapped_out"] == st["preemptions"] > 0 and st["tokens_recomputed"] == 0
    per_block = sum(r["block_bytes"] for r in st["stages"])
    assert st["bytes_swapped_out"] == st["blocks_swapped_out"] * per_block > 0
    assert st["bytes_swapped_in"] == st["blocks_swapped_in"] * per_block
    assert "offload off, swap:" in log


def test_offload_off_recomputes(tmp_path, model_dir, work):
    ids, ref = work
    toks, st, log = run(tmp_path, model_dir, ids, "--kv-offload", "off")
    assert toks == ref
    assert st["preemptions"] > 0 and st["swapped_out"] == 0 and st["tokens_recomputed"] > 0
    assert st["bytes_swapped_out"] == 0 and "swapped to the host pool" not in log
    assert f"{st['preemptions']} preemptions: {st['tokens_recomputed']} tokens recomputed" in log


@pytest.mark.parametrize("stages,overlap", [(1, "on"), (2, "off"), (3, "on")])
def test_the_offload_selection_gives_transformers_tokens(tmp_path, model_dir, work, stages,
                                                         overlap):
    """--offload-policy selection with a tiny KV budget: running sequences move between the
    GPU, the host pool and micro-batches, and the greedy tokens stay transformers'."""
    ids, ref = work
    toks, st, _ = run(tmp_path, model_dir, ids, "--gpus", str(stages), "--kv-offload", "on",
                      "--offload-overlap", overlap, "--offload-policy", "selection")
    assert toks == ref
    assert st["offload_policy"] == "selection"
    assert st["moved_to_host"] + st["moved_to_gpu"] + st["moved_between_micro_batches"] > 0, st
