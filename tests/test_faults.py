"""Faults: kill -9 of a stage or of the driver, and a shutdown command, at random moments; the
run stops within 10 s naming what died, /dev/shm is clean, and a restart with the same --output
completes the job with every custom_id exactly once. Bad input: one error line per bad line,
every good line served."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import ROOT, read_results, reap, run_cli, spawned_children, wait_first_result, write_jsonl
from pipemax.ops.framing import request

N = 200
MAX_TOKENS = 32


def _rows():
    return [{"custom_id": f"k{i}", "prompt": [3 + (7 * i) % 400, 5, 6, 7], "max_tokens": MAX_TOKENS,
             "ignore_eos": True, "temperature": 0} for i in range(N)]


def _start(inp: Path, out: Path, sock: Path, stages: int = 3) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipemax.launch", "--device", "cpu",
                             "--threads", "1", "--gpus", str(stages), "--input", str(inp),
                             "--output", str(out), "--max-num-seqs", "16", "--socket", str(sock)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)




def _shm(prefix: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)
            or n.startswith("sem." + prefix)]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _finish_and_check(inp: Path, out: Path, sock: Path, first: dict) -> None:
    """Restart with the same output (and socket path): every id exactly once, all served."""
    p = run_cli(["--gpus", "3", "--input", str(inp), "--output", str(out), "--socket", str(sock)])
    assert p.returncode == 0, p.stderr
    if first:
        assert f"resuming: {len(first)} request(s)" in p.stderr, p.stderr
    final = read_results(out)                               # fails on a custom_id twice
    assert set(final) == {f"k{i}" for i in range(N)}
    for cid, line in final.items():
        assert line["error"] is None, line
        assert line["response"]["body"]["usage"]["completion_tokens"] == MAX_TOKENS
        if cid in first:
            assert line == first[cid]                       # kept as it was, not redone
    assert not sock.exists()
    return p


@pytest.mark.alone
@pytest.mark.parametrize("victim", ["stage", "driver", "shutdown"])
def test_stop_at_a_random_moment_then_restart_completes_exactly_once(tmp_path, victim):
    seed = int(time.time() * 1000) % 100000
    rng = random.Random(seed)
    inp = write_jsonl(tmp_path / "in.jsonl", _rows())
    out, sock = tmp_path / "out.jsonl", tmp_path / "ctl.sock"
    proc = _start(inp, out, sock)
    why = f"(seed {seed})"
    try:
        pids = spawned_children(proc.pid, 3)
        wait_first_result(proc, out)
        time.sleep(rng.uniform(0.0, 0.5))
        assert proc.poll() is None, f"the run ended before the fault {why}"
        t0 = time.monotonic()
        if victim == "stage":
            stage = rng.randrange(3)
            os.kill(pids[stage], signal.SIGKILL)
        elif victim == "driver":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            assert request(str(sock), {"cmd": "shutdown"})["ok"]
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 10, why
        # every stage process is gone within 10 s (after a driver kill they notice by
        # themselves)
        while any(_alive(p) for p in pids):
            assert time.monotonic() - t0 < 10, why
            time.sleep(0.05)
    finally:
        reap(proc)
    prefix = f"pipemax-{proc.pid}-"
    if victim == "stage":
        assert proc.returncode == 1, (err, why)
        assert f"stage {stage} (pid {pids[stage]}) exited with code -9" in err, (err, why)
        assert not _shm(prefix) and not sock.exists()
    elif victim == "driver":
        assert proc.returncode == -signal.SIGKILL
        assert _shm(prefix), "a killed driver cannot clean up; the next start does"
        assert sock.exists()
    else:
        assert proc.returncode == 0, (err, why)
        assert "shutdown by a control command" in err
        assert not _shm(prefix) and not sock.exists()
    whole = out.read_text().split("\n")[:-1]               # a torn last line is redone
    first = {d["custom_id"]: d for d in map(json.loads, whole)}
    assert len(first) == len(whole)
    assert len(first) < N, f"the run was complete before the fault {why}"
    p = _finish_and_check(inp, out, sock, first)
    if victim == "driver":
        # the restart names the dead run it cleaned up after
        assert f"removed shared memory left by dead runs {proc.pid}-" in p.stderr, p.stderr
    assert not _shm(prefix)


def test_bad_lines_get_one_error_each_and_every_good_line_is_served(tmp_path):
    good = [{"custom_id": f"g{i}", "prompt": f"Good prompt {i}", "max_tokens": 3,
             "temperature": 0} for i in range(6)]
    bad = [
        ("bad_json", b'{"custom_id": "j1", "prompt": "x", ', "invalid_json"),
        ("bad_json2", b"not json at all", "invalid_json"),
        ("unknown_url", json.dumps({"custom_id": "u1", "method": "POST", "url": "/v1/embeddings",
                                    "body": {"input": "x"}}).encode(), "invalid_url"),
        ("no_body", json.dumps({"custom_id": "m1", "url": "/v1/completions"}).encode(),
         "invalid_request"),
        ("no_prompt", json.dumps({"custom_id": "m2", "url": "/v1/completions",
                                  "body": {"max_tokens": 3}}).encode(), "invalid_request"),
        ("neither", json.dumps({"custom_id": "m3", "text": "hello"}).encode(), "invalid_request"),
        ("wrong_type", json.dumps({"custom_id": "t1", "prompt": "x", "max_tokens": "3"}).encode(),
         "invalid_parameter"),
        ("wrong_type2", json.dumps({"custom_id": "t2", "prompt": {"a": 1}}).encode(),
         "invalid_parameter"),
        ("id_type", json.dumps({"custom_id": 5, "prompt": "x"}).encode(), "invalid_request"),
        ("empty_prompt", json.dumps({"custom_id": "e1", "prompt": []}).encode(),
         "invalid_request"),
        ("empty_messages", json.dumps({"custom_id": "e2", "messages": []}).encode(),
         "invalid_parameter"),
        ("long_prompt", json.dumps({"custom_id": "l1", "prompt": "word " * 400}).encode(),
         "prompt_too_long"),
        ("utf8", b'{"custom_id": "x\xff\xfe", "prompt": "x"}', "invalid_encoding"),
        ("dup", json.dumps({"custom_id": "g2", "prompt": "again"}).encode(),
         "duplicate_custom_id"),
        ("dup2", json.dumps({"custom_id": "g2", "prompt": "and again"}).encode(),
         "duplicate_custom_id"),
    ]
    huge = {"custom_id": "huge", "prompt": "Hi", "max_tokens": 10 ** 12, "temperature": 0,
            "ignore_eos": True}
    blank = {"custom_id": "blank", "prompt": "", "max_tokens": 2, "temperature": 0}
    lines = [json.dumps(g).encode() for g in good[:3]] + [b for _, b, _ in bad] + \
        [json.dumps(huge).encode(), json.dumps(blank).encode()] + \
        [json.dumps(g).encode() for g in good[3:]]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    out, errs = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    args = ["--gpus", "3", "--input", str(inp), "--output", str(out), "--errors", str(errs),
            "--max-model-len", "48", "--no-socket"]
    p = run_cli(args)
    assert p.returncode == 0, p.stderr
    served = read_results(out)
    assert set(served) == {f"g{i}" for i in range(6)} | {"huge", "blank"}
    assert all(v["error"] is None for v in served.values())
    # a huge max_tokens is clamped to the context: generation runs to max_model_len
    usage = served["huge"]["response"]["body"]["usage"]
    assert usage["total_tokens"] == 48 and served["huge"]["response"]["body"]["choices"][0][
        "finish_reason"] == "length"
    assert served["blank"]["response"]["body"]["usage"]["prompt_tokens"] == 1   # just BOS
    err_lines = [json.loads(l) for l in errs.read_text().splitlines()]
    assert sorted(e["error"]["code"] for e in err_lines) == sorted(c for _, _, c in bad)
    assert sum(1 for e in err_lines if e["custom_id"] == "g2") == 2
    assert p.stdout.count("requests 8 ok, 15 failed") == 1, p.stdout
    # started again: every line, good or bad, is answered already
    before = (out.read_bytes(), errs.read_bytes())
    p = run_cli(args)
    assert p.returncode == 0 and "requests 0 ok, 0 failed" in p.stdout, p.stdout + p.stderr
    assert (out.read_bytes(), errs.read_bytes()) == before
