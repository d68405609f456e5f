"""No input ends a job: sampling values at the edges of their types, an output that is the input
or is held by another run, SIGTERM to the whole process group, a full disk, an output removed
mid-run, an input removed before its job starts. Runs on the built-in tiny model."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli import (ROOT, output_of, read_results, reap, run_cli, spawned_children, wait_first_result,
                 write_jsonl)
from pipemax.ops.framing import request
from pipemax.job import JobError, check_paths
from pipemax.requests import Request, RequestError, SamplingParams, parse_line
from pipemax import results
from pipemax.results import OutputError, ResultWriter, error_line
from pipemax.sequence import Sequence
from pipemax.stages.sampler import sample

VOCAB = 512          # the built-in tiny model's


def _start(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipemax.launch", "--device", "cpu",
                             "--threads", "1", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _long_rows(n: int, max_tokens: int) -> list[dict]:
    return [{"custom_id": f"r{i}", "prompt": [3 + (7 * i) % 400, 5, 6], "max_tokens": max_tokens,
             "ignore_eos": True, "temperature": 0} for i in range(n)]


def _errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [l for l in stderr.splitlines() if l.startswith("pipemax: error:")]


# ---- 1, 2: sampling values at the edges of the types the engine builds -----------------------

EDGE_ROWS = [
    {"custom_id": "seed-1", "prompt": "hello", "max_tokens": 6, "seed": -1},
    {"custom_id": "seed-min", "prompt": "hello", "max_tokens": 6, "seed": -2 ** 63},
    {"custom_id": "seed-max", "prompt": "hello", "max_tokens": 6, "seed": 2 ** 63 - 1},
    {"custom_id": "k-huge", "prompt": "hello", "max_tokens": 6, "seed": 9, "top_k": 2 ** 70},
    {"custom_id": "k-vocab", "prompt": "hello", "max_tokens": 6, "seed": 9, "top_k": VOCAB},
    {"custom_id": "k-off", "prompt": "hello", "max_tokens": 6, "seed": 9},
    {"custom_id": "cold", "prompt": "hello", "max_tokens": 6, "temperature": 1e-40},
    {"custom_id": "greedy", "prompt": "hello", "max_tokens": 6, "temperature": 0},
    {"custom_id": "after", "prompt": "hello", "max_tokens": 2},
]


def _edge_run(tmp: Path) -> dict[str, dict]:
    inp = write_jsonl(tmp / "in.jsonl", EDGE_ROWS)
    p = run_cli(["--input", str(inp), "--output", str(tmp / "out.jsonl")])
    assert p.returncode == 0, p.stderr
    got = read_results(tmp / "out.jsonl")
    assert set(got) == {r["custom_id"] for r in EDGE_ROWS}
    for cid, line in got.items():
        assert line["error"] is None, line
    return {cid: line["response"]["body"]["choices"][0]["text"] for cid, line in got.items()}


@pytest.fixture(scope="module")
def edge_texts(tmp_path_factory):
    return _edge_run(tmp_path_factory.mktemp("edges"))


def test_negative_seeds_are_served_and_give_the_same_tokens_every_run(edge_texts, tmp_path):
    again = _edge_run(tmp_path)
    for cid in ("seed-1", "seed-min", "seed-max"):
        assert again[cid] == edge_texts[cid]
    assert len({edge_texts[c] for c in ("seed-1", "seed-min", "seed-max")}) > 1
    # the rule: the generator is keyed by seed mod 2**64 (-1 is the key 2**64 - 1)
    req = Request(0, "x", "completion", (5,), SamplingParams(max_tokens=1), False, None)
    draws = lambda seed: Sequence(req, seed).rng.random(4).tolist()
    assert draws(-1) == draws(2 ** 64 - 1) != draws(2 ** 63 - 1)


def test_a_top_k_beyond_the_vocabulary_is_all_of_it(edge_texts):
    assert edge_texts["k-huge"] == edge_texts["k-off"] == edge_texts["k-vocab"]
    r = parse_line(b'{"prompt": [5], "top_k": 1180591620717411303424}', 0, None,
                   max_model_len=64, vocab_size=VOCAB)
    assert r.params.top_k == 0


def test_a_tiny_temperature_is_greedy_and_no_nan_picks_a_token(edge_texts):
    assert edge_texts["cold"] == edge_texts["greedy"]
    r = parse_line(b'{"prompt": [5], "temperature": 1e-40}', 0, None, max_model_len=64,
                   vocab_size=VOCAB)
    assert r.params.temperature == 0 and r.params.greedy
    # the sampler itself, sent a temperature whose scaled logits overflow: the greedy token
    logits = torch.full((2, 16), -3.0)
    logits[0, 7] = 4.0
    logits[1, 11] = 2.0
    out = sample(logits, torch.tensor([1e-40, 1e-45]), torch.ones(2), torch.zeros(2, dtype=torch.int64),
                 torch.tensor([0.5, 0.9]), 0)
    assert out.token_ids.tolist() == [7, 11]


# ---- 3: an output that is the input ----------------------------------------------------------

def test_an_output_that_is_the_input_is_refused(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": [5, 6], "max_tokens": 2}] * 3)
    before = inp.read_bytes()
    os.link(inp, tmp_path / "same.jsonl")            # another name, the same file
    for flags in (["--output", str(inp)], ["--output", str(tmp_path / "same.jsonl")],
                  ["--output", str(tmp_path / "o.jsonl"), "--errors", str(inp)]):
        p = run_cli(["--input", str(inp), *flags], timeout=60)
        assert p.returncode == 2, p.stderr
        (line,) = _errors(p.stderr)
        assert "is the input file" in line, line
        assert inp.read_bytes() == before
    with pytest.raises(JobError, match="is the input file"):   # ctl submit X X
        check_paths(str(inp), str(inp), None)


# ---- 4: SIGTERM to the process group ---------------------------------------------------------

def test_sigterm_to_the_process_group_drains(tmp_path):
    n, max_tokens = 200, 48
    inp = write_jsonl(tmp_path / "in.jsonl", _long_rows(n, max_tokens))
    out = tmp_path / "out.jsonl"
    proc = _start(["--gpus", "2", "--input", str(inp), "--output", str(out), "--max-num-seqs",
                   "8", "--no-socket"], start_new_session=True)
    try:
        pids = spawned_children(proc.pid, 2)
        wait_first_result(proc, out)
        os.killpg(proc.pid, signal.SIGTERM)        # what timeout(1) does: the launcher,
        os.killpg(proc.pid, signal.SIGTERM)        # then its whole group: counts once
        stdout, err = proc.communicate(timeout=120)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert "draining (SIGTERM)" in err and "interrupted" not in err, err
    done = read_results(out)
    assert 0 < len(done) < n
    assert all(d["response"]["body"]["usage"]["completion_tokens"] == max_tokens
               for d in done.values())
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


# ---- 5: two runs on one output ---------------------------------------------------------------

def test_a_second_run_on_a_held_output_is_refused_and_resume_stays_exactly_once(tmp_path):
    n = 60
    inp = write_jsonl(tmp_path / "in.jsonl", _long_rows(n, 32))
    out = tmp_path / "out.jsonl"
    proc = _start(["--gpus", "2", "--input", str(inp), "--output", str(out), "--max-num-seqs",
                   "4", "--no-socket"])
    try:
        wait_first_result(proc, out)
        p = run_cli(["--input", str(inp), "--output", str(out), "--no-socket"], timeout=60)
        assert proc.poll() is None          # the first run is still going
        os.kill(proc.pid, signal.SIGTERM)   # drains: some served, the rest left for a resume
        _, err = proc.communicate(timeout=120)
    finally:
        reap(proc)
    assert p.returncode == 2, p.stderr
    (line,) = _errors(p.stderr)
    assert str(out) in line and "in use by another run" in line, line
    assert proc.returncode == 0, err
    first = read_results(out)
    assert 0 < len(first) < n
    p = run_cli(["--input", str(inp), "--output", str(out), "--no-socket"])
    assert p.returncode == 0, p.stderr
    final = read_results(out)                       # fails on a custom_id twice
    assert set(final) == {f"r{i}" for i in range(n)}


# ---- 6: a full disk --------------------------------------------------------------------------

def test_a_full_disk_is_one_error_and_leaves_whole_lines(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    w = ResultWriter(path)
    lines = [error_line(RequestError(i, f"c{i}", "invalid_request", "x" * 50)) for i in range(20)]
    w.write(lines[0])
    room = [500]
    real = results._write_all

    def fills_up(f, data):      # the write that crosses the room puts part of its line down
        if len(data) > room[0]:
            real(f, data[:room[0]])
            room[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        room[0] -= len(data)
        real(f, data)

    monkeypatch.setattr(results, "_write_all", fills_up)
    with pytest.raises(OutputError) as e:
        for line in lines[1:]:
            w.write(line)
    msg = str(e.value)
    assert "(the filesystem is full)" in msg and "\n" not in msg
    written = w.counts["error"]
    assert 1 < written < 20
    assert f"the {written} line(s) this run wrote before are whole on disk" in msg
    with pytest.raises(OutputError):       # it stays failed; nothing is retried
        w.write(lines[-1])
    w.close()                               # and closing raises nothing
    got = read_results(path)                # no torn line left
    assert len(got) == written and path.read_bytes().endswith(b"\n")


def test_a_full_filesystem_stops_the_run_with_one_line(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}); "
                    "test_a_full_disk_is_one_error_and_leaves_whole_lines covers the writer")
    try:
        inp = write_jsonl(tmp_path / "in.jsonl", _long_rows(200, 24))
        out = mnt / "out.jsonl"
        p = run_cli(["--input", str(inp), "--output", str(out), "--no-socket"])
        assert p.returncode == 1, p.stderr
        (line,) = _errors(p.stderr)
        assert "(the filesystem is full)" in line and str(out) in line, line
        got = read_results(out)                       # whole lines only
        assert 0 < len(got) < 200
        assert f"the {len(got)} line(s) this run wrote before are whole on disk" in line
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ---- 7: an input removed before its job starts; a batch input moved during load ---------------

def test_a_job_whose_input_went_away_fails_alone(tmp_path):
    sock = str(tmp_path / "svc.sock")
    # job a runs long enough (960 steps at 4 sequences, seconds under load) that
    # b's input is removed while b is still queued behind it
    a = write_jsonl(tmp_path / "a.jsonl", _long_rows(40, 96))
    b = write_jsonl(tmp_path / "b.jsonl", _long_rows(5, 2))
    c = write_jsonl(tmp_path / "c.jsonl", _long_rows(5, 2))
    proc = _start(["--gpus", "2", "--serve", "--socket", sock, "--max-num-seqs", "4"])
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, output_of(proc)
            time.sleep(0.05)
        sub = lambda i, o: request(sock, {"cmd": "submit", "input": str(i), "output": str(o)})
        assert sub(a, tmp_path / "a.out")["ok"]
        assert sub(b, tmp_path / "b.out")["ok"]
        b.unlink()                                   # between submit and its start
        assert sub(c, tmp_path / "c.out")["ok"]
        while True:
            jobs = request(sock, {"cmd": "jobs"})["jobs"]   # a snapshot of a step boundary:
            if len(jobs) == 3 and all(j["state"] not in ("queued", "running") for j in jobs):
                break                                       # c may not be in it yet
            assert proc.poll() is None and time.monotonic() < deadline, output_of(proc)
            time.sleep(0.1)
        assert [j["state"] for j in jobs] == ["done", "failed", "done"], jobs
        assert "No such file" in jobs[1]["message"], jobs[1]
        assert request(sock, {"cmd": "drain"})["ok"]
        _, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert len(read_results(tmp_path / "a.out")) == 40
    assert len(read_results(tmp_path / "c.out")) == 5


def test_a_batch_input_moved_away_during_load_is_served_from_the_file_opened(tmp_path):
    n = 20
    inp = write_jsonl(tmp_path / "in.jsonl", _long_rows(n, 4))
    out = tmp_path / "out.jsonl"
    proc = _start(["--gpus", "2", "--input", str(inp), "--output", str(out), "--no-socket"])
    try:
        spawned_children(proc.pid, 2)                # the stages are loading
        inp.rename(tmp_path / "moved.jsonl")
        _, err = proc.communicate(timeout=120)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert not _errors(err)
    assert set(read_results(out)) == {f"r{i}" for i in range(n)}


# ---- an output removed mid-run ---------------------------------------------------------------

def test_an_output_removed_mid_run_stops_with_one_line(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", _long_rows(200, 48))
    out = tmp_path / "out.jsonl"
    proc = _start(["--gpus", "2", "--input", str(inp), "--output", str(out), "--max-num-seqs",
                   "8", "--no-socket"])
    try:
        wait_first_result(proc, out)
        out.unlink()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 20
    finally:
        reap(proc)
    assert proc.returncode == 1, err
    (line,) = _errors(err)
    assert str(out) in line and "was removed or replaced" in line, line
