"""Service mode: the model stays loaded, jobs come through the socket one after another."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from cli import ROOT, read_results, reap, write_jsonl
from pipemax.ops.framing import request


def _rows(prefix: str, n: int, max_tokens: int = 4):
    return [{"custom_id": f"{prefix}{i}", "prompt": [3 + i % 60, 7, 9], "max_tokens": max_tokens,
             "temperature": 0, "ignore_eos": True} for i in range(n)]


def _wait(pred, timeout: float = 60.0, proc=None):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _status(sock):
    try:
        return request(sock, {"cmd": "status"}, timeout=5)
    except OSError:
        return None


def test_serve_takes_jobs_one_after_another(tmp_path):
    sock = str(tmp_path / "svc.sock")
    a = write_jsonl(tmp_path / "a.jsonl", _rows("a", 40))
    b = write_jsonl(tmp_path / "b.jsonl", _rows("b", 25) + ["{broken"])
    c = write_jsonl(tmp_path / "c.jsonl", _rows("c", 30, max_tokens=30))
    d = write_jsonl(tmp_path / "d.jsonl", _rows("d", 5))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipemax.launch", "--device", "cpu",
                             "--threads", "1", "--gpus", "2", "--serve", "--socket", sock,
                             "--max-num-seqs", "8"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        st = _wait(lambda: (s := _status(sock)) and s["phase"] == "idle" and s, proc=proc)
        assert st["mode"] == "serve" and st["jobs"] == []
        sub = lambda inp, out, **kw: request(sock, {"cmd": "submit", "input": str(inp),
                                                   "output": str(out), **kw})
        r = sub(a, tmp_path / "a.out")
        assert r["ok"] and r["job"] == 1, r
        r = sub(b, tmp_path / "b.out", errors=str(tmp_path / "b.err"))
        assert r["ok"] and r["job"] == 2, r
        bad = sub(tmp_path / "missing.jsonl", tmp_path / "x.out")
        assert not bad["ok"] and "cannot read input file" in bad["error"]
        bad = sub("relative.jsonl", tmp_path / "x.out")
        assert not bad["ok"] and "absolute" in bad["error"]
        _wait(lambda: all(j["state"] == "done" for j in _status(sock)["jobs"]), proc=proc)
        assert len(read_results(tmp_path / "a.out")) == 40
        assert len(read_results(tmp_path / "b.out")) == 25
        errs = [json.loads(l) for l in (tmp_path / "b.err").read_text().splitlines()]
        assert [e["error"]["code"] for e in errs] == ["invalid_json"]
        # the same job again: everything is answered already, nothing is added
        before = (tmp_path / "a.out").read_bytes()
        r = sub(a, tmp_path / "a.out")
        assert r["ok"] and r["job"] == 3
        _wait(lambda: _status(sock)["jobs"][-1]["state"] == "done", proc=proc)
        j3 = _status(sock)["jobs"][-1]
        assert j3["resumed"] == 40 and j3["ok"] == 0 and j3["done"] == j3["total"] == 40
        assert (tmp_path / "a.out").read_bytes() == before
        # paused: job 4 starts but waits; job 5 stays queued and can be cancelled
        assert request(sock, {"cmd": "pause"})["ok"]
        assert sub(c, tmp_path / "c.out")["job"] == 4
        assert sub(d, tmp_path / "d.out")["job"] == 5
        dup = sub(d, tmp_path / "c.out")
        assert not dup["ok"] and "is the output of job 4" in dup["error"]
        _wait(lambda: _status(sock)["jobs"][3]["state"] == "running", proc=proc)
        r = request(sock, {"cmd": "cancel", "job": 4})
        assert not r["ok"] and "running" in r["error"]
        r = request(sock, {"cmd": "cancel", "job": 5})
        assert r["ok"], r
        assert request(sock, {"cmd": "jobs"})["jobs"][4]["state"] == "cancelled"
        time.sleep(0.3)
        assert _status(sock)["requests"]["done"] == 0          # paused
        assert request(sock, {"cmd": "resume"})["ok"]
        _wait(lambda: _status(sock)["requests"]["done"] > 0, proc=proc)
        # systemd's stop: SIGTERM drains the running job and ends the service with 0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert "draining (SIGTERM)" in err and "service drained" in err, err
    assert not os.path.exists(sock)
    assert not (tmp_path / "d.out").exists()
    got = read_results(tmp_path / "c.out")
    assert 0 < len(got) <= 30
