"""Service mode (``--serve``): the model stays loaded; jobs (an input and an output path) come
through the control socket (``submit``) and run one after another, each resumable like a batch.

The queue lives in the driver and is touched only from the engine loop (the supervisor applies
``submit`` and ``cancel`` at step boundaries, and ``jobs`` reads the published snapshot), so it
needs no lock. Each job gets a fresh parser (``new_parser``), so custom_ids are unique per
job. Queued jobs are not kept across a restart of the service: submit them again (a
job's output resumes where it stopped, so nothing is served twice).
"""
from __future__ import annotations

from typing import Callable

from pipemax.job import Job, JobError, JobFailed
from pipemax.requests import Parser

MAX_JOBS_KEPT = 1000          # finished jobs listed by "jobs"


class Service:
    def __init__(self, new_parser: Callable[[], Parser],
                 log: Callable[[str], None] | None = None):
        self.new_parser = new_parser
        self.log = log or (lambda m: None)
        self.jobs: list[Job] = []
        self.next_id = 1

    def submit(self, input: str, output: str, errors: str | None = None) -> Job:
        for j in self.jobs:
            if j.state in ("queued", "running") and output in (j.output, j.errors):
                raise JobError(f"{output} is the output of job {j.id} ({j.state})")
        job = Job(input, output, errors, parser=self.new_parser(), job_id=self.next_id,
                  log=self.log)
        self.next_id += 1
        self.jobs.append(job)
        done = [j for j in self.jobs if j.state not in ("queued", "running")]
        for j in done[:max(0, len(done) - MAX_JOBS_KEPT)]:
            self.jobs.remove(j)
        return job

    def next(self) -> Job | None:
        for j in self.jobs:
            if j.state == "queued":
                return j
        return None

    def num_queued(self) -> int:
        return sum(1 for j in self.jobs if j.state == "queued")

    def cancel(self, job_id: int) -> tuple[bool, str]:
        for j in self.jobs:
            if j.id == job_id:
                if j.state != "queued":
                    return False, (f"job {job_id} is {j.state}; only queued jobs can be "
                                   "cancelled (cancel its requests by custom_id)")
                j.close("cancelled", "cancelled by a control command")
                return True, f"job {job_id} cancelled"
        return False, f"no job {job_id}"

    def as_list(self) -> list[dict]:
        return [j.as_dict() for j in self.jobs]


def serve(engine, sup, service: Service) -> str:
    """Run queued jobs until a drain or a shutdown; returns the outcome. A job whose files fail
    (missing or unreadable input, an output clash at its start; a full or vanished output
    while it runs) fails alone: its state and reason are in ``jobs``, and the
    service goes on with the next one."""
    while True:
        job = sup.next_job()
        if job is None:
            return sup.outcome
        try:
            job.open()
        except JobError as e:
            job.close("failed", str(e))
            sup.log(f"job {job.id} failed: {e}")
            continue
        sup.log(f"job {job.id} started: {job.input} -> {job.output} ({job.total} requests)")
        engine.start_job(job.requests(), job.write)
        sup.begin_job(job)
        failure = None
        try:
            stats = engine.run()
        except JobFailed as e:
            failure = e
            engine.abandon()           # its requests go unanswered; the stages stay
        except BaseException:
            job.close("failed", "the run stopped during this job")
            raise
        if failure is not None:
            job.close("failed", str(failure))
        try:
            sup.end_job()              # closes the job as done (or stopped)
        except JobFailed as e:         # its output was found removed at the end
            failure = e
        if failure is not None:
            sup.log(f"job {job.id} failed: {failure}")
        else:
            sup.log(f"job {job.id} {job.state}: {stats.summary()}")
        if sup.outcome != "done":
            return sup.outcome
