import json
import random

import pytest

from pipemax.requests import (ERROR_CODES, Parser, Request, RequestError, SamplingParams,
                              parse_line, read_requests)

VOCAB = 300
MAX_LEN = 64
BOS = 1


class FakeTokenizer:
    """Byte-level: byte b -> id b + 3; BOS = 1 with add_special_tokens. Records every call."""

    def __init__(self, has_chat_template=True):
        self.has_chat_template = has_chat_template
        self.calls = []

    def encode(self, text, add_special_tokens=True):
        self.calls.append(("encode", text, add_special_tokens))
        return ([BOS] if add_special_tokens else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", "replace")

    def token_str(self, token_id):
        return self.decode([token_id])

    def apply_chat_template(self, messages, add_generation_prompt=True):
        self.calls.append(("template", messages, add_generation_prompt))
        if not self.has_chat_template:
            raise ValueError("no chat template")
        out = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return out + ("<assistant>" if add_generation_prompt else "")


def ids(text, special=True):
    return tuple(([BOS] if special else []) + [b + 3 for b in text.encode()])


def parse(obj, tok="default", index=0, max_model_len=MAX_LEN):
    if tok == "default":
        tok = FakeTokenizer()
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_line(raw, index, tok, max_model_len=max_model_len, vocab_size=VOCAB)


def batch(url, body, **extra):
    return {"custom_id": "c1", "method": "POST", "url": url, "body": body, **extra}


def comp(body, **extra):
    return batch("/v1/completions", body, **extra)


def chat(body, **extra):
    return batch("/v1/chat/completions", body, **extra)


USER = [{"role": "user", "content": "hi"}]
CHAT_IDS = ids("<user>hi<assistant>", special=False)   # 19 tokens


# --- accepted forms -----------------------------------------------------------------------------

ACCEPTED = [
    # (line, kind, prompt_ids, params, custom_id, return_token_ids, model)
    (comp({"prompt": "ab"}), "completion", ids("ab"), SamplingParams(max_tokens=16), "c1", False, None),
    (comp({"prompt": [5, 6, 7]}), "completion", (5, 6, 7), SamplingParams(max_tokens=16), "c1", False, None),
    (comp({"prompt": ["ab"]}), "completion", ids("ab"), SamplingParams(max_tokens=16), "c1", False, None),
    (comp({"prompt": [[0, 299]]}), "completion", (0, 299), SamplingParams(max_tokens=16), "c1", False, None),
    # method may be left out; model echoed
    ({"custom_id": "x", "url": "/v1/completions", "body": {"prompt": [9], "model": "m"}},
     "completion", (9,), SamplingParams(max_tokens=16), "x", False, "m"),
    # plain line, no custom_id: request-<index+1>
    ({"prompt": "a", "max_tokens": 3, "temperature": 0}, "completion", ids("a"),
     SamplingParams(max_tokens=3, temperature=0.0), "request-1", False, None),
    ({"prompt": [4], "custom_id": "p", "return_token_ids": True}, "completion", (4,),
     SamplingParams(max_tokens=16), "p", True, None),
    # plain chat line
    ({"messages": USER}, "chat", CHAT_IDS, SamplingParams(max_tokens=MAX_LEN - 19), "request-1", False, None),
    # every sampling field
    (comp({"prompt": [5], "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 123,
           "stop": ["x", "yz"], "stop_token_ids": [2, 3], "ignore_eos": True, "n": 1, "logprobs": 5,
           "stream": False, "return_token_ids": True, "model": "llama", "frobnicate": {"x": 1}}),
     "completion", (5,),
     SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=123, stop=("x", "yz"),
                    stop_token_ids=(2, 3), ignore_eos=True, logprobs=5), "c1", True, "llama"),
    # top_k -1 normalised to 0; stop as one string; logprobs 0; nulls mean absent
    (comp({"prompt": [5], "top_k": -1, "stop": "\n", "logprobs": 0, "seed": None, "max_tokens": None,
           "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "echo": False, "best_of": 1}),
     "completion", (5,), SamplingParams(max_tokens=16, stop=("\n",), logprobs=0), "c1", False, None),
    # temperature / top_p bounds
    (comp({"prompt": [5], "temperature": 2, "top_p": 1}), "completion", (5,),
     SamplingParams(max_tokens=16, temperature=2.0), "c1", False, None),
    # chat: default max_tokens is the rest of the context
    (chat({"messages": USER}), "chat", CHAT_IDS, SamplingParams(max_tokens=MAX_LEN - 19), "c1", False, None),
    (chat({"messages": USER, "max_tokens": 5}), "chat", CHAT_IDS, SamplingParams(max_tokens=5), "c1", False, None),
    (chat({"messages": USER, "max_completion_tokens": 6, "max_tokens": 5}), "chat", CHAT_IDS,
     SamplingParams(max_tokens=6), "c1", False, None),
    (chat({"messages": USER, "logprobs": True, "top_logprobs": 3}), "chat", CHAT_IDS,
     SamplingParams(max_tokens=MAX_LEN - 19, logprobs=3), "c1", False, None),
    (chat({"messages": USER, "logprobs": True}), "chat", CHAT_IDS,
     SamplingParams(max_tokens=MAX_LEN - 19, logprobs=0), "c1", False, None),
    (chat({"messages": USER, "logprobs": False}), "chat", CHAT_IDS,
     SamplingParams(max_tokens=MAX_LEN - 19), "c1", False, None),
    # clamp: 3 prompt tokens, context 64 -> 61 left
    (comp({"prompt": [5, 6, 7], "max_tokens": 100}), "completion", (5, 6, 7),
     SamplingParams(max_tokens=61), "c1", False, None),
    (comp({"prompt": [5, 6, 7], "max_tokens": 10 ** 12}), "completion", (5, 6, 7),
     SamplingParams(max_tokens=61), "c1", False, None),
    (comp({"prompt": list(range(3, 3 + 63))}), "completion", tuple(range(3, 66)),
     SamplingParams(max_tokens=1), "c1", False, None),
]


@pytest.mark.parametrize("line,kind,prompt_ids,params,custom_id,rti,model", ACCEPTED)
def test_accepted(line, kind, prompt_ids, params, custom_id, rti, model):
    r = parse(line)
    assert r == Request(index=0, custom_id=custom_id, kind=kind, prompt_ids=prompt_ids,
                        params=params, return_token_ids=rti, model=model), r


def test_index_and_default_custom_id():
    r = parse({"prompt": [5]}, index=41)
    assert (r.index, r.custom_id) == (41, "request-42")
    e = parse({"prompt": 5}, index=41)
    assert (e.index, e.custom_id) == (41, "request-42")


def test_greedy():
    assert SamplingParams(max_tokens=1, temperature=0.0).greedy
    assert SamplingParams(max_tokens=1, top_k=1).greedy
    assert not SamplingParams(max_tokens=1).greedy
    assert parse(comp({"prompt": [5], "temperature": 0})).params.greedy


def test_text_prompt_encodes_with_special_tokens():
    tok = FakeTokenizer()
    parse(comp({"prompt": "hey"}), tok=tok)
    assert tok.calls == [("encode", "hey", True)]


def test_chat_goes_through_template_without_special_tokens():
    tok = FakeTokenizer()
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "tool", "content": "42", "tool_call_id": "t1"}]
    r = parse(chat({"messages": msgs}), tok=tok)
    rendered = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"},
                {"role": "assistant", "content": "ok"},
                {"role": "tool", "content": "42", "tool_call_id": "t1"}]
    text = "<system>be brief<user>a\nb<assistant>ok<tool>42<assistant>"
    assert tok.calls == [("template", rendered, True), ("encode", text, False)]
    assert r.prompt_ids == ids(text, special=False)
    assert r.kind == "chat"


def test_token_prompts_work_without_tokenizer():
    r = parse(comp({"prompt": [5, 6]}), tok=None)
    assert isinstance(r, Request) and r.prompt_ids == (5, 6)


# --- errors -------------------------------------------------------------------------------------

ERRORS = [
    # (raw line, code, words the message must contain)
    (b'{"prompt": [1,', "invalid_json", ["JSON"]),
    (b"not json", "invalid_json", ["JSON"]),
    (b"[" * 100000, "invalid_json", ["JSON"]),
    (b"[1, 2]", "invalid_request", ["object"]),
    (b'"str"', "invalid_request", ["object"]),
    (b"null", "invalid_request", ["object"]),
    (b'{"prompt": "\xff\xfe"}', "invalid_encoding", ["UTF-8"]),
    ({"custom_id": 5, "prompt": [1]}, "invalid_request", ["custom_id"]),
    ({"max_tokens": 3}, "invalid_request", ["prompt"]),
    ({}, "invalid_request", ["prompt"]),
    (batch("/v1/embeddings", {"input": "x"}), "invalid_url", ["url", "/v1/embeddings"]),
    (batch(["x"], {"prompt": "x"}), "invalid_url", ["url"]),
    ({"custom_id": "c", "body": {"prompt": "x"}}, "invalid_request", ["url"]),
    (comp({"prompt": "x"}, method="GET"), "invalid_request", ["method"]),
    ({"custom_id": "c", "url": "/v1/completions"}, "invalid_request", ["body"]),
    ({"custom_id": "c", "url": "/v1/completions", "body": "x"}, "invalid_request", ["body"]),
    (comp({}), "invalid_request", ["prompt"]),
    (comp({"messages": USER}), "invalid_request", ["prompt"]),
    (chat({"prompt": "x"}), "invalid_request", ["messages"]),
    # prompt shapes
    (comp({"prompt": ["a", "b"]}), "unsupported", ["prompt", "2 prompts"]),
    (comp({"prompt": [[1], [2]]}), "unsupported", ["prompt"]),
    (comp({"prompt": 5}), "invalid_parameter", ["prompt"]),
    (comp({"prompt": {"x": 1}}), "invalid_parameter", ["prompt"]),
    (comp({"prompt": [1, "a"]}), "invalid_parameter", ["prompt[1]"]),
    (comp({"prompt": [1, True]}), "invalid_parameter", ["prompt[1]"]),
    (comp({"prompt": [1, 300]}), "invalid_parameter", ["prompt[1]", "300"]),
    (comp({"prompt": [-1]}), "invalid_parameter", ["prompt[0]"]),
    (comp({"prompt": [1.0]}), "invalid_parameter", ["prompt[0]"]),
    (comp({"prompt": []}), "invalid_request", ["empty"]),
    (comp({"prompt": [[]]}), "invalid_request", ["empty"]),
    (comp({"prompt": list(range(64))}), "prompt_too_long", ["64 tokens", "64"]),
    (comp({"prompt": list(range(100))}), "prompt_too_long", ["100 tokens", "64"]),
    # chat shapes
    (chat({"messages": []}), "invalid_parameter", ["messages"]),
    (chat({"messages": "hi"}), "invalid_parameter", ["messages"]),
    (chat({"messages": ["hi"]}), "invalid_parameter", ["messages[0]"]),
    (chat({"messages": [{"role": "robot", "content": "x"}]}), "invalid_parameter", ["messages[0].role"]),
    (chat({"messages": [{"content": "x"}]}), "invalid_parameter", ["messages[0].role"]),
    (chat({"messages": [{"role": "user"}]}), "invalid_parameter", ["messages[0].content"]),
    (chat({"messages": [{"role": "user", "content": 5}]}), "invalid_parameter", ["messages[0].content"]),
    (chat({"messages": USER + [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
     "unsupported", ["messages[1].content[0]", "text"]),
    (chat({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}),
     "invalid_parameter", ["messages[0].content[0].text"]),
    (chat({"messages": [{"role": "user", "content": ["x"]}]}), "invalid_parameter", ["messages[0].content[0]"]),
    # sampling fields: wrong type
    (comp({"prompt": [5], "temperature": "hot"}), "invalid_parameter", ["temperature"]),
    (comp({"prompt": [5], "temperature": True}), "invalid_parameter", ["temperature"]),
    (comp({"prompt": [5], "max_tokens": 1.5}), "invalid_parameter", ["max_tokens"]),
    (comp({"prompt": [5], "max_tokens": True}), "invalid_parameter", ["max_tokens"]),
    (comp({"prompt": [5], "max_tokens": "5"}), "invalid_parameter", ["max_tokens"]),
    (comp({"prompt": [5], "top_p": "1"}), "invalid_parameter", ["top_p"]),
    (comp({"prompt": [5], "top_k": 2.0}), "invalid_parameter", ["top_k"]),
    (comp({"prompt": [5], "seed": "1"}), "invalid_parameter", ["seed"]),
    (comp({"prompt": [5], "seed": False}), "invalid_parameter", ["seed"]),
    (comp({"prompt": [5], "stop": 5}), "invalid_parameter", ["stop"]),
    (comp({"prompt": [5], "stop": ["a", 1]}), "invalid_parameter", ["stop[1]"]),
    (comp({"prompt": [5], "stop_token_ids": 2}), "invalid_parameter", ["stop_token_ids"]),
    (comp({"prompt": [5], "stop_token_ids": ["2"]}), "invalid_parameter", ["stop_token_ids[0]"]),
    (comp({"prompt": [5], "ignore_eos": 1}), "invalid_parameter", ["ignore_eos"]),
    (comp({"prompt": [5], "logprobs": True}), "invalid_parameter", ["logprobs"]),
    (comp({"prompt": [5], "return_token_ids": "yes"}), "invalid_parameter", ["return_token_ids"]),
    (comp({"prompt": [5], "model": 3}), "invalid_parameter", ["model"]),
    (comp({"prompt": [5], "n": "1"}), "invalid_parameter", ["n"]),
    (comp({"prompt": [5], "stream": "no"}), "invalid_parameter", ["stream"]),
    (chat({"messages": USER, "logprobs": 3}), "invalid_parameter", ["logprobs"]),
    (chat({"messages": USER, "logprobs": True, "top_logprobs": 1.5}), "invalid_parameter", ["top_logprobs"]),
    (chat({"messages": USER, "max_completion_tokens": "9"}), "invalid_parameter", ["max_completion_tokens"]),
    # sampling fields: out of range
    (comp({"prompt": [5], "temperature": -0.1}), "invalid_parameter", ["temperature"]),
    (comp({"prompt": [5], "temperature": 2.01}), "invalid_parameter", ["temperature"]),
    (b'{"prompt": [5], "temperature": NaN}', "invalid_parameter", ["temperature"]),
    (b'{"prompt": [5], "temperature": 1e999}', "invalid_parameter", ["temperature"]),
    (comp({"prompt": [5], "top_p": 0}), "invalid_parameter", ["top_p"]),
    (comp({"prompt": [5], "top_p": 1.5}), "invalid_parameter", ["top_p"]),
    (comp({"prompt": [5], "top_k": -2}), "invalid_parameter", ["top_k"]),
    (comp({"prompt": [5], "seed": 2 ** 63}), "invalid_parameter", ["seed"]),
    (comp({"prompt": [5], "max_tokens": 0}), "invalid_parameter", ["max_tokens"]),
    (comp({"prompt": [5], "max_tokens": -3}), "invalid_parameter", ["max_tokens"]),
    (chat({"messages": USER, "max_completion_tokens": 0}), "invalid_parameter", ["max_completion_tokens"]),
    (comp({"prompt": [5], "stop": ["a", "b", "c", "d", "e"]}), "invalid_parameter", ["stop", "4"]),
    (comp({"prompt": [5], "stop": ""}), "invalid_parameter", ["stop[0]"]),
    (comp({"prompt": [5], "stop": ["a", ""]}), "invalid_parameter", ["stop[1]"]),
    (comp({"prompt": [5], "stop_token_ids": [300]}), "invalid_parameter", ["stop_token_ids[0]"]),
    (comp({"prompt": [5], "stop_token_ids": [-1]}), "invalid_parameter", ["stop_token_ids[0]"]),
    (comp({"prompt": [5], "logprobs": 21}), "invalid_parameter", ["logprobs"]),
    (comp({"prompt": [5], "logprobs": -1}), "invalid_parameter", ["logprobs"]),
    (chat({"messages": USER, "logprobs": True, "top_logprobs": 21}), "invalid_parameter", ["top_logprobs"]),
    (chat({"messages": USER, "top_logprobs": 2}), "invalid_parameter", ["top_logprobs", "logprobs"]),
    # unsupported
    (comp({"prompt": [5], "n": 2}), "unsupported", ["n=2"]),
    (comp({"prompt": [5], "n": 0}), "unsupported", ["n=0"]),
    (comp({"prompt": [5], "best_of": 3}), "unsupported", ["best_of"]),
    (comp({"prompt": [5], "stream": True}), "unsupported", ["stream"]),
    (comp({"prompt": [5], "echo": True}), "unsupported", ["echo"]),
    (comp({"prompt": [5], "presence_penalty": 0.5}), "unsupported", ["presence_penalty"]),
    (comp({"prompt": [5], "frequency_penalty": 1}), "unsupported", ["frequency_penalty"]),
    (comp({"prompt": [5], "logit_bias": {"5": 1}}), "unsupported", ["logit_bias"]),
    (chat({"messages": USER, "n": 4}), "unsupported", ["n=4"]),
]


@pytest.mark.parametrize("line,code,words", ERRORS)
def test_errors(line, code, words):
    r = parse(line)
    assert isinstance(r, RequestError), r
    assert r.code == code, r
    assert r.code in ERROR_CODES
    assert r.index == 0
    for w in words:
        assert w in r.message, (w, r.message)
    assert "\n" not in r.message and r.message


def test_error_keeps_custom_id_when_known():
    assert parse(comp({"prompt": 5})).custom_id == "c1"
    assert parse({"custom_id": "z", "prompt": 5}).custom_id == "z"
    assert parse(b"{bad").custom_id is None
    assert parse(b"\xff").custom_id is None
    assert "line 8" in parse(b"{bad", index=7).message


def test_text_needs_tokenizer():
    for line, field in ((comp({"prompt": "hi"}), "prompt"), (comp({"prompt": ["hi"]}), "prompt"),
                        (chat({"messages": USER}), "messages")):
        r = parse(line, tok=None)
        assert isinstance(r, RequestError) and r.code == "invalid_request"
        assert field in r.message and "tokenizer" in r.message


def test_chat_without_template():
    r = parse(chat({"messages": USER}), tok=FakeTokenizer(has_chat_template=False))
    assert r.code == "unsupported" and "chat template" in r.message


def test_chat_template_raising_is_an_error_line():
    class Raising(FakeTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=True):
            raise ValueError("Conversation roles must alternate\nuser/assistant")
    r = parse(chat({"messages": USER}), tok=Raising())
    assert r.code == "invalid_request" and "messages" in r.message and "alternate" in r.message
    assert "\n" not in r.message


def test_tokenizer_raising_is_an_error_line():
    class Raising(FakeTokenizer):
        def encode(self, text, add_special_tokens=True):
            raise RuntimeError("boom")
    r = parse(comp({"prompt": "x"}), tok=Raising())
    assert r.code == "invalid_request" and "prompt" in r.message and "boom" in r.message


def test_empty_text_prompt():
    class NoBos(FakeTokenizer):
        def encode(self, text, add_special_tokens=True):
            return super().encode(text, add_special_tokens=False)
    assert parse(comp({"prompt": ""}), tok=NoBos()).code == "invalid_request"
    assert parse(comp({"prompt": ""})).prompt_ids == (BOS,)  # BOS alone is a prompt


def test_chat_prompt_too_long():
    r = parse(chat({"messages": [{"role": "user", "content": "x" * 60}]}))
    assert r.code == "prompt_too_long" and "77 tokens" in r.message  # <user> + 60 + <assistant>


def test_bom_and_crlf():
    r = parse(b'\xef\xbb\xbf{"prompt": [5]}\r')
    assert isinstance(r, Request) and r.prompt_ids == (5,)


# --- duplicates ---------------------------------------------------------------------------------

def test_duplicate_custom_id():
    p = Parser(FakeTokenizer(), max_model_len=MAX_LEN, vocab_size=VOCAB)
    a = p.parse(json.dumps(comp({"prompt": [5]})).encode(), 0)
    b = p.parse(json.dumps(comp({"prompt": [6]})).encode(), 1)
    assert isinstance(a, Request)
    assert isinstance(b, RequestError) and b.code == "duplicate_custom_id"
    assert b.custom_id == "c1" and b.index == 1 and "c1" in b.message
    # an error line's custom_id counts as used too
    e = p.parse(json.dumps({"custom_id": "e", "prompt": 5}).encode(), 2)
    assert e.code == "invalid_parameter"
    assert p.parse(json.dumps({"custom_id": "e", "prompt": [5]}).encode(), 3).code == "duplicate_custom_id"
    # a default id collides with an explicit one
    assert isinstance(p.parse(b'{"prompt": [5]}', 4), Request)           # request-5
    assert p.parse(b'{"custom_id": "request-5", "prompt": [5]}', 5).code == "duplicate_custom_id"
    # unparseable lines have no id and never collide
    assert p.parse(b"{", 6).code == "invalid_json"
    assert p.parse(b"{", 7).code == "invalid_json"
    assert isinstance(p.parse(b'{"custom_id": "new", "prompt": [5]}', 8), Request)


# --- read_requests ------------------------------------------------------------------------------

def test_read_requests(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"a": 1}\n\n   \n{"b": 2}\r\n\xff\n{"c": 3}')
    assert list(read_requests(f)) == [(0, b'{"a": 1}'), (3, b'{"b": 2}'), (4, b"\xff"), (5, b'{"c": 3}')]
    f.write_bytes(b"")
    assert list(read_requests(str(f))) == []


def test_read_requests_streams(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    it = read_requests(f)
    assert next(it) == (0, b'{"a": 1}')
    with open(f, "ab") as g:      # lines appended after the first was read are still seen
        g.write(b'{"c": 3}\n')
    assert [x for x in it] == [(1, b'{"b": 2}'), (2, b'{"c": 3}')]


# --- fuzz ---------------------------------------------------------------------------------------

def _random_json(rng, depth=0):
    choices = ["int", "float", "str", "bool", "null"] + (["list", "dict"] * 2 if depth < 4 else [])
    t = rng.choice(choices)
    if t == "int":
        return rng.choice([0, 1, -1, 2, 5, 20, 21, 299, 300, 10 ** 12, -(10 ** 30), 2 ** 64])
    if t == "float":
        return rng.choice([0.0, 0.5, 1.0, 2.0, -1.5, 1e308, 1e-300])
    if t == "str":
        return rng.choice(["", "x", "POST", "/v1/completions", "/v1/chat/completions", "user", "text",
                           "assistant", "\ud800", "é中", "\x00"])
    if t == "bool":
        return rng.random() < 0.5
    if t == "null":
        return None
    if t == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["custom_id", "method", "url", "body", "prompt", "messages", "role", "content", "type",
            "text", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
            "stop", "stop_token_ids", "ignore_eos", "n", "logprobs", "top_logprobs", "stream",
            "return_token_ids", "model", "echo", "best_of", "logit_bias", "presence_penalty", "zzz"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def _check(r, index):
    assert isinstance(r, (Request, RequestError))
    assert r.index == index
    if isinstance(r, RequestError):
        assert r.code in ERROR_CODES and r.message and "\n" not in r.message
    else:
        assert 1 <= r.params.max_tokens and len(r.prompt_ids) + r.params.max_tokens <= MAX_LEN
        assert all(0 <= t < VOCAB for t in r.prompt_ids)


def test_fuzz_never_raises():
    rng = random.Random(1234)
    p = Parser(FakeTokenizer(), max_model_len=MAX_LEN, vocab_size=VOCAB)
    kinds = set()
    for i in range(3000):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        _check(parse_line(raw, i, FakeTokenizer(), max_model_len=MAX_LEN, vocab_size=VOCAB), i)
        obj = _random_json(rng)
        if rng.random() < 0.5:    # steer half of them towards the valid shapes
            url = rng.choice(["/v1/completions", "/v1/chat/completions"])
            body = obj if isinstance(obj, dict) else {}
            body[rng.choice(["prompt", "messages"])] = rng.choice(
                [[5, 6], "hi", ["hi"], [[7]], USER, [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                 _random_json(rng)])
            obj = {"custom_id": str(i), "url": url, "body": body}
        try:
            raw = json.dumps(obj).encode("utf-8", "surrogatepass")
        except ValueError:
            continue
        tok = rng.choice([FakeTokenizer(), None, FakeTokenizer(has_chat_template=False)])
        r = parse_line(raw, i, tok, max_model_len=MAX_LEN, vocab_size=VOCAB)
        _check(r, i)
        _check(p.parse(raw, i), i)
        kinds.add(type(r).__name__ if isinstance(r, Request) else r.code)
    assert "Request" in kinds and "invalid_parameter" in kinds  # the fuzz reaches both outcomes
