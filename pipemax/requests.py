"""Input lines: parse and validate one JSONL line into a :class:`Request` or a :class:`RequestError`.

Accepted line forms
-------------------
* OpenAI batch: ``{"custom_id": str, "method": "POST", "url": "/v1/completions" |
  "/v1/chat/completions", "body": {...}}`` (``method`` may be left out).
* Plain: ``{"prompt": ...}`` with the sampling fields at top level (a /v1/completions body), or
  ``{"messages": [...]}`` likewise (a /v1/chat/completions body); ``custom_id`` optional.

A line without ``custom_id`` gets ``"request-<line number>"`` (1-based, blank lines counted).

Differences from OpenAI / vLLM, on purpose
------------------------------------------
* ``max_tokens`` is clamped to what the context has left (``max_model_len - len(prompt)``)
  instead of being an error, so a huge ``max_tokens`` (``10**12``) just means "to the end".
  A prompt that fills the context (``len(prompt) >= max_model_len``) is an error.
* One prompt per line: ``n``/``best_of`` other than 1 and a list of several prompts are
  "unsupported"; so are ``stream: true``, ``echo: true``, non-zero presence/frequency
  penalties and a non-empty ``logit_bias`` (rather than silently ignoring them).
* Chat content given as a list of parts is joined with "\\n" (as vLLM does); only
  ``{"type": "text"}`` parts are accepted.
* JSON ``null`` for an optional field means "absent".
* Other unknown fields are ignored.

Sampling fields are checked here, in one place, against what the engine can use (the driver
sends temperature and top_p as float32, top_k as int64, and seeds a Philox generator, which
takes a 64-bit key): ``seed`` is any int64 (OpenAI's range); the request's generator is keyed
by its two's-complement 64-bit pattern (``seed mod 2**64``, pipemax/sequence.py), so every
seed, negative ones included, gives the same tokens on every run; ``top_k`` larger than the vocabulary means all of it (off); a
``temperature`` below ``GREEDY_TEMPERATURE`` is greedy (dividing logits by it would overflow
float32).

:func:`parse_line` never raises: every problem becomes a :class:`RequestError` whose message is
one line naming the field. :class:`Parser` adds the duplicate ``custom_id`` check.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

URL_COMPLETIONS = "/v1/completions"
URL_CHAT = "/v1/chat/completions"
KINDS = {URL_COMPLETIONS: "completion", URL_CHAT: "chat"}

DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_LOGPROBS = 20
MAX_STOP = 4
CHAT_ROLES = ("system", "user", "assistant", "tool")
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1   # OpenAI's int64 range
SEED_MODULUS = 2 ** 64        # the generator's key: a seed is used modulo this (non-negative)
GREEDY_TEMPERATURE = 1e-5     # below this, sampling is greedy (logits / t would overflow)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0      # OpenAI default; 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = off (-1 in the input is normalised to 0)
    seed: int | None = None       # int64; the generator takes it mod SEED_MODULUS
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None   # None = no logprobs; k >= 0 = chosen token's logprob + top-k alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class Request:
    index: int             # 0-based line number in the input file
    custom_id: str         # from the line; "request-<index+1>" when absent
    kind: str              # "completion" | "chat"
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    return_token_ids: bool
    model: str | None      # body["model"] if given (echoed back in the response)


@dataclass(frozen=True)
class RequestError:
    index: int
    custom_id: str | None  # None when the line gives no usable custom_id (bad JSON, ...)
    code: str              # see ERROR_CODES
    message: str


ERROR_CODES = ("invalid_json", "invalid_request", "invalid_url", "invalid_parameter",
               "prompt_too_long", "invalid_encoding", "duplicate_custom_id", "unsupported",
               "internal_error")   # the engine failed on this one request (pipemax/engine.py)


class _Bad(Exception):
    """Raised inside the parser, turned into a RequestError by parse_line."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _show(value) -> str:
    """A short one-line rendering of a JSON value for error messages."""
    try:
        s = json.dumps(value, ensure_ascii=True)
    except Exception:  # noqa: BLE001 - anything odd still gets a message
        s = repr(value)
    return s if len(s) <= 60 else s[:60] + "..."


# --- field checks -----------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def _get(body: dict, name: str):
    """body[name], with JSON null treated as absent (returns None)."""
    return body.get(name)


def _int_field(body, name, *, lo=None, hi=None, default=None):
    v = _get(body, name)
    if v is None:
        return default
    if not _is_int(v):
        raise _Bad("invalid_parameter", f"{name} must be an integer, got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _Bad("invalid_parameter", f"{name} must be {rng}, got {v}")
    return v


def _bool_field(body, name, default=False) -> bool:
    v = _get(body, name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _Bad("invalid_parameter", f"{name} must be true or false, got {_show(v)}")
    return v


def _num_field(body, name, default: float) -> float:
    v = _get(body, name)
    if v is None:
        return default
    if not _is_num(v):
        raise _Bad("invalid_parameter", f"{name} must be a number, got {_show(v)}")
    return float(v)


def _token_ids(v, name: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise _Bad("invalid_parameter", f"{name} must be a list of token ids, got {_show(v)}")
    for i, t in enumerate(v):
        if not _is_int(t):
            raise _Bad("invalid_parameter", f"{name}[{i}] must be an integer token id, got {_show(t)}")
        if not 0 <= t < vocab_size:
            raise _Bad("invalid_parameter",
                       f"{name}[{i}]: token id {t} is out of range [0, {vocab_size})")
    return tuple(v)


def _refuse_true(body: dict, name: str, hint: str = "") -> None:
    """A boolean field pipemax takes only as false."""
    if _get(body, name) is None:
        return
    if not isinstance(body[name], bool):
        raise _Bad("invalid_parameter", f"{name} must be true or false, got {_show(body[name])}")
    if body[name]:
        raise _Bad("unsupported", f"{name}: true is not supported" + (f" {hint}" if hint else ""))


def _check_unsupported(body: dict) -> None:
    _refuse_true(body, "stream", "in batch mode (set it false or leave it out)")
    for name in ("n", "best_of"):
        v = _get(body, name)
        if v is None:
            continue
        if not _is_int(v):
            raise _Bad("invalid_parameter", f"{name} must be an integer, got {_show(v)}")
        if v != 1:
            raise _Bad("unsupported", f"{name}={v} is not supported: pipemax generates one choice per "
                                      f"request (repeat the line with different custom_ids instead)")
    _refuse_true(body, "echo")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _num_field(body, name, 0.0)
        if v != 0.0:
            raise _Bad("unsupported", f"{name} is not supported (only 0), got {v}")
    lb = _get(body, "logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise _Bad("invalid_parameter", f"logit_bias must be an object, got {_show(lb)}")
        if lb:
            raise _Bad("unsupported", "logit_bias is not supported (only an empty object)")


def _sampling(body: dict, kind: str, vocab_size: int):
    """Everything but max_tokens (which needs the prompt length). Returns (fields, max_tokens|None)."""
    _check_unsupported(body)
    if kind == "chat" and _get(body, "max_completion_tokens") is not None:
        max_tokens = _int_field(body, "max_completion_tokens")
        if max_tokens < 1:
            raise _Bad("invalid_parameter", f"max_completion_tokens must be >= 1, got {max_tokens}")
    else:
        max_tokens = _int_field(body, "max_tokens")
        if max_tokens is not None and max_tokens < 1:
            raise _Bad("invalid_parameter", f"max_tokens must be >= 1, got {max_tokens}")

    temperature = _num_field(body, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise _Bad("invalid_parameter", f"temperature must be in [0, 2], got {temperature}")
    if temperature < GREEDY_TEMPERATURE:
        temperature = 0.0
    top_p = _num_field(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise _Bad("invalid_parameter", f"top_p must be in (0, 1], got {top_p}")
    top_k = _int_field(body, "top_k", default=0)
    if top_k < -1:
        raise _Bad("invalid_parameter", f"top_k must be -1, 0 (off) or >= 1, got {top_k}")
    top_k = 0 if top_k <= 0 or top_k >= vocab_size else top_k   # >= the vocabulary: all of it
    seed = _int_field(body, "seed", lo=SEED_MIN, hi=SEED_MAX)

    stop = _get(body, "stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list):
        stop = tuple(stop)
        if len(stop) > MAX_STOP:
            raise _Bad("invalid_parameter", f"stop may hold at most {MAX_STOP} strings, got {len(stop)}")
    else:
        raise _Bad("invalid_parameter", f"stop must be a string or a list of strings, got {_show(stop)}")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            raise _Bad("invalid_parameter", f"stop[{i}] must be a non-empty string, got {_show(s)}")

    stop_ids = _get(body, "stop_token_ids")
    stop_ids = () if stop_ids is None else _token_ids(stop_ids, "stop_token_ids", vocab_size)
    ignore_eos = _bool_field(body, "ignore_eos")

    if kind == "completion":
        logprobs = _int_field(body, "logprobs", lo=0, hi=MAX_LOGPROBS)
    else:
        want = _bool_field(body, "logprobs")
        top = _int_field(body, "top_logprobs", lo=0, hi=MAX_LOGPROBS, default=0)
        if top and not want:
            raise _Bad("invalid_parameter", "top_logprobs needs logprobs: true")
        logprobs = top if want else None

    fields = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                  stop_token_ids=stop_ids, ignore_eos=ignore_eos, logprobs=logprobs)
    return fields, max_tokens


# --- prompts ----------------------------------------------------------------------------------

def _need_tokenizer(tokenizer, what: str):
    if tokenizer is None:
        raise _Bad("invalid_request", f"{what} is text, which needs a tokenizer (none is loaded); "
                                      f"give prompt as a list of token ids instead")


def _completion_prompt(body: dict, tokenizer, vocab_size: int) -> tuple[int, ...]:
    if "prompt" not in body or body["prompt"] is None:
        raise _Bad("invalid_request", "missing prompt")
    p = body["prompt"]
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        if len(p) > 1:
            raise _Bad("unsupported", f"prompt holds {len(p)} prompts; pipemax takes one prompt per "
                                      f"line (put each on its own line)")
        p = p[0]
    if isinstance(p, str):
        _need_tokenizer(tokenizer, "prompt")
        try:
            ids = tokenizer.encode(p, add_special_tokens=True)
        except Exception as e:  # noqa: BLE001 - a tokenizer failure is this line's error
            raise _Bad("invalid_request", f"prompt could not be tokenized: {one_line(e)}")
        return tuple(int(t) for t in ids)
    if isinstance(p, list):
        return _token_ids(p, "prompt", vocab_size)
    raise _Bad("invalid_parameter",
               f"prompt must be a string or a list of token ids, got {_show(p)}")


def _message_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise _Bad("invalid_parameter", f"{where}.content[{j}] must be an object, got {_show(part)}")
            if part.get("type") != "text":
                raise _Bad("unsupported", f"{where}.content[{j}]: only parts of type \"text\" are "
                                          f"supported, got type {_show(part.get('type'))}")
            if not isinstance(part.get("text"), str):
                raise _Bad("invalid_parameter", f"{where}.content[{j}].text must be a string, "
                                                f"got {_show(part.get('text'))}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _Bad("invalid_parameter", f"{where}.content must be a string or a list of text parts, "
                                    f"got {_show(content)}")


def _chat_prompt(body: dict, tokenizer) -> tuple[int, ...]:
    if "messages" not in body or body["messages"] is None:
        raise _Bad("invalid_request", "missing messages")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("invalid_parameter", f"messages must be a non-empty list, got {_show(msgs)}")
    rendered = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _Bad("invalid_parameter", f"{where} must be an object, got {_show(m)}")
        if m.get("role") not in CHAT_ROLES:
            raise _Bad("invalid_parameter", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, "
                                            f"got {_show(m.get('role'))}")
        if "content" not in m:
            raise _Bad("invalid_parameter", f"{where}.content is missing")
        rendered.append({**m, "content": _message_text(m["content"], where)})
    _need_tokenizer(tokenizer, "messages")
    if not getattr(tokenizer, "has_chat_template", True):
        raise _Bad("unsupported", "messages: the model's tokenizer has no chat template; "
                                  "use /v1/completions with a prompt instead")
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - TokenizerError, jinja errors (e.g. role order)
        raise _Bad("invalid_request", f"messages: the chat template failed: {one_line(e)}")
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except Exception as e:  # noqa: BLE001
        raise _Bad("invalid_request", f"messages could not be tokenized: {one_line(e)}")
    return tuple(int(t) for t in ids)


# --- the line ---------------------------------------------------------------------------------

def _decode(raw: bytes, index: int):
    """bytes -> JSON object, or _Bad (invalid_encoding / invalid_json / invalid_request)."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("invalid_encoding", f"line {index + 1}: not valid UTF-8 (byte offset {e.start})")
    text = text.lstrip("\ufeff")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _Bad("invalid_json", f"line {index + 1}: JSON nested too deeply")
    except ValueError as e:
        raise _Bad("invalid_json", f"line {index + 1}: not valid JSON: {one_line(e)}")
    if not isinstance(obj, dict):
        raise _Bad("invalid_request", f"line {index + 1}: must be a JSON object, got {type(obj).__name__}")
    return obj


def _parse(obj: dict, index: int, custom_id: str, tokenizer, max_model_len: int,
           vocab_size: int) -> Request:
    if any(k in obj for k in ("url", "body", "method")):
        if obj.get("method") is not None and obj["method"] != "POST":
            raise _Bad("invalid_request", f"method must be \"POST\", got {_show(obj['method'])}")
        url = obj.get("url")
        if url is None:
            raise _Bad("invalid_request", "missing url (\"/v1/completions\" or \"/v1/chat/completions\")")
        if not isinstance(url, str) or url not in KINDS:
            raise _Bad("invalid_url", f"url {_show(url)} is not supported; use \"/v1/completions\" "
                                      f"or \"/v1/chat/completions\"")
        kind = KINDS[url]
        body = obj.get("body")
        if body is None:
            raise _Bad("invalid_request", "missing body")
        if not isinstance(body, dict):
            raise _Bad("invalid_request", f"body must be a JSON object, got {_show(body)}")
    elif obj.get("prompt") is not None:
        kind, body = "completion", obj
    elif obj.get("messages") is not None:
        kind, body = "chat", obj
    else:
        raise _Bad("invalid_request", "line has neither url+body (OpenAI batch) nor prompt/messages")

    model = _get(body, "model")
    if model is not None and not isinstance(model, str):
        raise _Bad("invalid_parameter", f"model must be a string, got {_show(model)}")
    return_token_ids = _bool_field(body, "return_token_ids")
    fields, max_tokens = _sampling(body, kind, vocab_size)

    if kind == "completion":
        prompt_ids = _completion_prompt(body, tokenizer, vocab_size)
    else:
        prompt_ids = _chat_prompt(body, tokenizer)
    n = len(prompt_ids)
    if n == 0:
        raise _Bad("invalid_request", f"{'prompt' if kind == 'completion' else 'messages'}: "
                                      f"the prompt is empty (0 tokens)")
    if n >= max_model_len:
        raise _Bad("prompt_too_long", f"prompt has {n} tokens but the model's context "
                                      f"(max_model_len) is {max_model_len}, leaving no room to generate")
    room = max_model_len - n
    if max_tokens is None:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if kind == "completion" else room
    max_tokens = min(max_tokens, room)
    return Request(index=index, custom_id=custom_id, kind=kind, prompt_ids=prompt_ids,
                   params=SamplingParams(max_tokens=max_tokens, **fields),
                   return_token_ids=return_token_ids, model=model)


def parse_line(raw: bytes, index: int, tokenizer, *, max_model_len: int,
               vocab_size: int) -> Request | RequestError:
    """Parse one input line (without duplicate checking; see :class:`Parser`). Never raises.

    ``max_tokens`` is clamped to ``max_model_len - len(prompt_ids)`` (vLLM errors instead);
    chat's default ``max_tokens`` is all of that room, completions' default is 16.
    """
    custom_id = None
    try:
        obj = _decode(raw, index)
        cid = obj.get("custom_id")
        if cid is None:
            custom_id = f"request-{index + 1}"
        elif isinstance(cid, str):
            custom_id = cid
        else:
            raise _Bad("invalid_request", f"line {index + 1}: custom_id must be a string, got {_show(cid)}")
        return _parse(obj, index, custom_id, tokenizer, max_model_len, vocab_size)
    except _Bad as e:
        return RequestError(index, custom_id, e.code, one_line(e.message))
    except Exception as e:  # noqa: BLE001 - a bug or odd input must not stop the batch
        return RequestError(index, custom_id, "invalid_request",
                            one_line(f"could not parse line {index + 1}: {type(e).__name__}: {e}"))


class Parser:
    """parse_line with the tokenizer/limits bound, plus the duplicate custom_id check.

    Every custom_id read from a line (ok or not) is remembered; a later line with the same id
    becomes a "duplicate_custom_id" error (the first line keeps its result).
    """

    def __init__(self, tokenizer, *, max_model_len: int, vocab_size: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.seen: set[str] = set()

    def parse(self, raw: bytes, index: int) -> Request | RequestError:
        r = parse_line(raw, index, self.tokenizer, max_model_len=self.max_model_len,
                       vocab_size=self.vocab_size)
        cid = r.custom_id
        if cid is None:
            return r
        if cid in self.seen:
            return RequestError(index, cid, "duplicate_custom_id",
                                one_line(f"custom_id {_show(cid)} was already used by an earlier line"))
        self.seen.add(cid)
        return r

    def parse_all(self, lines: Iterable[tuple[int, bytes]]) -> Iterator[Request | RequestError]:
        """Each ``(index, raw)`` line parsed, in order, one by one as they are asked for."""
        for index, raw in lines:
            yield self.parse(raw, index)


READ_CHUNK = 1 << 20


def raw_lines(source) -> Iterator[bytes]:
    """The lines of ``source`` with their endings (split at b"\\n" only). ``source`` is a
    path, or a file opened in binary mode, read with ``os.pread`` from its start: several
    readers of one open file do not disturb each other, and a file opened once can be
    renamed or removed while it is read."""
    if not hasattr(source, "fileno"):
        with open(source, "rb") as f:
            yield from f
        return
    fd, off, pending = source.fileno(), 0, []
    while chunk := os.pread(fd, READ_CHUNK, off):
        off += len(chunk)
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            pending.append(chunk[start:nl + 1])
            yield b"".join(pending)
            pending, start = [], nl + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield b"".join(pending)


def read_requests(source) -> Iterator[tuple[int, bytes]]:
    """Yield (index, raw line without its line ending) for each non-blank line, streaming,
    from a path or an open binary file (see :func:`raw_lines`).

    ``index`` is the 0-based physical line number (blank lines are counted but not yielded);
    a last line without a newline is still a line.
    """
    for index, line in enumerate(raw_lines(source)):
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield index, line
