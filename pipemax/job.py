"""One job: an input file served into an output file (error lines optionally into their own
file), resumable.

``Job.open()`` repairs and reads what an earlier run with the same output left
(pipemax/resume.py), counts the input's requests for the progress figures and opens the result
writer for appending. ``lines()`` then gives the input lines still to serve; ``bind(parser)``
hands it the set of custom_ids the engine's parser has seen (call it before the first line is
read). The driver is single-threaded: all of this runs in the engine loop.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator

from pipemax.requests import read_requests
from pipemax.results import ResultWriter
from pipemax.resume import Resume, count_requests, scan


class JobError(ValueError):
    """The job's files cannot be used; one line for the user."""


class Job:
    def __init__(self, input: str, output: str, errors: str | None = None, *, job_id: int = 1,
                 log: Callable[[str], None] | None = None):
        self.id = job_id
        self.input = input
        self.output = output
        self.errors = errors
        self.log = log or (lambda m: None)
        self.state = "queued"          # queued | running | done | failed | stopped | cancelled
        self.message = ""
        self.total = 0                 # requests in the input
        self.resume = Resume()
        self.writer: ResultWriter | None = None
        self.parser_seen: set[str] | None = None
        self.submitted = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.counts = {"ok": 0, "error": 0}      # lines written by this run
        self.final_stats: dict | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def open(self) -> None:
        """Read what is done, count what there is to do, open the writer. Raises JobError."""
        try:
            with open(self.input, "rb") as f:
                f.read(1)
            self.resume = scan(self.output, self.errors)
            self.total = count_requests(self.input)
            self.writer = ResultWriter(self.output, self.errors)
        except OSError as e:
            raise JobError(f"{e.filename or self.output}: {e.strerror or e}") from None
        r = self.resume
        if r.torn_bytes:
            self.log(f"{self.output}: removed a torn last line ({r.torn_bytes} bytes) left by "
                     "an interrupted run; that request is served again")
        if r.unreadable:
            self.log(f"{self.output}: {r.unreadable} line(s) are not result lines; ignored")
        if not r.empty:
            self.log(f"resuming: {r.lines} request(s) already answered in {self.output}"
                     + (f" / {self.errors}" if self.errors else "") + " are skipped")
        self.state = "running"
        self.started = time.time()

    def bind(self, parser) -> None:
        """The engine's parser: skipped ids go into its ``seen`` set."""
        self.parser_seen = parser.seen

    def lines(self) -> Iterator[tuple[int, bytes]]:
        raw = read_requests(self.input)
        if self.resume.empty:
            yield from raw
            return
        if self.parser_seen is None:
            raise RuntimeError("Job.bind(parser) must come before the first line is read")
        yield from self.resume.filter(raw, self.parser_seen)

    def write(self, line: dict) -> None:
        self.writer.write(line)
        self.counts["error" if line.get("error") is not None else "ok"] += 1

    def close(self, state: str | None = None, message: str = "") -> None:
        if self.writer is not None:
            self.writer.close()
        if state is not None:
            self.state = state
            self.message = message
            self.finished = time.time()

    # ---- figures --------------------------------------------------------------------------
    @property
    def done(self) -> int:
        """Requests answered: by earlier runs (skipped now) and by this one."""
        return self.resume.skipped + self.counts["ok"] + self.counts["error"]

    def as_dict(self) -> dict:
        return {"id": self.id, "input": self.input, "output": self.output,
                "errors": self.errors, "state": self.state, "message": self.message,
                "total": self.total, "done": self.done, "resumed": self.resume.skipped,
                "ok": self.counts["ok"], "failed": self.counts["error"],
                "submitted": self.submitted, "started": self.started,
                "finished": self.finished}


def check_paths(input: str, output: str, errors: str | None) -> None:
    """For jobs submitted through the socket: absolute paths, a readable input, writable
    output folders. Raises JobError."""
    for name, p in (("input", input), ("output", output), ("errors", errors)):
        if p is None:
            continue
        if not isinstance(p, str) or not p or "\0" in p:
            raise JobError(f"{name} must be a path")
        if not os.path.isabs(p):
            raise JobError(f"{name} path must be absolute, got {p!r}")
    try:
        with open(input, "rb") as f:
            f.read(1)
    except OSError as e:
        raise JobError(f"cannot read input file {input}: {e.strerror}") from None
    for p in (output, errors):
        if p is None:
            continue
        d = os.path.dirname(p)
        if os.path.isdir(p) or not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise JobError(f"cannot write {p}: folder {d} is missing or not writable"
                           if not os.path.isdir(p) else f"{p} is a folder")
