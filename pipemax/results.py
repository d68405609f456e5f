"""Output lines: OpenAI response objects and the append-only result-file writer.

A result line is OpenAI's batch output format::

    {"id": "batch_req_<hex>", "custom_id": ..., "response": {"status_code": 200,
     "request_id": "req_<hex>", "body": <text_completion | chat.completion>}, "error": null}
    {"id": "batch_req_<hex>", "custom_id": ..., "response": null,
     "error": {"code": ..., "message": ...}}

Logprobs come from the engine as one entry per generated token:
``(token_id, logprob, [(alt_id, alt_logprob), ...])``. Token text is ``tokenizer.token_str(id)``
(``str(id)`` without a tokenizer). Non-finite logprobs are written as -9999.0 (as vLLM does),
so every line is strict JSON.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import secrets
import time
from pathlib import Path

from pipemax.requests import Request, RequestError

LOGPROB_FLOOR = -9999.0


def _hex() -> str:
    return secrets.token_hex(16)


def _lp(x) -> float:
    x = float(x)
    return x if math.isfinite(x) and x > LOGPROB_FLOOR else LOGPROB_FLOOR


def _tok(tokenizer, token_id: int) -> str:
    return str(token_id) if tokenizer is None else tokenizer.token_str(int(token_id))


def _usage(req: Request, token_ids) -> dict:
    n_prompt, n_out = len(req.prompt_ids), len(token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def _completion_logprobs(logprobs, tokenizer) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for token_id, lp, alts in logprobs:
        tok = _tok(tokenizer, token_id)
        tokens.append(tok)
        token_lps.append(_lp(lp))
        top = {}
        for alt_id, alt_lp in alts:
            top.setdefault(_tok(tokenizer, alt_id), _lp(alt_lp))
        top.setdefault(tok, _lp(lp))  # OpenAI: the chosen token is always in top_logprobs
        tops.append(top)
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _chat_entry(tok: str, lp) -> dict:
    return {"token": tok, "logprob": _lp(lp), "bytes": list(tok.encode("utf-8", "replace"))}


def _chat_logprobs(logprobs, tokenizer) -> dict:
    content = []
    for token_id, lp, alts in logprobs:
        entry = _chat_entry(_tok(tokenizer, token_id), lp)
        entry["top_logprobs"] = [_chat_entry(_tok(tokenizer, a), alp) for a, alp in alts]
        content.append(entry)
    return {"content": content}


# per request kind: (id prefix, object, the choice's text field, its logprobs)
_KINDS = {
    "completion": ("cmpl", "text_completion", lambda text: {"text": text},
                   _completion_logprobs),
    "chat": ("chatcmpl", "chat.completion",
             lambda text: {"message": {"role": "assistant", "content": text}}, _chat_logprobs),
}


def response_body(req: Request, *, text: str, token_ids: list[int], finish_reason: str,
                  logprobs: list | None, model_name: str, created: int,
                  tokenizer=None) -> dict:
    """OpenAI ``text_completion`` or ``chat.completion`` object, by ``req.kind``. ``model`` is
    the request's own model name if it gave one."""
    prefix, obj, content, format_logprobs = _KINDS[req.kind]
    choice = {"index": 0, **content(text),
              "logprobs": None if logprobs is None else format_logprobs(logprobs, tokenizer),
              "finish_reason": finish_reason}
    if req.return_token_ids:
        choice["token_ids"] = [int(t) for t in token_ids]
    return {"id": f"{prefix}-{_hex()}", "object": obj, "created": int(created),
            "model": req.model or model_name, "choices": [choice],
            "usage": _usage(req, token_ids)}


def ok_line(req: Request, body: dict) -> dict:
    return {"id": f"batch_req_{_hex()}", "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{_hex()}", "body": body},
            "error": None}


def error_line(err: RequestError) -> dict:
    return {"id": f"batch_req_{_hex()}", "custom_id": err.custom_id, "response": None,
            "error": {"code": err.code, "message": err.message}}


def encode_line(line: dict) -> bytes:
    """One compact JSON line, UTF-8, ending in a newline.

    A lone surrogate (possible in a custom_id read from ``"\\ud800"``) is written back as its
    JSON escape instead of failing the write.
    """
    s = json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # characters that some line readers (Python's str.splitlines) take for line breaks
    s = s.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return s.encode("utf-8", "backslashreplace") + b"\n"


class OutputError(Exception):
    """A result file cannot be written (disk full, removed during the run, locked by another
    run); one line for the user."""


def _open_append(path):
    """Unbuffered: a line is handed to the OS in one piece or fails there, so nothing waits in
    a buffer to fail again at close."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "ab", buffering=0)
    # A run killed mid-write may have left a last line without its newline: end it, so the
    # lines appended now stay parseable.
    if f.tell() > 0:
        with open(path, "rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                _write_all(f, b"\n")
    return f


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def lock(path):
    """Open (creating it) ``path`` and take an exclusive advisory lock on it (``flock``), held
    while the returned file is open, by this process alone: a second run on the same output
    is refused (OutputError) while the first is alive, and the lock goes with its process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "ab", buffering=0)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise OutputError(f"{path} is in use by another run that is still going (it holds "
                          "the file's lock); wait for it to end or give another output "
                          "file") from None
    return f


class ResultWriter:
    """Appends result lines to ``path`` (error lines to ``errors_path`` when given).

    Each line is written in one call and not buffered (plus ``os.fsync`` with ``fsync=True``),
    so a reader sees it before close. ``counts`` = {"ok": n, "error": n} lines written.

    A write that fails (a full disk) cuts what it wrote of its line off again and raises
    ``OutputError``; so does a write, or ``check()``, that finds the file removed or replaced
    since it was opened (checked at most every ``CHECK_EVERY`` seconds).
    """
    CHECK_EVERY = 1.0

    def __init__(self, path, errors_path=None, *, fsync: bool = False):
        self.fsync = fsync
        self.counts = {"ok": 0, "error": 0}
        self.failed: str | None = None
        self._f = _open_append(path)
        same = errors_path is None or os.path.abspath(errors_path) == os.path.abspath(path)
        self._ef = self._f if same else _open_append(errors_path)
        self._files = {id(self._f): (self._f, str(path))}
        if not same:
            self._files[id(self._ef)] = (self._ef, str(errors_path))
        self._size = {id(f): os.fstat(f.fileno()).st_size for f, _ in self._files.values()}
        self._checked = time.monotonic()

    def write(self, line: dict) -> None:
        if self.failed:
            raise OutputError(self.failed)
        if time.monotonic() - self._checked >= self.CHECK_EVERY:
            self.check()
        is_error = line.get("error") is not None
        f = self._ef if is_error else self._f
        data = encode_line(line)
        try:
            _write_all(f, data)
            if self.fsync:
                os.fsync(f.fileno())
        except OSError as e:
            try:                    # leave no torn line: cut back to the last whole one
                os.ftruncate(f.fileno(), self._size[id(f)])
            except OSError:
                pass                # (a torn last line is cut by the next run's resume scan)
            n = self.counts["ok"] + self.counts["error"]
            self._fail(f"cannot write {self._files[id(f)][1]}: {e.strerror or e}"
                       + (" (the filesystem is full)" if e.errno == errno.ENOSPC else "")
                       + f"; the {n} line(s) this run wrote before are whole on disk")
        self._size[id(f)] += len(data)
        self.counts["error" if is_error else "ok"] += 1

    def check(self) -> None:
        """OutputError if a result file was removed or replaced while it was written."""
        self._checked = time.monotonic()
        for f, path in self._files.values():
            if f.closed:
                continue
            st = os.fstat(f.fileno())
            try:
                now = os.stat(path)
                gone = (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)
            except FileNotFoundError:
                gone = True
            if gone:
                self._fail(f"{path} was removed or replaced while this run wrote to it; the "
                           "lines written to it are gone with it")

    def _fail(self, message: str):
        self.failed = message
        raise OutputError(message)

    def close(self) -> None:
        for f, _ in self._files.values():
            if not f.closed:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
