"""Random request lines through the parser and the real engine: whatever a line carries, the run
ends with exactly one result line per input line.

The engine drives a stand-in for the pipeline, in-process: the last stage's random logits go
through the real sampler (stages/sampler.py) with the sampling arrays the engine built, so the
types the engine converts to and the sampler's arithmetic are exercised as in a run."""
from __future__ import annotations

import json
import tempfile
from collections import deque

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from pipemax.engine import Engine
from pipemax.requests import Parser
from pipemax.results import encode_line
from pipemax.scheduler import Scheduler, SchedulerConfig
from pipemax.tiny import write_tokenizer_files
from pipemax.tokenizer import Tokenizer
from pipemax.stages.sampler import sample

VOCAB = 512
MAX_MODEL_LEN = 48


def _tokenizer() -> Tokenizer:
    """The built-in tiny model's tokenizer (with its chat template)."""
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer_files(d, VOCAB)
        return Tokenizer.from_dir(d)


TOKENIZER = _tokenizer()


class LastStage:
    """Pipeline stand-in: each step comes back with tokens sampled from random logits."""

    def __init__(self):
        self.sent = deque()
        self.gen = torch.Generator().manual_seed(0)

    def send_step(self, plan, step, sampling, num_top):
        self.sent.append((plan, sampling, num_top))

    def recv(self):
        plan, s, num_top = self.sent.popleft()
        logits = torch.randn(len(plan.sample_rows), VOCAB, generator=self.gen) * 8
        out = sample(logits, *(torch.from_numpy(s[k]) for k in ("temperature", "top_p", "top_k",
                                                                "u")), num_top)
        return {"mb": plan.mb}, {"token_ids": out.token_ids, "logprobs": out.logprobs,
                                 "top_ids": out.top_ids, "top_logprobs": out.top_logprobs}


def run_engine(lines: list[bytes]) -> list[dict]:
    written = []
    cfg = SchedulerConfig(num_micro_batches=2, max_seqs_per_mb=4, max_tokens_per_step=64,
                          block_size=16, num_blocks=64)
    engine = Engine(pipeline=LastStage(), sched=Scheduler(cfg), tokenizer=TOKENIZER,
                    eos_ids=(2,), max_model_len=MAX_MODEL_LEN, model_name="tiny", seed=0,
                    write=lambda line: written.append(json.loads(encode_line(line))),
                    requests=Parser(TOKENIZER, max_model_len=MAX_MODEL_LEN,
                                    vocab_size=VOCAB).parse_all(enumerate(lines)))
    engine.run()
    return written


# any JSON value, with integers well outside every type the engine builds
anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2 ** 70, 2 ** 70)
    | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8)
token_ids = st.lists(st.integers(-3, VOCAB + 3), min_size=0, max_size=8)
# per field: values the field takes in practice (edges included), or anything at all
FIELDS = {
    "prompt": st.text(max_size=20) | token_ids,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system",
                                                                          "user"]),
                                                 "content": st.text(max_size=10)}),
                         min_size=1, max_size=3),
    "max_tokens": st.integers(1, 2 ** 70) | st.integers(-1, 8),
    "max_completion_tokens": st.integers(1, 2 ** 70) | st.integers(-1, 8),
    "temperature": st.floats(0, 2) | st.sampled_from([0.0, 1e-40, 1e-30, 1e-6, 1e-5, 2.0]),
    "top_p": st.floats(0, 1) | st.sampled_from([1e-45, 1e-30, 1.0]),
    "top_k": st.integers(-2, 2 ** 70)
             | st.sampled_from([-1, 0, 1, VOCAB - 1, VOCAB, VOCAB + 1, 2 ** 63 - 1, 2 ** 63]),
    "seed": st.integers(-2 ** 63, 2 ** 63 - 1) | st.integers(-2 ** 64, 2 ** 64)
            | st.sampled_from([-1, -2 ** 63, 2 ** 63 - 1, -2 ** 63 - 1, 2 ** 63]),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=4),
    "stop_token_ids": token_ids,
    "ignore_eos": st.booleans(),
    "logprobs": st.integers(0, 20) | st.booleans() | st.integers(-1, 22),
    "top_logprobs": st.integers(0, 20) | st.integers(-1, 22),
    "return_token_ids": st.booleans(),
    "n": st.sampled_from([1, 1, 1, 2]),
    "stream": st.sampled_from([False, False, False, True]),
    "presence_penalty": st.sampled_from([0, 0.0, 0.0, 0.5]),
    "logit_bias": st.sampled_from([{}, {}, {}, {"5": 1}]),
    "model": st.text(max_size=4),
    "custom_id": st.sampled_from(["a", "b", "c"]) | st.text(max_size=4),
}


@st.composite
def request_line(draw) -> bytes:
    form = draw(st.sampled_from(["plain", "batch", "batch-chat", "garbage"]))
    if form == "garbage":
        raw = draw(st.binary(max_size=30) | st.text(max_size=30).map(str.encode))
        raw = raw.replace(b"\n", b" ").replace(b"\r", b" ")
        return raw if raw.strip() else b"{"
    names = draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=8))
    body = {}
    for name in sorted(names):   # mostly a value of the field's kind, at times anything
        body[name] = draw(anything if draw(st.integers(0, 19)) == 0 else FIELDS[name])
    if form == "plain":
        body.setdefault("prompt", draw(FIELDS["prompt"]))
        return json.dumps(body).encode()
    url = "/v1/completions" if form == "batch" else "/v1/chat/completions"
    if form == "batch":
        body.setdefault("prompt", draw(FIELDS["prompt"]))
    else:
        body.setdefault("messages", draw(FIELDS["messages"]))
    line = {"custom_id": body.pop("custom_id", None), "method": "POST", "url": url,
            "body": body}
    return json.dumps(line).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(request_line(), min_size=1, max_size=8))
def test_every_line_gets_exactly_one_result_line(lines):
    written = run_engine(lines)
    assert len(written) == len(lines), (lines, written)
    for w in written:
        assert (w["error"] is None) != (w["response"] is None), w
        # a line may be refused by the parser; the engine itself must not fail on one
        assert w["error"] is None or w["error"]["code"] != "internal_error", (lines, w)
        if w["response"] is not None:
            usage = w["response"]["body"]["usage"]
            assert 1 <= usage["completion_tokens"] <= MAX_MODEL_LEN - usage["prompt_tokens"]


def test_the_edges_that_ended_runs_are_served():
    """Seeds at both ends of int64, a top_k of 2**70, a temperature of 1e-40: every one served
    (the hypothesis search above finds them too; these are its known finds, always tried)."""
    rows = [{"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 1.0, "seed": s}
            for s in (-1, -2 ** 63, 2 ** 63 - 1)]
    rows += [{"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 1.0, "top_k": 2 ** 70},
             {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 1e-40}]
    written = run_engine([json.dumps(r).encode() for r in rows])
    assert len(written) == len(rows)
    assert all(w["error"] is None for w in written), written
