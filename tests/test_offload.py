"""KV offload through the CLI on the CPU: same tokens as transformers with offload on, off and
auto, at 1, 2 and 3 stages; overlapped and plain schedules agree; counters are real; the host
pool's failures are found at start or stop the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from checkpoints import hf_greedy, make_checkpoint
from cli import ROOT, read_results, reap, run_cli, spawned_children, wait_first_result, write_jsonl

MAX_NEW = 10
# a GPU budget so small that most sequences must live in the host pool
SMALL = ["--kv-cache-gb", "0.0006", "--block-size", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama-gqa-sharded")


def prompts(n=16, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=int(rng.integers(1, 60))).tolist() for _ in range(n)]


def rows_for(ids_list, **body):
    return [{"custom_id": f"r{i}", "body": {"prompt": ids, "max_tokens": MAX_NEW,
             "temperature": 0, "ignore_eos": True, "return_token_ids": True, **body},
             "url": "/v1/completions", "method": "POST"} for i, ids in enumerate(ids_list)]


def run(tmp_path, model_dir, rows, name, *flags):
    inp = write_jsonl(tmp_path / f"{name}.in.jsonl", rows)
    out = tmp_path / f"{name}.out.jsonl"
    stats = tmp_path / f"{name}.stats.json"
    p = run_cli(["--model", str(model_dir), "--input", str(inp), "--output", str(out),
                 "--stats-json", str(stats), *flags])
    assert p.returncode == 0, p.stderr
    res = read_results(out)
    toks = {k: v["response"]["body"]["choices"][0]["token_ids"] for k, v in res.items()}
    return toks, json.loads(stats.read_text()), p


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_offload_modes_match_transformers(tmp_path, model_dir, stages, mode):
    ids = prompts()
    toks, st, p = run(tmp_path, model_dir, rows_for(ids), "run", "--gpus", str(stages),
                      "--kv-offload", mode, *SMALL)
    ref = hf_greedy(model_dir, ids, MAX_NEW)
    for i in range(len(ids)):
        assert toks[f"r{i}"] == ref[i], f"prompt {i} ({mode}, {stages} stages)"
    if mode == "on":
        assert st["plan"]["offload"]
        # the GPU-resident KV cannot hold half of the work's KV: the rest ran from the pool
        total_tokens = sum(len(x) + MAX_NEW for x in ids)
        assert st["plan"]["resident_blocks"] * 4 < total_tokens / 2
        # admitted to the host pool, or (the selection) moved there as contexts grew
        assert st["offloaded_admitted"] + st["moved_to_host"] >= len(ids) // 3
        assert st["bytes_prefetched"] > 0 and st["bytes_offloaded"] > 0
        assert all(f["peak_staging_blocks"] > 0 for f in st["finals"])
        assert "KV offload:" in p.stderr and "prefetched" in p.stderr
    if mode == "off":
        assert not st["plan"]["offload"] and st["bytes_prefetched"] == 0


def test_overlapped_and_plain_schedules_agree(tmp_path, model_dir):
    ids = prompts(20, seed=5)
    rows = rows_for(ids)
    for i, r in enumerate(rows):            # sampled ones too: same seed, same tokens
        if i % 2:
            r["body"].update(temperature=0.8, top_p=0.95, seed=100 + i)
    got = []
    for overlap in ("on", "off"):
        toks, st, _ = run(tmp_path, model_dir, rows, f"ov-{overlap}", "--gpus", "2",
                          "--kv-offload", "on", "--offload-overlap", overlap,
                          "--micro-batches", "4", "--cuda-graphs", "on", *SMALL)
        assert st["offloaded_admitted"] > 0
        got.append(toks)
    assert got[0] == got[1]


def test_copy_plans_prefetch_ahead_and_change_no_token(tmp_path, model_dir):
    """With the driver's copy plans (``--prefetch-plans on``, the default) stages after the
    first issue prefetches from them, before the step's activations arrive; greedy tokens are
    transformers' either way, and seeded sampled ones are the same with plans on and off."""
    ids = prompts(20, seed=11)
    rows = rows_for(ids)
    for i, r in enumerate(rows):
        if i % 3 == 0:
            r["body"].update(temperature=0.9, top_p=0.9, seed=7 + i)
    ref = hf_greedy(model_dir, ids, MAX_NEW)
    stages = 3                                   # a middle stage and the last
    got = {}
    for plans in ("on", "off"):
        toks, st, _ = run(tmp_path, model_dir, rows, f"plans-{plans}", "--gpus", str(stages),
                          "--kv-offload", "on", "--micro-batches", "4",
                          "--prefetch-plans", plans, *SMALL)
        assert st["offloaded_admitted"] > 0
        ahead = [f["prefetched_from_plans"] for f in st["finals"]]
        assert ahead[0] == 0                     # stage 0 learns steps from the driver's ring
        if plans == "on":
            assert sum(ahead[1:]) > 0, ahead
        else:
            assert ahead == [0] * stages
        for i in range(len(ids)):
            if i % 3:
                assert toks[f"r{i}"] == ref[i], f"prompt {i} (plans {plans}, {stages} stages)"
        got[plans] = toks
    assert got["on"] == got["off"]


def test_single_micro_batch_with_offload(tmp_path, model_dir):
    """M = 1: the next step's prefetch must wait for this step's own offload."""
    ids = prompts(16, seed=9)
    toks, st, _ = run(tmp_path, model_dir, rows_for(ids), "m1", "--gpus", "1",
                      "--kv-offload", "on", "--micro-batches", "1", "--kv-cache-gb", "0.0003",
                      "--block-size", "4")
    assert st["offloaded_admitted"] > 0
    ref = hf_greedy(model_dir, ids, MAX_NEW)
    assert [toks[f"r{i}"] for i in range(len(ids))] == ref


def test_host_pool_too_small_for_the_batch_is_refused_at_start(tmp_path, model_dir):
    inp = write_jsonl(tmp_path / "in.jsonl", rows_for(prompts(2)))
    p = run_cli(["--model", str(model_dir), "--input", str(inp), "--output",
                 str(tmp_path / "o.jsonl"), "--kv-offload", "on", "--host-kv-gb", "0.000001",
                 *SMALL])
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("pipemax: error: KV offload needs") and "host pool" in last


def test_host_memory_checks_give_the_figures():
    from pipemax.kv_pool import HostMemoryError, check_host_memory, shm_free
    with pytest.raises(HostMemoryError, match=r"needs .* GiB but /dev/shm has .* GiB free"):
        check_host_memory(shm_free() + (1 << 30), pinned=False)
    check_host_memory(1 << 20, pinned=False)      # a small pool is fine


def test_offload_on_with_no_room_for_staging_is_refused(tmp_path, model_dir):
    inp = write_jsonl(tmp_path / "in.jsonl", rows_for(prompts(2)))
    p = run_cli(["--model", str(model_dir), "--input", str(inp), "--output",
                 str(tmp_path / "o.jsonl"), "--kv-offload", "on", "--kv-cache-gb", "0.00002",
                 "--block-size", "4"])
    assert p.returncode == 2, p.stderr
    assert "staging buffers" in p.stderr.strip().splitlines()[-1]


def test_killed_pool_stops_the_run(tmp_path, model_dir):
    rows = [{"custom_id": f"r{i}", "prompt": [3 + i % 50, 4, 5], "max_tokens": 300,
             "ignore_eos": True, "temperature": 0} for i in range(200)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipemax.launch", "--device", "cpu",
                             "--threads", "1", "--gpus", "2", "--model", str(model_dir),
                             "--input", str(inp), "--output", str(out), "--kv-offload", "on",
                             "--max-num-seqs", "8", *SMALL], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # spawned children: two stages, then (after they loaded) the pool, the newest pid
        kids = spawned_children(proc.pid, 3)
        pool = max(kids)
        wait_first_result(proc, out)
        os.kill(pool, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        reap(proc)
    assert proc.returncode == 1
    assert "KV pool process" in err
    assert 0 < len(read_results(out)) < 200


def test_an_overlong_request_gets_an_error_line_when_offload_is_off(tmp_path, model_dir):
    """One request longer than the GPU's KV memory (within the model's context), offload off:
    the plan is made for the others, the long one gets an error line, the run goes on."""
    ids = prompts(6)
    rows = rows_for(ids)
    long = rows_for([[3 + i % 400 for i in range(400)]])[0]      # the context is 512
    rows.insert(3, {**long, "custom_id": "long"})
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.jsonl"
    p = run_cli(["--model", str(model_dir), "--input", str(inp), "--output", str(out),
                 "--kv-offload", "off", "--kv-cache-gb", "0.0002", "--block-size", "4"])
    assert p.returncode == 0, p.stderr
    assert "1 of the sampled requests are longer than it can hold" in p.stderr + p.stdout
    res = read_results(out)
    assert res["long"]["error"]["code"] == "prompt_too_long"
    assert "does not fit the KV cache" in res["long"]["error"]["message"]
    ref = hf_greedy(model_dir, ids, MAX_NEW)
    for i in range(len(ids)):
        assert res[f"r{i}"]["response"]["body"]["choices"][0]["token_ids"] == ref[i]


@pytest.mark.parametrize("stages,mode,overlap", [(1, "on", "on"), (2, "auto", "on"),
                                                 (2, "on", "off")])
def test_requests_longer_than_the_gpu_run_streamed(tmp_path, model_dir, stages, mode, overlap):
    """Two requests of 400 and 330 prompt tokens beside a GPU KV budget of about 100 tokens:
    nothing is refused that fits the host pool. They run streamed (KV read and written in
    the host pool, the prompt chunk by chunk) beside ordinary ones, and every request gives
    transformers' tokens."""
    ids = prompts(8)
    ids.insert(2, [3 + (7 * i) % 450 for i in range(400)])
    ids.insert(5, [5 + (11 * i) % 470 for i in range(330)])
    toks, st, p = run(tmp_path, model_dir, rows_for(ids), "stream", "--gpus", str(stages),
                      "--kv-offload", mode, "--kv-cache-gb", "0.0002", "--block-size", "4",
                      "--max-num-batched-tokens", "64", "--offload-overlap", overlap)
    assert st["streamed_admitted"] == 2 and st["plan"]["streamed"] == 2
    assert "2 sequences streamed from the host pool" in p.stdout + p.stderr
    ref = hf_greedy(model_dir, ids, MAX_NEW)
    for i in range(len(ids)):
        assert toks[f"r{i}"] == ref[i], f"prompt {i}"


def test_a_file_of_only_requests_longer_than_the_gpu_runs(tmp_path, model_dir):
    """Every request too long for the GPU: the run is not refused, all of them stream."""
    ids = [[3 + (7 * i) % 450 for i in range(400)], [5 + (11 * i) % 470 for i in range(330)]]
    toks, st, p = run(tmp_path, model_dir, rows_for(ids), "only", "--kv-offload", "on",
                      "--kv-cache-gb", "0.0002", "--block-size", "4",
                      "--max-num-batched-tokens", "64")
    assert st["streamed_admitted"] == 2 and st["requests_ok"] == 2
    ref = hf_greedy(model_dir, ids, MAX_NEW)
    assert [toks["r0"], toks["r1"]] == ref
