"""Soak: a few thousand tiny requests through 3 CPU stages, twice: every id once, all served,
the same greedy outputs both times; the control socket is polled all along."""
from __future__ import annotations

import os
import threading

from cli import read_results, run_cli, write_jsonl
from pipemax.ops.framing import request

N = 3000


def test_thousands_of_tiny_requests_twice_give_the_same_outputs(tmp_path):
    rows = []
    for i in range(N):
        if i % 3 == 0:
            rows.append({"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": f"Say {i}"}],
                                  "max_tokens": 3, "temperature": 0}})
        else:
            rows.append({"custom_id": f"s{i}", "prompt": f"Count {i} and", "max_tokens": 1 + i % 4,
                         "temperature": 0, "return_token_ids": True})
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}.jsonl"
        sock = str(tmp_path / f"s{k}.sock")
        polls, stop = [], threading.Event()

        def poll():
            while not stop.is_set():
                try:
                    polls.append(request(sock, {"cmd": "status"}, timeout=5)["ok"])
                except OSError:
                    pass
                stop.wait(0.05)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        try:
            p = run_cli(["--gpus", "3", "--input", str(inp), "--output", str(out),
                         "--socket", sock, "--max-num-seqs", "128"], timeout=120)
        finally:
            stop.set()
            t.join()
        assert p.returncode == 0, p.stderr
        assert f"requests {N} ok, 0 failed" in p.stdout
        assert polls and all(polls)
        assert not os.path.exists(sock)
        outs.append(read_results(out))                   # fails on a custom_id twice
    a, b = outs
    assert set(a) == set(b) == {f"s{i}" for i in range(N)}
    for cid in a:
        ca, cb = a[cid]["response"]["body"]["choices"][0], b[cid]["response"]["body"]["choices"][0]
        assert ca.get("text", ca.get("message")) == cb.get("text", cb.get("message")), cid
        assert ca.get("token_ids") == cb.get("token_ids"), cid
        assert a[cid]["response"]["body"]["usage"] == b[cid]["response"]["body"]["usage"]
