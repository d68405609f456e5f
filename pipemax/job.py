"""One job: an input file served into an output file (error lines optionally into their own
file), resumable.

``Job.open()`` opens the input once (it is read through that file from then on, so renaming or
removing it later does not disturb the job), refuses an output or errors file that is the
input itself or is held by another live run (an advisory lock on each, held until
``close()``), repairs and reads what an earlier run with the same output left
(pipemax/resume.py), counts the input's requests for the progress figures and opens the result
writer for appending. A failure while the job runs (the input cannot be read, the output is
full or gone) raises ``JobFailed`` with one line; in service mode it ends that job alone. ``lines()`` then gives the input lines still to serve; ``bind(parser)``
hands it the set of custom_ids the engine's parser has seen (call it before the first line is
read). The driver is single-threaded: all of this runs in the engine loop.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator

from pipemax.requests import read_requests
from pipemax.results import OutputError, ResultWriter, lock
from pipemax.resume import Resume, count_requests, scan


class JobError(ValueError):
    """The job's files cannot be used; one line for the user."""


class JobFailed(RuntimeError):
    """The job cannot go on (its input cannot be read, its output is full or gone); one line
    for the user."""


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
        self._input = None                       # the input, open from open() to close()
        self._locks: list = []                   # the result files' locks, likewise

    # ---- lifecycle ------------------------------------------------------------------------
    def open(self) -> None:
        """Read what is done, count what there is to do, open the writer. Raises JobError."""
        try:
            self._input = open(self.input, "rb")
            _refuse_input(os.fstat(self._input.fileno()), self.output, self.errors)
            for p in _result_paths(self.output, self.errors):
                self._locks.append(lock(p))
            self.resume = scan(self.output, self.errors)
            self.total = count_requests(self._input)
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

    def bind(self, parser) -> None:
        """The engine's parser: skipped ids go into its ``seen`` set."""
        self.parser_seen = parser.seen

    def requests(self) -> Iterator[tuple[int, bytes]]:
        """Every input line (from the file opened by ``open()``)."""
        try:
            yield from read_requests(self._input)
        except OSError as e:
            raise JobFailed(f"cannot read input file {self.input}: {e.strerror or e}") from None

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """The input lines still to serve."""
        raw = self.requests()
        if self.resume.empty:
            yield from raw
            return
        if self.parser_seen is None:
            raise RuntimeError("Job.bind(parser) must come before the first line is read")
        yield from self.resume.filter(raw, self.parser_seen)

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
        for f in [self._input, *self._locks]:
            if f is not None:
                f.close()
        self._locks = []
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
