"""Resuming a job: which input lines an earlier run already answered, and the torn tail it left.

Result lines are written in one call each and flushed as each request finishes, so after a
crash (or kill -9) the output holds whole lines, except perhaps a last line cut short.
``scan()`` cuts such a tail off (that request is served again and its line written anew) and
reads what the files hold; ``Resume.filter()`` then drops from the input every line that
already has its answer, so a restart with the same ``--output`` neither loses nor repeats one.

Which input line an output line answers:

* a string ``custom_id`` (given on the line, or ``"request-<n>"`` made by the parser for a line
  without one): the first input line with that id, whether the answer is a result or an error
  (``cancelled`` included);
* a ``duplicate_custom_id`` error: a *later* line with that id. Such errors are written at
  intake, in input order, so k of them answer the first k repeats;
* ``"custom_id": null`` (bad JSON, invalid UTF-8, a custom_id that is not a string): likewise
  written at intake in input order, so k of them answer the first k such input lines.

A skipped line's id is added to the parser's ``seen`` set, so a repeat of it further down is
still reported as a duplicate rather than served.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from pipemax.requests import raw_lines

_DECODER = json.JSONDecoder()
_OK_TAIL = b',"error":null}'
_PREFIX = b'{"id":'
_CID_KEY = b'"custom_id":'


def line_key(raw: bytes, index: int) -> str | None:
    """The custom_id the parser gives input line ``index`` (pipemax/requests.py:parse_line):
    the line's string custom_id, ``"request-<index+1>"`` without one, None if it has none."""
    try:
        obj = json.loads(bytes(raw).decode("utf-8").lstrip("\ufeff"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    cid = obj.get("custom_id")
    if cid is None:
        return f"request-{index + 1}"
    return cid if isinstance(cid, str) else None


def _answer(line: bytes) -> tuple[str | None, str | None]:
    """(custom_id, error code or None) of one output line; ValueError if it is not one."""
    line = line.rstrip(b"\r\n")
    if line.startswith(_PREFIX) and line.endswith(_OK_TAIL):
        # the writer's own ok line: read only the custom_id, not the (possibly large) body
        at = line.find(_CID_KEY)
        if at > 0:
            text = line[at + len(_CID_KEY):at + len(_CID_KEY) + 4096].decode("utf-8", "replace")
            try:
                cid, _ = _DECODER.raw_decode(text)
            except ValueError:
                cid = ...
            if cid is None or isinstance(cid, str):
                return cid, None
    d = json.loads(line)
    if not isinstance(d, dict) or "custom_id" not in d:
        raise ValueError("not a result line")
    cid = d["custom_id"]
    if cid is not None and not isinstance(cid, str):
        raise ValueError("custom_id is not a string")
    err = d.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    return cid, (str(code) if err is not None else None)


def repair(path) -> int:
    """Cut a torn last line (no newline: the writer died in the middle of it) off ``path``.
    Returns the number of bytes removed (0 if the file is whole or missing)."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos = size
        while pos > 0:                       # find the last newline, reading backwards
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = pos - step + nl + 1
                break
            pos -= step
        else:
            keep = 0
        f.truncate(keep)
        return size - keep


@dataclass
class Resume:
    """What earlier runs wrote to a job's output (and errors) file."""
    first: set[str] = field(default_factory=set)          # ids whose first line is answered
    repeats: Counter = field(default_factory=Counter)     # id -> answered duplicate lines
    nulls: int = 0                                        # answered lines without an id
    lines: int = 0                                        # answer lines read
    unreadable: int = 0                                   # complete lines that are not answers
    torn_bytes: int = 0                                   # bytes cut off torn last lines
    skipped: int = 0                                      # input lines skipped so far

    @property
    def empty(self) -> bool:
        return self.lines == 0

    def _add(self, cid: str | None, code: str | None) -> None:
        self.lines += 1
        if code == "duplicate_custom_id" and cid is not None:
            self.repeats[cid] += 1
        elif cid is None:
            self.nulls += 1
        else:
            self.first.add(cid)

    def filter(self, lines: Iterable[tuple[int, bytes]], seen: set[str]
               ) -> Iterator[tuple[int, bytes]]:
        """``lines`` without the ones already answered. ``seen`` is the parser's set of ids
        read so far (skipped ids are added to it); it must be the set of the parser that parses
        the lines yielded here, one by one, before the next is asked for."""
        first, repeats, nulls = set(self.first), Counter(self.repeats), self.nulls
        pending = len(first) + sum(repeats.values()) + nulls
        for index, raw in lines:
            if pending:
                k = line_key(raw, index)
                if k is None:
                    hit = nulls > 0
                    nulls -= hit
                elif k not in seen:
                    hit = k in first
                    if hit:
                        first.discard(k)
                        seen.add(k)
                else:
                    hit = repeats[k] > 0
                    if hit:
                        repeats[k] -= 1
                if hit:
                    pending -= 1
                    self.skipped += 1
                    continue
            yield index, raw


def scan(*paths) -> Resume:
    """Repair and read the result files of a job (missing files count as empty; a path given
    twice is read once)."""
    r = Resume()
    done = set()
    for p in paths:
        if p is None:
            continue
        key = os.path.abspath(p)
        if key in done:
            continue
        done.add(key)
        r.torn_bytes += repair(p)
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            continue
        with f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    cid, code = _answer(line)
                except (ValueError, RecursionError):
                    r.unreadable += 1
                    continue
                r._add(cid, code)
    return r


def count_requests(source) -> int:
    """Input lines the run will read (non-blank lines, as pipemax/requests.py:read_requests),
    from a path or an open binary file."""
    return sum(1 for line in raw_lines(source) if not line.isspace())
