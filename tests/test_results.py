import json
import math
import re
import subprocess
import sys

import pytest

from pipemax.requests import Request, RequestError, SamplingParams
from pipemax.results import ResultWriter, encode_line, error_line, ok_line, response_body


class FakeTokenizer:
    def token_str(self, token_id):
        return {5: "He", 6: "llo", 7: " wor", 8: "ld", 9: "é"}.get(token_id, f"<{token_id}>")


def req(kind="completion", return_token_ids=False, model=None, custom_id="c1"):
    return Request(index=0, custom_id=custom_id, kind=kind, prompt_ids=(1, 2, 3),
                   params=SamplingParams(max_tokens=4), return_token_ids=return_token_ids, model=model)


LOGPROBS = [(5, -0.5, [(5, -0.5), (6, -1.5)]),
            (6, -0.25, [(7, -0.1), (6, -0.25)]),
            (9, float("-inf"), [(9, float("-inf")), (8, float("nan"))])]
KW = dict(text="Hello", token_ids=[5, 6, 9], finish_reason="length", model_name="served",
          created=1700000000)


def test_completion_body_fields():
    b = response_body(req(), logprobs=None, **KW)
    assert set(b) == {"id", "object", "created", "model", "choices", "usage"}
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", b["id"])
    assert b["object"] == "text_completion"
    assert b["created"] == 1700000000 and isinstance(b["created"], int)
    assert b["model"] == "served"
    assert b["choices"] == [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length"}]
    assert b["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_chat_body_fields():
    b = response_body(req("chat"), logprobs=None, **{**KW, "finish_reason": "stop"})
    assert set(b) == {"id", "object", "created", "model", "choices", "usage"}
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", b["id"])
    assert b["object"] == "chat.completion"
    assert b["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                             "logprobs": None, "finish_reason": "stop"}]
    assert b["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_model_echo_and_token_ids():
    for kind in ("completion", "chat"):
        b = response_body(req(kind, return_token_ids=True, model="asked"), logprobs=None, **KW)
        assert b["model"] == "asked"
        assert b["choices"][0]["token_ids"] == [5, 6, 9]
        assert "token_ids" not in response_body(req(kind), logprobs=None, **KW)["choices"][0]


def test_response_body_dispatch():
    assert response_body(req("chat"), logprobs=None, **KW)["object"] == "chat.completion"
    assert response_body(req(), logprobs=None, **KW)["object"] == "text_completion"


def test_completion_logprobs():
    lp = response_body(req(), logprobs=LOGPROBS, tokenizer=FakeTokenizer(), **KW)["choices"][0]["logprobs"]
    assert lp == {"tokens": ["He", "llo", "é"],
                  "token_logprobs": [-0.5, -0.25, -9999.0],
                  "top_logprobs": [{"He": -0.5, "llo": -1.5},
                                   {" wor": -0.1, "llo": -0.25},
                                   {"é": -9999.0, "ld": -9999.0}],
                  "text_offset": [0, 2, 5]}


def test_completion_logprobs_zero_alternatives_keeps_chosen():
    lp = response_body(req(), logprobs=[(5, -0.5, [])], tokenizer=FakeTokenizer(), **KW)
    assert lp["choices"][0]["logprobs"]["top_logprobs"] == [{"He": -0.5}]


def test_chat_logprobs():
    lp = response_body(req("chat"), logprobs=LOGPROBS, tokenizer=FakeTokenizer(), **KW)["choices"][0]["logprobs"]
    c = lp["content"]
    assert set(lp) == {"content"} and len(c) == 3
    assert c[0] == {"token": "He", "logprob": -0.5, "bytes": [72, 101],
                    "top_logprobs": [{"token": "He", "logprob": -0.5, "bytes": [72, 101]},
                                     {"token": "llo", "logprob": -1.5, "bytes": [108, 108, 111]}]}
    assert c[2]["token"] == "é" and c[2]["bytes"] == [0xC3, 0xA9] and c[2]["logprob"] == -9999.0
    for e in c:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        for a in e["top_logprobs"]:
            assert set(a) == {"token", "logprob", "bytes"}
            assert isinstance(a["logprob"], float) and math.isfinite(a["logprob"])


def test_logprobs_without_tokenizer_use_ids():
    lp = response_body(req(), logprobs=[(5, -0.5, [(6, -1.0)])], **KW)["choices"][0]["logprobs"]
    assert lp["tokens"] == ["5"] and lp["top_logprobs"] == [{"6": -1.0, "5": -0.5}]
    lp = response_body(req("chat"), logprobs=[(5, -0.5, [(6, -1.0)])], **KW)["choices"][0]["logprobs"]
    assert lp["content"][0]["token"] == "5" and lp["content"][0]["top_logprobs"][0]["token"] == "6"


def test_ok_line():
    body = response_body(req(), logprobs=None, **KW)
    line = ok_line(req(custom_id="abc"), body)
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert re.fullmatch(r"batch_req_[0-9a-f]{32}", line["id"])
    assert line["custom_id"] == "abc" and line["error"] is None
    assert line["response"]["status_code"] == 200
    assert isinstance(line["response"]["request_id"], str) and line["response"]["request_id"]
    assert line["response"]["body"] is body


def test_error_line():
    line = error_line(RequestError(3, "abc", "invalid_parameter", "temperature must be in [0, 2], got 3.0"))
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert re.fullmatch(r"batch_req_[0-9a-f]{32}", line["id"])
    assert line["custom_id"] == "abc" and line["response"] is None
    assert line["error"] == {"code": "invalid_parameter", "message": "temperature must be in [0, 2], got 3.0"}
    assert error_line(RequestError(0, None, "invalid_json", "x"))["custom_id"] is None


def test_ids_unique():
    r = req()
    body = response_body(r, logprobs=None, **KW)
    assert len({ok_line(r, body)["id"] for _ in range(200)}) == 200
    assert len({response_body(r, logprobs=None, **KW)["id"] for _ in range(200)}) == 200
    assert len({ok_line(r, body)["response"]["request_id"] for _ in range(200)}) == 200


def test_encode_line():
    b = encode_line({"custom_id": "é中", "x": [1, 2]})
    assert b == '{"custom_id":"é中","x":[1,2]}\n'.encode()
    # a lone surrogate (from a "\ud800" escape in the input) is written as its JSON escape
    b = encode_line({"custom_id": "a\ud800"})
    assert b == b'{"custom_id":"a\\ud800"}\n' and json.loads(b)["custom_id"] == "a\ud800"


# --- writer -------------------------------------------------------------------------------------

def _ok(cid):
    return ok_line(req(custom_id=cid), response_body(req(custom_id=cid), logprobs=None, **KW))


def _err(cid):
    return error_line(RequestError(0, cid, "invalid_json", "line 1: not valid JSON"))


def _read_elsewhere(path):
    """Read the file from another process (so nothing in this process' buffers helps)."""
    out = subprocess.run([sys.executable, "-c", "import sys; sys.stdout.write(open(sys.argv[1]).read())",
                          str(path)], capture_output=True, text=True, encoding="utf-8", check=True)
    return out.stdout


def test_writer_flushes_each_line(tmp_path):
    path = tmp_path / "deep" / "dir" / "out.jsonl"
    w = ResultWriter(path)
    w.write(_ok("a"))
    lines = _read_elsewhere(path).splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["custom_id"] == "a"
    w.write(_err("b"))
    text = _read_elsewhere(path)
    assert text.endswith("\n") and [json.loads(x)["custom_id"] for x in text.splitlines()] == ["a", "b"]
    assert w.counts == {"ok": 1, "error": 1}
    w.close()
    w.close()  # idempotent


def test_writer_appends(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResultWriter(path) as w:
        w.write(_ok("a"))
    with ResultWriter(path, fsync=True) as w:
        w.write(_ok("b"))
    assert [json.loads(x)["custom_id"] for x in path.read_text().splitlines()] == ["a", "b"]


def test_writer_ends_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id":"x","custom_id":"a","resp')   # killed mid-write
    with ResultWriter(path) as w:
        w.write(_ok("b"))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["custom_id"] == "b"


def test_writer_error_split(tmp_path):
    out, errs = tmp_path / "out.jsonl", tmp_path / "e" / "errors.jsonl"
    w = ResultWriter(out, errors_path=errs)
    w.write(_ok("a"))
    w.write(_err("b"))
    w.write(_ok("c"))
    assert [json.loads(x)["custom_id"] for x in _read_elsewhere(out).splitlines()] == ["a", "c"]
    assert [json.loads(x)["custom_id"] for x in _read_elsewhere(errs).splitlines()] == ["b"]
    assert w.counts == {"ok": 2, "error": 1}
    w.close()


def test_writer_lines_are_compact_strict_json(tmp_path):
    path = tmp_path / "out.jsonl"
    body = response_body(req("chat"), logprobs=LOGPROBS, tokenizer=FakeTokenizer(),
                     **{**KW, "text": "héllo\nworld"})
    with ResultWriter(path) as w:
        w.write(ok_line(req("chat"), body))
    raw = path.read_bytes()
    assert raw.count(b"\n") == 1 and b": " not in raw and "héllo".encode() in raw
    assert b"NaN" not in raw and b"Infinity" not in raw
    line = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "héllo\nworld"
