"""The Python API (pipemax/api.py) against the command on the same tiny checkpoint: the same
greedy tokens (and transformers'), the same seeded samples; bad requests raise before any
work; nothing left in /dev/shm after close(), an exception, a garbage-collected LLM, or
interpreter exit; and ``pipemax run-batch`` with vLLM's flags."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from checkpoints import checkpoint_root, hf_greedy, make_checkpoint
from cli import ROOT, read_results, run_cli, write_jsonl
from pipemax.ipc.names import run_objects
from pipemax import LLM, SamplingParams
from pipemax.cli import main as cli_main, translate
from pipemax.config import ConfigError
from pipemax.pipeline import StageFailed

GREEDY = SamplingParams(temperature=0, max_tokens=8)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=11, max_tokens=8)
PROMPTS = ["The capital of France is", "Once upon a time", [5, 17, 99, 240, 3], "def f(x):"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_checkpoint(checkpoint_root(tmp_path_factory), "llama-gqa-sharded")


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(str(llama_dir), gpus=2, device="cpu", threads=1, quiet=True) as llm:
        yield llm


def _cli_lines(prompts, params: SamplingParams, kind="completion"):
    rows = []
    for i, p in enumerate(prompts):
        body = {**params.body(kind), **({"messages": p} if kind == "chat" else {"prompt": p})}
        url = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        rows.append({"custom_id": f"{kind}-{i}", "url": url, "body": body})
    return rows


def test_generate_matches_the_command_and_transformers(llm, llama_dir, tmp_path):
    chats = [[{"role": "user", "content": "Hi there"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]]
    greedy = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    seeded = llm.generate(PROMPTS, SEEDED, use_tqdm=False)
    chat = llm.chat(chats, GREEDY, use_tqdm=False)
    assert [o.request_id for o in greedy] == ["0", "1", "2", "3"]        # input order
    rows = (_cli_lines(PROMPTS, GREEDY) + [dict(r, custom_id="s" + r["custom_id"])
                                           for r in _cli_lines(PROMPTS, SEEDED)]
            + _cli_lines(chats, GREEDY, "chat"))
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    r = run_cli(["--model", str(llama_dir), "--gpus", "2", "--input", str(inp),
                 "--output", str(out), "--no-socket"])
    assert r.returncode == 0, r.stderr
    res = read_results(out)
    choice = lambda cid: res[cid]["response"]["body"]["choices"][0]
    for i, (g, s) in enumerate(zip(greedy, seeded)):
        assert g.outputs[0].token_ids == choice(f"completion-{i}")["token_ids"]
        assert g.outputs[0].text == choice(f"completion-{i}")["text"]
        assert s.outputs[0].token_ids == choice(f"scompletion-{i}")["token_ids"]
        assert g.outputs[0].finish_reason == "length" and len(g.outputs[0].token_ids) == 8
        assert g.usage == res[f"completion-{i}"]["response"]["body"]["usage"]
    for i, c in enumerate(chat):
        assert c.outputs[0].token_ids == choice(f"chat-{i}")["token_ids"]
        assert c.outputs[0].text == choice(f"chat-{i}")["message"]["content"]
    assert [o.outputs[0].token_ids for o in greedy] == hf_greedy(
        llama_dir, [o.prompt_token_ids for o in greedy], 8)
    # seeded sampling is the same again, alone and one SamplingParams per prompt
    again = llm.generate([PROMPTS[1], PROMPTS[0]], [SEEDED, GREEDY], use_tqdm=False)
    assert again[0].outputs[0].token_ids == seeded[1].outputs[0].token_ids
    assert again[1].outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_logprobs_bodies_and_run_batch(llm):
    out = llm.generate({"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(temperature=0, max_tokens=4, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, d in zip(out.token_ids, out.logprobs):
        assert d[tok].rank == 1                         # greedy: the chosen one is the top
        assert len(d) == 3 and sorted(x.rank for x in d.values()) == [1, 2, 3]
    assert out.cumulative_logprob == pytest.approx(sum(d[t].logprob
                                                       for t, d in zip(out.token_ids,
                                                                       out.logprobs)))
    # an OpenAI body keeps its own sampling fields when no SamplingParams is given
    body = llm.generate({"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0},
                        use_tqdm=False)[0].outputs[0]
    assert body.token_ids == out.token_ids[:3]
    # run_batch: the command's lines, bad ones included, in input order
    got = llm.run_batch([b'{"custom_id": "a", "prompt": [5, 6, 7], "max_tokens": 2, '
                         b'"temperature": 0}', b"not json", {"custom_id": "a", "prompt": "x"},
                         {"prompt": [1], "temperature": 7}])
    assert [i for i, _ in got] == [0, 1, 2, 3]
    assert got[0][1]["response"]["body"]["choices"][0]["logprobs"] is None
    assert [line["error"] and line["error"]["code"] for _, line in got] == [
        None, "invalid_json", "duplicate_custom_id", "invalid_parameter"]
    assert got[3][1]["custom_id"] == "request-4"


def test_bad_requests_raise_before_any_work(llm):
    steps = llm._rt.engine.stats.steps
    with pytest.raises(ValueError) as e:
        llm.generate(["fine", "fine too", [1, 2, 100000]],
                     [GREEDY, SamplingParams(temperature=3.0), GREEDY], use_tqdm=False)
    msg = str(e.value)
    assert "2 of 3 requests" in msg and "prompt 1: temperature" in msg
    assert "prompt 2: prompt[2]: token id 100000 is out of range" in msg
    assert llm._rt.engine.stats.steps == steps           # nothing ran
    with pytest.raises(ValueError, match="prompt 0: n=2 is not supported"):
        llm.generate("x", SamplingParams(n=2), use_tqdm=False)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate("x", [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 0: prompt has 5000 tokens"):
        llm.generate([[3] * 5000], use_tqdm=False)
    assert llm.generate("still works", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_bad_options_raise_one_line(llama_dir):
    with pytest.raises(ConfigError, match="unknown option 'tensor_parallel_size'"):
        LLM(str(llama_dir), tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="--gpus 7 is more stages than the model's 6 layers"):
        LLM(str(llama_dir), gpus=7, device="cpu")
    with pytest.raises(ConfigError, match="argument --kv-offload: invalid choice"):
        LLM(str(llama_dir), kv_offload="sometimes")
    with pytest.raises(ConfigError, match="input is not an option of the API"):
        LLM(str(llama_dir), input="x.jsonl")


def _alive(pids):
    return [p for p in pids if os.path.exists(f"/proc/{p}") and
            b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]


def test_close_gc_and_a_dead_stage_leave_nothing(llama_dir):
    llm = LLM(str(llama_dir), gpus=2, device="cpu", threads=1, quiet=True)
    rid, pids = llm._rt.run_id, [p.pid for p in llm._rt.pipeline.procs]
    assert run_objects(rid)
    llm.close()
    llm.close()                                           # idempotent
    assert run_objects(rid) == [] and _alive(pids) == []
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("x", use_tqdm=False)

    llm = LLM(str(llama_dir), gpus=2, device="cpu", threads=1, quiet=True)
    rid, pids = llm._rt.run_id, [p.pid for p in llm._rt.pipeline.procs]
    del llm
    gc.collect()
    assert run_objects(rid) == [] and _alive(pids) == []

    with LLM(str(llama_dir), gpus=2, device="cpu", threads=1, quiet=True) as llm:
        rid, pids = llm._rt.run_id, [p.pid for p in llm._rt.pipeline.procs]
        llm.generate("warm up", GREEDY, use_tqdm=False)
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(StageFailed, match="stage 1"):
            llm.generate(["a b c"] * 8, SamplingParams(max_tokens=200, ignore_eos=True),
                         use_tqdm=False)
        assert llm.closed
        assert run_objects(rid) == [] and _alive(pids) == []


def _script(tmp_path, body: str) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)


def _shm_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if f"pipemax-{pid}-" in n]


def test_interpreter_exit_and_the_main_guard(tmp_path, llama_dir):
    r = _script(tmp_path, f"""
        import os
        from pipemax import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM({str(llama_dir)!r}, device="cpu", threads=1, quiet=True)
            out = llm.generate("hi", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
            print(os.getpid(), out[0].outputs[0].token_ids)
        """)                                                # exits with the LLM open
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split()[0])
    assert _shm_of(pid) == []
    r = _script(tmp_path, f"""
        import os
        from pipemax import LLM
        print(os.getpid(), flush=True)
        llm = LLM({str(llama_dir)!r}, device="cpu", threads=1, quiet=True)
        """)                                                # no __main__ guard
    assert r.returncode != 0
    assert 'build the LLM under `if __name__ == "__main__":`' in r.stderr
    assert "StageFailed: stage 0" in r.stderr
    assert all(_shm_of(int(p)) == [] for p in r.stdout.split())


def test_run_batch_command_takes_vllm_flags(tmp_path, llama_dir, llm, capsys):
    assert translate(["-i", "a", "-o", "b", "--model", "m", "--pipeline-parallel-size", "2",
                      "--dtype", "half", "--max-model-len", "64", "--seed", "3",
                      "--enforce-eager", "--trust-remote-code", "--gpu-memory-utilization",
                      "0.8", "--device", "cpu"]) == [
        "--gpus", "2", "--input", "a", "--output", "b", "--dtype", "float16",
        "--cuda-graphs", "off", "--model", "m", "--max-model-len", "64", "--seed", "3",
        "--device", "cpu"]
    assert cli_main(["run-batch", "-i", "a", "-o", "b", "--tensor-parallel-size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pipemax: error: --tensor-parallel-size 2: pipemax has no tensor "
                   "parallelism; split the model into pipeline stages instead: "
                   "--pipeline-parallel-size 2"]
    assert cli_main(["run-batch", "--quantization", "awq"]) == 2
    assert "choose the precision with --dtype" in capsys.readouterr().err
    inp = write_jsonl(tmp_path / "in.jsonl", _cli_lines(PROMPTS[:2], GREEDY))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pipemax.cli", "run-batch", "-i", str(inp),
                        "-o", str(out), "--model", str(llama_dir), "-pp", "2", "--dtype",
                        "float", "--device", "cpu", "--threads", "1", "--no-socket"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    res = read_results(out)
    api = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert [res[f"completion-{i}"]["response"]["body"]["choices"][0]["token_ids"]
            for i in range(2)] == [o.outputs[0].token_ids for o in api]
