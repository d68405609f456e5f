"""One job: an input file served into an output file (error lines optionally into their own
file), resumable.

``Job.open()`` reads the input once, whole (renaming or removing it later does not disturb the
job), refuses an output or errors file that is the input itself or is held by another live run
(an advisory lock on each, held until ``close()``), repairs and reads what an earlier run with
the same output left (pipemax/resume.py) and opens the result writer for appending. The job
owns its parser (a fresh one per job, so custom_ids are unique per job): ``requests()`` gives
the input's requests still to serve, parsed (``Request`` or ``RequestError``), the lines an
earlier run answered skipped and every id counted for the duplicate check, in one pass.
``sample()`` gives the input's lines for the KV plan's estimate. A failure while the job runs
(the output is full or gone) raises ``JobFailed`` with one line; in service mode it ends that
job alone. The driver is single-threaded: all of this runs in the engine loop.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator

from pipemax.requests import Parser, Request, RequestError, read_requests
from pipemax.results import OutputError, ResultWriter, lock
from pipemax.resume import Resume, scan


class JobError(ValueError):
    """The job's files cannot be used; one line for the user."""


class JobFailed(RuntimeError):
    """The job cannot go on (its output is full or gone); one line for the user."""


def _result_paths(output: str, errors: str | None) -> list[str]:
    if errors is None or os.path.abspath(errors) == os.path.abspath(output):
        return [output]
    return [output, errors]


def _refuse_input(input_stat: os.stat_result, output: str, errors: str | None) -> None:
    """JobError if the output or errors file is the input file itself (the same inode): the
    run would read its own result lines back without end."""
    for name, p in (("output", output), ("errors", errors)):
        if p is None:
            continue
        try:
            st = os.stat(p)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (input_stat.st_dev, input_stat.st_ino):
            raise JobError(f"the {name} file {p} is the input file; give another {name} file")


class Job:
    def __init__(self, input: str, output: str, errors: str | None = None, *, parser: Parser,
                 job_id: int = 1, log: Callable[[str], None] | None = None):
        self.id = job_id
        self.parser = parser
        self.input = input
        self.output = output
        self.errors = errors
        self.log = log or (lambda m: None)
        self.state = "queued"          # queued | running | done | failed | stopped | cancelled
        self.message = ""
        self.total = 0                 # requests in the input
        self.resume = Resume()
        self.writer: ResultWriter | None = None
        self.submitted = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.counts = {"ok": 0, "error": 0}      # lines written by this run
        self.final_stats: dict | None = None
        self._lines: list[tuple[int, bytes]] = []   # the input, read by open()
        self._locks: list = []                   # the result files' locks, open() to close()

    # ---- lifecycle ------------------------------------------------------------------------
    def open(self) -> None:
        """Read the input and what is done, open the writer. Raises JobError."""
        try:
            with open(self.input, "rb") as f:
                _refuse_input(os.fstat(f.fileno()), self.output, self.errors)
                self._lines = list(read_requests(f))
            for p in _result_paths(self.output, self.errors):
                self._locks.append(lock(p))
            self.resume = scan(self.output, self.errors)
            self.total = len(self._lines)
            self.writer = ResultWriter(self.output, self.errors)
        except (OSError, OutputError, JobError) as e:
            self.close()
            if isinstance(e, OSError):
                e = f"{e.filename or self.output}: {e.strerror or e}"
            raise JobError(str(e)) from None
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

    def sample(self) -> Iterator[tuple[int, bytes]]:
        """Every input line (for the KV plan's estimate)."""
        return iter(self._lines)

    def requests(self) -> Iterator[Request | RequestError]:
        """The requests still to serve, parsed one by one: the lines an earlier run answered
        are skipped, and their ids still count for the duplicate check (the filter and the
        parser share the parser's ``seen`` set)."""
        return self.parser.parse_all(self.resume.filter(self._lines, self.parser.seen))

    def write(self, line: dict) -> None:
        try:
            self.writer.write(line)
        except OutputError as e:
            raise JobFailed(f"{e}; {self.done} of {self.total} request(s) of {self.input} "
                            "are answered; run again with the same output to serve the "
                            "rest") from None
        self.counts["error" if line.get("error") is not None else "ok"] += 1

    def close(self, state: str | None = None, message: str = "") -> None:
        """Close the files (and release the locks). With ``state`` "done", a result file
        found removed or replaced raises JobFailed first. A failed job stays failed."""
        failure = None
        if state == "done" and self.writer is not None and self.writer.failed is None:
            try:
                self.writer.check()
            except OutputError as e:
                failure = JobFailed(str(e))
                state, message = "failed", str(e)
        if self.writer is not None:
            self.writer.close()
        for f in self._locks:
            f.close()
        self._locks = []
        self._lines = []
        if state is not None and self.state != "failed":
            self.state = state
            self.message = message
            self.finished = time.time()
        if failure is not None:
            raise failure

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
            _refuse_input(os.fstat(f.fileno()), output, errors)
    except OSError as e:
        raise JobError(f"cannot read input file {input}: {e.strerror}") from None
    for p in (output, errors):
        if p is None:
            continue
        d = os.path.dirname(p)
        if os.path.isdir(p) or not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise JobError(f"cannot write {p}: folder {d} is missing or not writable"
                           if not os.path.isdir(p) else f"{p} is a folder")
