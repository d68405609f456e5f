"""python -m pipemax.ray_batch on a local Ray instance (2 CPUs, started once for the module):
two replicas of the tiny model over a file of a few hundred lines, bad ones included. Every
input line is answered exactly once, greedy results equal the single-process run's, a rerun
serves nothing twice, and a replica killed mid-run is restarted and the job still completes."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import ray.data   # in the test extra, so these tests run wherever the suite does (CI included)

from cli import run_cli, write_jsonl
from pipemax import ray_batch
from pipemax.shards import done, read_lines

FLAGS = ["--device", "cpu", "--threads", "1", "--num-cpus", "2", "--cpus-per-replica", "0.5",
         "--replicas", "2", "--batch-size", "40"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory) -> Path:
    rows = []
    for i in range(240):
        if i % 37 == 3:
            rows.append("{not json")
        elif i % 41 == 5:
            rows.append({"custom_id": f"q{i}", "url": "/v1/completions",
                         "body": {"prompt": "x", "temperature": 9}})
        elif i % 53 == 7:
            rows.append({"prompt": f"no id {i}", "max_tokens": 3, "temperature": 0})
        else:
            rows.append({"custom_id": f"q{i}", "url": "/v1/completions",
                         "body": {"prompt": f"Item {i}: the", "max_tokens": 4 + i % 5,
                                  "temperature": 0, "return_token_ids": True}})
    return write_jsonl(tmp_path_factory.mktemp("ray") / "in.jsonl", rows)


@pytest.fixture(scope="module")
def single(requests_file, tmp_path_factory) -> Counter:
    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    r = run_cli(["--input", str(requests_file), "--output", str(out), "--no-socket"])
    assert r.returncode == 0, r.stderr
    return _answers(out.read_bytes().splitlines())


def _answers(lines) -> Counter:
    """(custom_id, error code, token ids) of each result line, counted."""
    c = Counter()
    for raw in lines:
        d = json.loads(raw)
        err = d["error"] and d["error"]["code"]
        toks = None if err else tuple(d["response"]["body"]["choices"][0].get("token_ids", ()))
        c[(d["custom_id"], err, toks)] += 1
    return c


def _replicas() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"MapBatches(PipemaxLLM)" in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def test_two_replicas_answer_every_line_once(local_ray, requests_file, single, tmp_path):
    out = tmp_path / "out"
    assert ray_batch.main(["--input", str(requests_file), "--output", str(out), *FLAGS]) == 0
    assert sorted(done(out)) == list(range(240))
    assert _answers(read_lines(out)) == single           # same lines, greedy tokens included
    assert sum(single.values()) == 240 and sum(v for k, v in single.items() if k[1]) > 10
    # a rerun finds everything answered and serves nothing
    before = sorted(p.name for p in out.iterdir())
    assert ray_batch.main(["--input", str(requests_file), "--output", str(out), *FLAGS]) == 0
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.alone
def test_a_killed_replica_is_retried_and_a_rerun_completes(local_ray, requests_file, single,
                                                           tmp_path):
    out = tmp_path / "out"
    # half the answers from an earlier (interrupted) run: the rerun must serve only the rest
    killed = []

    def kill_one_mid_run():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if out.is_dir() and any(out.glob("part-*.jsonl")) and len(_replicas()) == 2:
                pid = _replicas()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    t = threading.Thread(target=kill_one_mid_run, daemon=True)
    t.start()
    assert ray_batch.main(["--input", str(requests_file), "--output", str(out), *FLAGS]) == 0
    t.join(5)
    assert killed, "no replica was killed"
    assert sorted(done(out)) == list(range(240))
    assert _answers(read_lines(out)) == single
    # an interrupted run: drop some shards, the rerun serves exactly those lines again
    shards = sorted(out.glob("part-*.jsonl"))
    for s in shards[::2]:
        s.unlink()
    assert len(done(out)) < 240
    assert ray_batch.main(["--input", str(requests_file), "--output", str(out), *FLAGS]) == 0
    assert _answers(read_lines(out)) == single


def test_bad_flags_stop_before_ray(tmp_path, requests_file, capsys):
    assert ray_batch.main(["--input", str(requests_file), "--output", str(tmp_path / "o"),
                           "--gpus", "2"]) == 2
    assert "--gpus-per-replica" in capsys.readouterr().err
    assert ray_batch.main(["--input", str(tmp_path / "missing"), "--output",
                           str(tmp_path / "o")]) == 2
    assert "cannot read input file" in capsys.readouterr().err
