"""The whole run through the CLI on the CPU equals transformers, at 1, 2 and 3 stages."""
from __future__ import annotations

import math

import numpy as np
import pytest

from checkpoints import hf_greedy, hf_logprobs, make_checkpoint
from cli import read_results, run_cli, write_jsonl

MAX_NEW = 10
PROMPT_LENS = (1, 3, 7, 12, 20, 33, 50)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


def prompts(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=n).tolist() for n in PROMPT_LENS]


def requests_for(ids_list):
    rows = []
    for i, ids in enumerate(ids_list):
        rows.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                     "body": {"prompt": ids, "max_tokens": MAX_NEW, "temperature": 0,
                              "ignore_eos": True, "logprobs": 5, "return_token_ids": True}})
    return rows


CASES = [
    # (checkpoint kind, stages, extra flags)
    ("llama-gqa-sharded", 1, ["--cuda-graphs", "on"]),   # the padded graph path, eagerly
    ("llama-gqa-sharded", 2, ["--block-size", "4"]),
    ("llama-gqa-sharded", 3, ["--max-num-batched-tokens", "8"]),           # chunked prefill
    ("llama-gqa-sharded", 2, ["--kv-cache-gb", "0.00012", "--block-size", "4",
                              "--kv-offload", "off"]),                      # preemption
    ("llama3-rope", 1, []),
    ("llama3-rope", 2, ["--micro-batches", "1"]),
    ("llama3-rope-params", 3, []),
    ("qwen2-bias-tied", 1, []),
    ("qwen2-bias-tied", 2, ["--max-num-seqs", "2"]),
    ("qwen2-bias-tied", 3, ["--micro-batches", "5", "--cuda-graphs", "on"]),
    ("mistral", 2, []),
    ("llama-8layers", 8, []),                                  # eight stages, one layer each
    ("llama-8layers", 8, ["--kv-offload", "on", "--kv-cache-gb", "0.0001",
                          "--block-size", "4"]),
]


@pytest.mark.parametrize("kind,stages,extra", CASES,
                         ids=[f"{k}-{s}st-{'_'.join(e).replace('--', '') or 'default'}"
                              for k, s, e in CASES])
def test_greedy_matches_transformers(ckpt_root, tmp_path, kind, stages, extra):
    path = make_checkpoint(ckpt_root, kind)
    ids_list = prompts(seed=len(kind))
    inp = write_jsonl(tmp_path / "in.jsonl", requests_for(ids_list))
    out = tmp_path / "out.jsonl"
    p = run_cli(["--gpus", str(stages), "--model", str(path), "--input", str(inp),
                 "--output", str(out), *extra])
    assert p.returncode == 0, p.stderr
    res = read_results(out)
    assert len(res) == len(ids_list)
    ref = hf_greedy(path, ids_list, MAX_NEW)
    for i, ids in enumerate(ids_list):
        line = res[f"r{i}"]
        assert line["error"] is None, line
        choice = line["response"]["body"]["choices"][0]
        assert choice["token_ids"] == ref[i], f"prompt {i} (len {len(ids)})"
        assert choice["finish_reason"] == "length"
        usage = line["response"]["body"]["usage"]
        assert usage == {"prompt_tokens": len(ids), "completion_tokens": MAX_NEW,
                         "total_tokens": len(ids) + MAX_NEW}
        # logprobs of the first generated token and its top-5 alternatives agree to 1e-4
        hf = hf_logprobs(path, ids)
        lp = choice["logprobs"]
        assert math.isclose(lp["token_logprobs"][0], float(hf[ref[i][0]]), abs_tol=1e-4)
        # top_logprobs is keyed by token text (OpenAI's format), so byte tokens may collide
        top = lp["top_logprobs"][0]
        hf_top = hf.topk(5).values.tolist()
        assert top and math.isclose(max(top.values()), hf_top[0], abs_tol=1e-4)
        for v in top.values():
            assert any(math.isclose(v, b, abs_tol=1e-4) for b in hf_top), (v, hf_top)
    if "--kv-offload" in extra:
        mode = extra[extra.index("--kv-offload") + 1]
        assert f"plan: offload {mode}" in p.stderr


def test_text_and_chat_prompts_match_transformers(ckpt_root, tmp_path):
    from transformers import AutoTokenizer
    path = make_checkpoint(ckpt_root, "llama-gqa-sharded")
    tok = AutoTokenizer.from_pretrained(str(path))
    texts = ["Hello there, general", "The cat sat on the mat and then"]
    messages = [[{"role": "user", "content": "What is two plus two?"}]]
    rows = [{"custom_id": f"t{i}", "url": "/v1/completions", "method": "POST",
             "body": {"prompt": t, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                      "return_token_ids": True}} for i, t in enumerate(texts)]
    rows += [{"custom_id": "c0", "url": "/v1/chat/completions", "method": "POST",
              "body": {"messages": messages[0], "max_tokens": 6, "temperature": 0,
                       "ignore_eos": True, "return_token_ids": True}}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    p = run_cli(["--gpus", "2", "--model", str(path), "--input", str(inp), "--output", str(out)])
    assert p.returncode == 0, p.stderr
    res = read_results(out)
    prompt_ids = [tok(t)["input_ids"] for t in texts]
    chat_ids = tok.apply_chat_template(messages[0], add_generation_prompt=True, tokenize=True)
    if not isinstance(chat_ids, list):  # newer transformers return a BatchEncoding
        chat_ids = chat_ids["input_ids"]
    ref = hf_greedy(path, prompt_ids + [list(chat_ids)], 6)
    for i in range(len(texts)):
        c = res[f"t{i}"]["response"]["body"]["choices"][0]
        assert c["token_ids"] == ref[i]
        assert c["text"] == tok.decode(ref[i], skip_special_tokens=True)
        assert res[f"t{i}"]["response"]["body"]["usage"]["prompt_tokens"] == len(prompt_ids[i])
    c = res["c0"]["response"]["body"]
    assert c["object"] == "chat.completion"
    assert c["choices"][0]["token_ids"] == ref[2]
    assert c["choices"][0]["message"]["content"] == tok.decode(ref[2], skip_special_tokens=True)


def test_seeded_sampling_same_alone_or_in_batch(ckpt_root, tmp_path):
    path = make_checkpoint(ckpt_root, "qwen2-bias-tied")
    rng = np.random.default_rng(7)
    target = {"custom_id": "target", "body": {"prompt": rng.integers(3, 500, 9).tolist(),
              "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 1234,
              "ignore_eos": True, "return_token_ids": True},
              "url": "/v1/completions", "method": "POST"}
    others = [{"custom_id": f"o{i}", "body": {"prompt": rng.integers(3, 500, 5 + i).tolist(),
               "max_tokens": 8 + i, "temperature": 1.0, "ignore_eos": True},
               "url": "/v1/completions", "method": "POST"} for i in range(6)]
    toks = []
    for name, rows, stages in (("alone", [target], 1), ("batch", others[:3] + [target] +
                                                           others[3:], 2)):
        inp = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        out = tmp_path / f"{name}.out.jsonl"
        p = run_cli(["--gpus", str(stages), "--model", str(path), "--input", str(inp),
                     "--output", str(out), "--seed", str(stages)])
        assert p.returncode == 0, p.stderr
        toks.append(read_results(out)["target"]["response"]["body"]["choices"][0]["token_ids"])
    assert toks[0] == toks[1]
    greedy = hf_greedy(path, [target["body"]["prompt"]], 12)[0]
    assert toks[0] != greedy  # it really sampled


def test_default_run_prints_completions_and_summary():
    p = run_cli([])
    assert p.returncode == 0, p.stderr
    lines = [l for l in p.stdout.splitlines() if l.startswith("[")]
    assert len(lines) >= 5
    assert "output tok/s" in p.stderr
    # the planner's CPU figures are nominal: no prediction, only what was measured
    assert "predicted" not in p.stderr
    assert "pipemax: weights float32; measured " in p.stderr
