"""Resumable jobs: a run started again with the same --output skips what is answered, repairs a
torn last line, and ends with exactly one answer per input line."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from cli import read_results, run_cli, write_jsonl
from pipemax.job import Job
from pipemax.requests import Parser, Request, parse_line
from pipemax.results import error_line, ok_line
from pipemax.resume import count_requests, line_key, repair, scan

VOCAB = 512

# every kind of line: ok, bad JSON, invalid UTF-8, no custom_id, non-string custom_id,
# duplicates (of ok and of bad lines), blank lines, a custom_id equal to a generated one
RAW_LINES = [
    b'{"custom_id": "a", "prompt": [5, 6], "max_tokens": 2}',
    b'{not json',
    b'{"prompt": [7, 8], "max_tokens": 2}',                       # request-3
    b'{"custom_id": "b", "prompt": [9], "max_tokens": 2}',
    b'\xff\xfe bad utf-8',
    b'',
    b'{"custom_id": "a", "prompt": [1, 2], "max_tokens": 2}',     # duplicate of a
    b'{"custom_id": 17, "prompt": [1], "max_tokens": 2}',         # custom_id not a string
    b'{"custom_id": "c", "url": "/v1/embeddings", "body": {}}',   # error with an id
    b'{"custom_id": "request-3", "prompt": [3], "max_tokens": 2}',  # duplicate of a made id
    b'{"custom_id": "a", "prompt": [4], "max_tokens": 2}',        # second duplicate of a
    b'[1, 2, 3]',
    b'{"custom_id": "c", "prompt": [4], "max_tokens": 2}',        # duplicate of an error line
    b'\xef\xbb\xbf{"custom_id": "d", "prompt": [4], "max_tokens": 2}',  # BOM
    b'{"custom_id": "e", "prompt": [4, 4, 4], "max_tokens": 2}',
] + [b'{"custom_id": "f%d", "prompt": [%d], "max_tokens": 2}' % (i, 3 + i) for i in range(15)]


def _write_input(path):
    path.write_bytes(b"\n".join(RAW_LINES) + b"\n")
    return path


def test_line_key_matches_the_parser():
    for index, raw in enumerate(RAW_LINES):
        if not raw.strip():
            continue
        r = parse_line(raw, index, None, max_model_len=64, vocab_size=VOCAB)
        assert line_key(raw, index) == r.custom_id, raw


def test_count_requests_counts_what_read_requests_yields(tmp_path):
    p = _write_input(tmp_path / "in.jsonl")
    with open(p, "ab") as f:
        f.write(b"   \n\r\n" + b'{"prompt": [1]}')          # blank lines, no final newline
    from pipemax.requests import read_requests
    assert count_requests(p) == sum(1 for _ in read_requests(p)) == len(RAW_LINES)


def test_repair_cuts_only_a_torn_last_line(tmp_path):
    p = tmp_path / "o.jsonl"
    assert repair(p) == 0                                    # missing file
    p.write_bytes(b'{"a":1}\n{"b":2}\n')
    assert repair(p) == 0 and p.read_bytes() == b'{"a":1}\n{"b":2}\n'
    p.write_bytes(b'{"a":1}\n{"b":2}\n{"custom_id": "x", "resp')
    assert repair(p) == len(b'{"custom_id": "x", "resp')
    assert p.read_bytes() == b'{"a":1}\n{"b":2}\n'
    p.write_bytes(b'{"only": "torn"')
    assert repair(p) == len(b'{"only": "torn"') and p.read_bytes() == b""
    p.write_bytes(b"x" * 200_000)                            # longer than one read chunk
    repair(p)
    assert p.read_bytes() == b""


def new_job(*paths) -> Job:
    return Job(*paths, parser=Parser(None, max_model_len=64, vocab_size=VOCAB))


class FakeEngine:
    """What the engine does with the job's requests, without a model: error lines written at
    intake, in input order; results written later in any order."""

    def __init__(self, job: Job, rng: random.Random):
        self.job, self.rng = job, rng
        self.requests = job.requests()

    def run(self, budget: int | None = None) -> bool:
        """Serve until ``budget`` lines are written (a crash), or the end. True if finished."""
        pending: list[Request] = []
        written = 0

        def write(line):
            nonlocal written
            if budget is not None and written >= budget:
                raise _Crash
            self.job.write(line)
            written += 1

        try:
            for r in self.requests:
                if isinstance(r, Request):
                    pending.append(r)
                else:
                    write(error_line(r))
                while pending and self.rng.random() < 0.4:        # finish some, any order
                    write(ok_line(pending.pop(self.rng.randrange(len(pending))), {"x": 1}))
            while pending:
                write(ok_line(pending.pop(self.rng.randrange(len(pending))), {"x": 1}))
        except _Crash:
            return False
        return True


class _Crash(Exception):
    pass


def _answers(*paths) -> Counter:
    c = Counter()
    for p in paths:
        for line in p.read_text().splitlines():
            d = json.loads(line)
            c[(d["custom_id"], (d["error"] or {}).get("code"))] += 1
    return c


@pytest.mark.parametrize("split_errors", [False, True])
def test_crash_at_every_point_then_resume_answers_each_line_once(tmp_path, split_errors):
    inp = _write_input(tmp_path / "in.jsonl")
    # the reference: one uninterrupted run
    ref_out = tmp_path / "ref.jsonl"
    job = new_job(str(inp), str(ref_out))
    job.open()
    assert FakeEngine(job, random.Random(0)).run()
    job.close("done")
    expected = _answers(ref_out)
    n = sum(expected.values())
    assert n == len([r for r in RAW_LINES if r.strip()])
    for crash_after in range(n + 1):
        rng = random.Random(crash_after)
        out = tmp_path / f"o{crash_after}.jsonl"
        errs = tmp_path / f"e{crash_after}.jsonl" if split_errors else None
        runs = 0
        budget = crash_after
        while True:
            runs += 1
            job = new_job(str(inp), str(out), str(errs) if errs else None)
            job.open()
            assert job.total == n
            done = FakeEngine(job, rng).run(budget)
            job.close()
            if done:
                break
            # the crash cut the next line in the middle
            with open(out, "ab") as f:
                f.write(b'{"id":"batch_req_1","custom_id":"f1","resp')
            budget = rng.randrange(1, 6)                     # crash again soon, maybe
            assert runs < 100
        files = [out] + ([errs] if errs and errs.exists() else [])
        assert _answers(*files) == expected, crash_after
        if split_errors and errs.exists():
            assert all(json.loads(l)["error"] for l in errs.read_text().splitlines())


def test_scan_reads_ok_lines_without_their_body(tmp_path):
    out = tmp_path / "o.jsonl"
    req = Request(0, 'we"ird\u2028id', "completion", (1,), None, False, None)
    from pipemax.results import encode_line
    with open(out, "wb") as f:
        f.write(encode_line(ok_line(req, {"text": "x" * 10000})))
        f.write(b"not a result line\n")
    r = scan(out, out)                          # a path given twice is read once
    assert r.first == {'we"ird\u2028id'} and r.lines == 1 and r.unreadable == 1


def test_cli_resume_skips_answered_and_rewrites_a_torn_line(tmp_path):
    """The tiny built-in model: a full run, then the output cut to a few lines plus a torn
    one and run again: the same answers, each once; a third run adds nothing."""
    rows = [{"custom_id": f"q{i}", "prompt": f"Tell me about {i}", "max_tokens": 3,
             "temperature": 0} for i in range(20)]
    rows.insert(5, "{bad json")
    rows.insert(9, {"custom_id": "q3", "prompt": "dup", "max_tokens": 2})
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    ref, out, errs = tmp_path / "ref.jsonl", tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    p = run_cli(["--gpus", "2", "--input", str(inp), "--output", str(ref), "--no-socket"])
    assert p.returncode == 0, p.stderr
    ref_lines = ref.read_text().splitlines()
    assert len(ref_lines) == 22
    oks = [l for l in ref_lines if json.loads(l)["error"] is None]
    bad = [l for l in ref_lines if json.loads(l)["error"] is not None]
    out.write_text("\n".join(oks[:7]) + "\n" + oks[7][:40])            # torn 8th line
    errs.write_text(bad[0] + "\n")
    p = run_cli(["--gpus", "2", "--input", str(inp), "--output", str(out), "--errors",
                 str(errs), "--no-socket", "--progress", "log", "--progress-interval", "0.01"])
    assert p.returncode == 0, p.stderr
    assert "torn last line" in p.stderr and "resuming: 8 request(s)" in p.stderr, p.stderr
    assert "requests 13 ok, 1 failed" in p.stdout
    assert "22/22 requests" in p.stderr                                # progress log line
    got = read_results(out)
    assert len(got) == 20 and all(v["error"] is None for v in got.values())
    err_lines = [json.loads(l) for l in errs.read_text().splitlines()]
    assert Counter((d["custom_id"], d["error"]["code"]) for d in err_lines) == \
        Counter([(None, "invalid_json"), ("q3", "duplicate_custom_id")])
    texts = {k: v["response"]["body"]["choices"][0]["text"] for k, v in got.items()}
    ref_texts = {json.loads(l)["custom_id"]: json.loads(l)["response"]["body"]["choices"][0]
                 ["text"] for l in oks}
    assert texts == ref_texts                                          # greedy: same text
    before = (out.read_bytes(), errs.read_bytes())
    p = run_cli(["--gpus", "1", "--input", str(inp), "--output", str(out), "--errors",
                 str(errs), "--no-socket"])
    assert p.returncode == 0, p.stderr
    assert "requests 0 ok, 0 failed" in p.stdout
    assert (out.read_bytes(), errs.read_bytes()) == before
