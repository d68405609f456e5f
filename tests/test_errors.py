"""Bad input stops with one clear line; a dying stage stops the run; nothing is left in /dev/shm."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import make_checkpoint
from cli import (ROOT, assert_one_line_error, read_results, reap, run_cli, spawned_children,
                 wait_first_result, write_jsonl)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama-gqa-sharded")


@pytest.fixture
def one_request(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl", [{"prompt": [5, 6, 7], "max_tokens": 2}])


def test_missing_model_folder(tmp_path, one_request):
    p = run_cli(["--model", str(tmp_path / "nope"), "--input", str(one_request),
                 "--output", str(tmp_path / "o.jsonl")])
    assert_one_line_error(p, "does not exist")


def test_folder_without_config(tmp_path, one_request):
    (tmp_path / "m").mkdir()
    p = run_cli(["--model", str(tmp_path / "m"), "--input", str(one_request),
                 "--output", str(tmp_path / "o.jsonl")])
    assert_one_line_error(p, "config.json")


def test_malformed_config(tmp_path, one_request):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    p = run_cli(["--model", str(tmp_path / "m"), "--input", str(one_request),
                 "--output", str(tmp_path / "o.jsonl")])
    assert_one_line_error(p, "not valid JSON")


def test_unsupported_architecture(tmp_path, one_request):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    p = run_cli(["--model", str(tmp_path / "m"), "--input", str(one_request),
                 "--output", str(tmp_path / "o.jsonl")])
    assert_one_line_error(p, "unsupported architecture", "GPT2LMHeadModel")


def test_checkpoint_missing_a_tensor(tmp_path, model_dir, one_request):
    import shutil
    m = tmp_path / "m"
    shutil.copytree(model_dir, m)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.4.mlp.up_proj.weight"]
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    p = run_cli(["--model", str(m), "--input", str(one_request),
                 "--output", str(tmp_path / "o.jsonl")])
    assert_one_line_error(p, "model.layers.4.mlp.up_proj.weight")


def test_checkpoint_with_wrong_shape(tmp_path, model_dir, one_request):
    import shutil
    m = tmp_path / "m"
    shutil.copytree(model_dir, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (m / "config.json").write_text(json.dumps(cfg))
    p = run_cli(["--model", str(m), "--input", str(one_request),
                 "--output", str(tmp_path / "o.jsonl")])
    assert_one_line_error(p, "shape")


def test_more_gpus_than_devices(tmp_path, model_dir, one_request):
    p = run_cli(["--device", "cuda", "--gpus", "2", "--model", str(model_dir),
                 "--input", str(one_request), "--output", str(tmp_path / "o.jsonl")])
    import torch
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")  # never on CI, which has none
    assert_one_line_error(p, "CUDA device")


def test_more_stages_than_layers(tmp_path, model_dir, one_request):
    p = run_cli(["--gpus", "7", "--model", str(model_dir), "--input", str(one_request),
                 "--output", str(tmp_path / "o.jsonl")])
    assert_one_line_error(p, "6 layers")


def test_unreadable_input(tmp_path, model_dir):
    p = run_cli(["--model", str(model_dir), "--input", str(tmp_path / "missing.jsonl"),
                 "--output", str(tmp_path / "o.jsonl")])
    assert_one_line_error(p, "cannot read input file")


def test_bad_flag_is_one_line(tmp_path):
    p = run_cli(["--gpus", "two"])
    assert_one_line_error(p, "--gpus")


def test_builtin_name_without_dummy(tmp_path, one_request):
    p = run_cli(["--model", "llama3-8b", "--input", str(one_request),
                 "--output", str(tmp_path / "o.jsonl")])
    assert_one_line_error(p, "--load-format dummy")


def test_bad_lines_get_error_lines_and_the_rest_is_served(tmp_path, model_dir):
    rows = ['{"prompt": [1, 2, 3], "max_tokens": 3, "custom_id": "good1"}',
            '{this is not json',
            {"custom_id": "badurl", "url": "/v1/embeddings", "method": "POST", "body": {}},
            {"custom_id": "badtemp", "url": "/v1/completions", "method": "POST",
             "body": {"prompt": [1, 2], "temperature": "hot"}},
            {"custom_id": "toolong", "url": "/v1/completions", "method": "POST",
             "body": {"prompt": [3 + i % 500 for i in range(600)], "max_tokens": 2}},
            '{"prompt": [4, 5, 6], "max_tokens": 3, "custom_id": "good2"}']
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.jsonl"
    p = run_cli(["--gpus", "2", "--model", str(model_dir), "--input", str(inp), "--output",
                 str(out)])
    assert p.returncode == 0, p.stderr
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == len(rows)
    by_id = {l["custom_id"]: l for l in lines}
    assert by_id["good1"]["error"] is None and by_id["good2"]["error"] is None
    assert by_id["badurl"]["error"]["code"] == "invalid_url"
    assert by_id["badtemp"]["error"]["code"] == "invalid_parameter"
    assert by_id["toolong"]["error"]["code"] == "prompt_too_long"
    assert sum(1 for l in lines if l["error"] and l["error"]["code"] == "invalid_json") == 1
    assert "requests 2 ok, 4 failed" in p.stdout


def _long_run(tmp_path, model_dir, stages=3):
    rows = [{"custom_id": f"r{i}", "prompt": [3 + i % 50, 4, 5], "max_tokens": 400,
             "ignore_eos": True, "temperature": 0} for i in range(300)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipemax.launch", "--device", "cpu",
                             "--threads", "1", "--gpus", str(stages), "--model", str(model_dir),
                             "--input", str(inp), "--output", str(out), "--max-num-seqs", "8"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, out


@pytest.mark.parametrize("victim", [0, 1, 2])
def test_killed_stage_stops_the_run_naming_it(tmp_path, model_dir, victim):
    proc, out = _long_run(tmp_path, model_dir)
    try:
        pids = spawned_children(proc.pid, 3)
        wait_first_result(proc, out)
        # spawn order is stage order, and pids grow with it
        os.kill(pids[victim], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        reap(proc)
    assert proc.returncode == 1
    assert f"stage {victim}" in err, err
    done = read_results(out)
    assert 0 < len(done) < 300
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.parametrize("sigs", [[signal.SIGINT], [signal.SIGTERM, signal.SIGTERM],
                                  [signal.SIGTERM, signal.SIGINT]],
                         ids=["sigint", "sigterm-twice", "sigterm-then-sigint"])
def test_signal_stops_cleanly_keeping_results(tmp_path, model_dir, sigs):
    """SIGINT, or a second signal after SIGTERM, stops at once (exit 130)."""
    proc, out = _long_run(tmp_path, model_dir, stages=2)
    try:
        pids = spawned_children(proc.pid, 2)
        wait_first_result(proc, out)
        # the first result's wave finishes within a few steps: after it, the sequences running
        # have most of their 400 tokens left, so a drain outlasts the 0.2 s between signals
        time.sleep(0.5)
        for sig in sigs:
            os.kill(proc.pid, sig)
            time.sleep(0.2)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        reap(proc)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert len(read_results(out)) > 0
    time.sleep(0.5)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def test_sigterm_drains_the_running_requests_then_exits_0(tmp_path, model_dir):
    """The first SIGTERM (systemd's stop) takes nothing new, finishes what runs, exits 0; a run
    started again with the same --output serves the rest (tests/test_faults.py checks that)."""
    proc, out = _long_run(tmp_path, model_dir, stages=2)
    try:
        pids = spawned_children(proc.pid, 2)
        wait_first_result(proc, out)
        os.kill(proc.pid, signal.SIGTERM)
        stdout, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert "draining (SIGTERM)" in err and "drained" in err, err
    done = read_results(out)
    assert 0 < len(done) < 300
    # what was running when the signal came was finished, to its last token
    assert all(d["response"]["body"]["usage"]["completion_tokens"] == 400 for d in done.values())
    assert f"requests {len(done)} ok" in stdout
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.alone
def test_killed_driver_leaves_stale_objects_that_the_next_start_removes(tmp_path, model_dir):
    proc, out = _long_run(tmp_path, model_dir, stages=2)
    try:
        pids = spawned_children(proc.pid, 2)
        prefix = f"pipemax-{proc.pid}-"
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # stages notice the driver is gone and exit by themselves
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert any(n.startswith(prefix) for n in os.listdir("/dev/shm"))
    inp = write_jsonl(tmp_path / "in2.jsonl", [{"prompt": [1, 2], "max_tokens": 2}])
    p = run_cli(["--model", str(model_dir), "--input", str(inp), "--output",
                 str(tmp_path / "o2.jsonl")])
    assert p.returncode == 0, p.stderr
    assert "removed shared memory left by dead runs" in p.stderr
    assert not any(n.startswith(prefix) or n.startswith("sem." + prefix)
                   for n in os.listdir("/dev/shm"))
