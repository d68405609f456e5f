"""The driver loop: requests in, micro-batch steps through the pipeline, results out.

    while engine.step(): pass

One step: take in requests (parsed: ``Request`` or ``RequestError``, pipemax/job.py) while the
queue is short (read ahead into pipemax/lookahead.py and queued in its order: the longest
first by default), launch every idle micro-batch, wait for
the next micro-batch to come back from the last stage, and land its tokens (finishing and
writing the requests that are done). Micro-batches are launched as soon as they come back, so
with at least as many micro-batches as stages every stage always has work.

Nothing a request line carries can stop the run: an exception raised while preparing one
request (``prepare``) or finishing it (``land``) becomes that request's ``internal_error``
line. Only the writer's own failure (the output file, pipemax/results.py) and the pipeline's
end the loop. Intake takes at most ``INTAKE_LINES`` requests per step, so the step-boundary
hooks (signals, control commands) run even on an input of nothing but bad lines.

The engine owns its state; the control commands (pipemax/ops/) change it only through its
verbs: ``pause``, ``resume``, ``drain``, ``cancel`` (and ``abandon`` for a failed job).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from pipemax.lookahead import Lookahead
from pipemax.pipeline import Pipeline
from pipemax.requests import Request, RequestError, one_line
from pipemax.results import error_line, ok_line, response_body
from pipemax.scheduler import Scheduler, StepPlan
from pipemax.sequence import Sequence
from pipemax.tokenizer import IncrementalDetokenizer

MAX_TOP_LOGPROBS = 20
INTAKE_LINES = 4096           # requests taken in per step at most
LOOKAHEAD = 16                # requests read ahead (longest first), per sequence that runs
MAX_LOOKAHEAD = 16384         # ... at most (their prompts are held tokenized,
MAX_LOOKAHEAD_TOKENS = 4 << 20    # ... and at most this many prompt tokens: ~150 MB)
COUNTS = ("requests_ok", "requests_error", "prompt_tokens", "prompt_tokens_cached",
          "output_tokens", "steps")


@dataclass
class Stats:
    requests_ok: int = 0
    requests_error: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0   # of those, taken from the prefix cache (not computed)
    output_tokens: int = 0
    steps: int = 0
    driver_wait_s: float = 0.0      # time the driver waited for the pipeline (rest: its own work)
    started: float = field(default_factory=time.monotonic)

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def counts(self) -> dict[str, int]:
        """The counters (``COUNTS``), to add up over jobs."""
        return {k: getattr(self, k) for k in COUNTS}

    def as_dict(self) -> dict:
        s = self.seconds()
        return {"requests_ok": self.requests_ok, "requests_error": self.requests_error,
                "prompt_tokens": self.prompt_tokens,
                "prompt_tokens_computed": self.prompt_tokens - self.prompt_tokens_cached,
                "prompt_cache_hit_share": self.hit_share(),
                "output_tokens": self.output_tokens,
                "steps": self.steps, "seconds": s, "driver_wait_s": self.driver_wait_s,
                "output_tok_s": self.output_tokens / s if s > 0 else 0.0,
                "total_tok_s": (self.prompt_tokens + self.output_tokens) / s if s > 0 else 0.0,
                "requests_s": self.requests_ok / s if s > 0 else 0.0}

    def hit_share(self) -> float:
        """Share of the prompt tokens taken from the prefix cache."""
        return self.prompt_tokens_cached / self.prompt_tokens if self.prompt_tokens else 0.0

    def summary(self) -> str:
        s = self.seconds()
        cached = (f" ({self.prompt_tokens - self.prompt_tokens_cached} computed, "
                  f"{100 * self.hit_share():.0f}% from the prefix cache)"
                  if self.prompt_tokens_cached else "")
        return (f"requests {self.requests_ok} ok, {self.requests_error} failed | tokens in "
                f"{self.prompt_tokens}{cached}, out {self.output_tokens} | {s:.2f} s | "
                f"{self.output_tokens / s if s > 0 else 0.0:.1f} output tok/s")


class Engine:
    def __init__(self, *, pipeline: Pipeline, sched: Scheduler, tokenizer, eos_ids: tuple,
                 max_model_len: int, model_name: str, seed: int,
                 write: Callable[[dict], None], requests: Iterator[Request | RequestError],
                 log: Callable[[str], None] | None = None, hooks=None,
                 policy: str = "longest"):
        self.pipeline = pipeline
        self.sched = sched
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.write = write
        self.requests = requests
        self.lines_done = False
        self.log = log
        self.seed_rng = np.random.Generator(np.random.Philox(seed))
        self.inflight: dict[int, tuple[StepPlan, list[Sequence]]] = {}
        self.stats = Stats()
        self.step_no = 0
        running = sched.cfg.max_seqs_per_mb * sched.cfg.num_micro_batches
        self.queue_target = 2 * running
        # requests read ahead of the waiting queue, handed over in the policy's order
        self.ahead = Lookahead(policy, max_model_len)
        self.ahead_target = (min(LOOKAHEAD * running, MAX_LOOKAHEAD) if policy == "longest"
                             else self.queue_target)
        self.last_log = time.monotonic()
        # control (pipemax/ops/supervisor.py): hooks.at_step(engine) runs at every step
        # boundary and calls the verbs below; without hooks the loop is the plain batch loop
        self.hooks = hooks
        self.paused = False      # launch no new steps (the ones in flight still land)
        self.draining = False    # take no new requests (finish the running ones)
        self.cancelling: dict[int, Sequence] = {}   # id(seq) -> seq, cancelled in flight
        # pipemax/api.py: on_finish(seq) sees each finished sequence before its line is written
        self.on_finish: Callable[[Sequence], None] | None = None

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> Stats:
        self.stats = Stats()
        while self.step():
            pass
        return self.stats

    def step(self) -> bool:
        if self.hooks is not None and not self.hooks.at_step(self):
            return False                      # shutdown: stop now
        if not (self.paused or self.draining):
            self.intake()
        if not self.paused:
            for mb in self.idle_micro_batches():
                self.launch(mb)
        if not self.inflight:
            if self.paused:   # with work left: go on (at_step waits for "resume", no spinning)
                return self.has_work()
            if self.sched.has_work():   # nothing can run although work is left: a planning bug
                raise RuntimeError(f"scheduler stalled with {len(self.sched.waiting)} waiting "
                                   "and nothing in flight")
            # more lines than one intake read, or held back in the look-ahead
            return (not self.lines_done or len(self.ahead) > 0) and not self.draining
        t0 = time.monotonic()
        got = self.pipeline.recv()
        self.stats.driver_wait_s += time.monotonic() - t0
        self.land(*got)
        return True

    def start_job(self, requests: Iterator[Request | RequestError],
                  write: Callable[[dict], None]) -> None:
        """Serve these requests (a job's, parsed by its own parser: pipemax/job.py), with the
        same stages and KV cache."""
        self.requests, self.write, self.lines_done = requests, write, False

    # ---- verbs (control commands, at step boundaries) -------------------------------------
    def pause(self) -> int:
        """Launch no new steps; those in flight still land. Returns how many are in flight."""
        self.paused = True
        return len(self.inflight)

    def resume(self) -> bool:
        """Launch steps again; whether it was paused."""
        was, self.paused = self.paused, False
        return was

    def drain(self) -> int:
        """Take nothing new and drop the waiting queue (those requests get no line: a restart
        with the same output serves them); the running ones finish. Returns how many were
        dropped."""
        self.draining, self.paused = True, False
        return self.sched.drop_waiting() + self.ahead.clear()

    def cancel(self, ids: list[str]) -> dict[str, str]:
        """Drop the waiting or running requests with these custom_ids (their lines: error
        "cancelled"); what became of each. One whose micro-batch is in flight is dropped when
        it lands."""
        where = self.sched.by_custom_id()
        results = {}
        for cid in ids:
            s = where.pop(cid, None)
            if s is None and (s := self.ahead.remove(cid)) is not None:
                self._write_cancelled(s)            # read, not yet queued
                results[cid] = "cancelled (waiting)"
            elif s is None:
                results[cid] = results.get(cid, "not found")
            elif s.mb < 0:
                self.sched.remove_waiting(s)
                self._write_cancelled(s)
                results[cid] = "cancelled (waiting)"
            elif s.mb in self.inflight:
                self.cancelling[id(s)] = s
                results[cid] = "cancelling (running): dropped when its micro-batch lands"
            else:
                self.sched.finish(s)
                self._write_cancelled(s)
                results[cid] = "cancelled (running)"
        return results

    def held(self) -> bool:
        """Paused with nothing in flight and work left: nothing lands until ``resume``."""
        return self.paused and not self.inflight and self.has_work()

    def has_work(self) -> bool:
        """Input left to read, or sequences waiting or running."""
        return not self.lines_done or len(self.ahead) > 0 or self.sched.has_work()

    def queue_sizes(self) -> dict[str, int]:
        return {"running": self.sched.num_running(),
                "waiting": len(self.sched.waiting) + len(self.ahead)}

    def _drop_cancelled(self) -> None:
        for key, s in list(self.cancelling.items()):
            if s.finish_reason is not None:        # it finished before the cancel applied
                del self.cancelling[key]
            elif s.mb < 0:                         # back in the waiting queue
                del self.cancelling[key]
                if self.sched.remove_waiting(s):
                    self._write_cancelled(s)
            elif s.mb not in self.inflight:
                del self.cancelling[key]
                self.sched.finish(s)
                self._write_cancelled(s)

    def _write_cancelled(self, s: Sequence) -> None:
        self._write_error(RequestError(s.req.index, s.req.custom_id, "cancelled",
                                       "cancelled by a control command"))

    def _write_error(self, e: RequestError) -> None:
        self.write(error_line(e))
        self.stats.requests_error += 1

    # ---- pieces ---------------------------------------------------------------------------
    def intake(self) -> None:
        """Read requests into the look-ahead (a bad line's error is written at once), then
        fill the scheduler's waiting queue from it in the policy's order."""
        for _ in range(INTAKE_LINES):
            short = len(self.sched.waiting) + len(self.ahead) < self.queue_target
            if self.lines_done or not short and (len(self.ahead) >= self.ahead_target
                                                 or self.ahead.tokens >= MAX_LOOKAHEAD_TOKENS):
                break             # (the queue is always filled, whatever the look-ahead holds)
            try:
                r = next(self.requests)
            except StopIteration:
                self.lines_done = True
                break
            if isinstance(r, Request):
                r = self.prepare(r)
            if isinstance(r, RequestError):
                self._write_error(r)
            else:
                self.ahead.push(r)
        while len(self.ahead) and len(self.sched.waiting) < self.queue_target:
            self.sched.add(self.ahead.pop())

    def prepare(self, r: Request) -> Sequence | RequestError:
        """The request as a sequence ready to schedule, or its error (any exception here is
        this request's error, not the run's end)."""
        try:
            r = self.check_fits(r)
            if isinstance(r, RequestError):
                return r
            seed = r.params.seed if r.params.seed is not None else int(
                self.seed_rng.integers(1 << 62))
            seq = Sequence(r, seed)
            if self.tokenizer is not None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, list(r.params.stop))
            return seq
        except Exception as e:  # noqa: BLE001 - one request's failure is its own error line
            return internal_error(r, "could not prepare the request", e)

    def check_fits(self, r: Request) -> Request | RequestError:
        """A sequence must fit the KV cache alone: refuse the prompt or clamp max_tokens."""
        cap = self.sched.max_tokens_servable()
        if len(r.prompt_ids) + 1 > cap:
            return RequestError(r.index, r.custom_id, "prompt_too_long",
                                f"prompt of {len(r.prompt_ids)} tokens does not fit the KV "
                                f"cache of {cap} tokens")
        if len(r.prompt_ids) + r.params.max_tokens > cap:
            params = dataclasses.replace(r.params, max_tokens=cap - len(r.prompt_ids))
            r = dataclasses.replace(r, params=params)
        return r

    def idle_micro_batches(self) -> list[int]:
        return [m for m in range(self.sched.cfg.num_micro_batches) if m not in self.inflight]

    def launch(self, mb: int) -> None:
        plan = self.sched.schedule(mb)
        if plan is None:
            return
        rows = [plan.seqs[r] for r in plan.sample_rows]
        n = len(rows)   # (each sequence holds its values as float32 / int64 already)
        temp = np.fromiter((s.temperature for s in rows), np.float32, n)
        top_p = np.fromiter((s.top_p for s in rows), np.float32, n)
        top_k = np.fromiter((s.top_k for s in rows), np.int64, n)
        u = np.fromiter((0.0 if s.params.greedy else s.rng.random() for s in rows),
                        np.float32, n)
        num_top = max((s.params.logprobs or 0 for s in rows), default=0)
        self.pipeline.send_step(plan, self.step_no,
                                {"temperature": temp, "top_p": top_p, "top_k": top_k, "u": u},
                                min(num_top, MAX_TOP_LOGPROBS))
        self.inflight[mb] = (plan, rows)
        self.step_no += 1

    def land(self, meta: dict, t: dict) -> None:
        plan, rows = self.inflight.pop(meta["mb"])
        tokens = t["token_ids"].tolist()
        self.sched.complete(plan, tokens)
        self.stats.steps += 1
        lps = t["logprobs"].tolist()
        top_ids = t["top_ids"].tolist()
        top_lps = t["top_logprobs"].tolist()
        for i, (s, tok) in enumerate(zip(rows, tokens)):
            try:
                if s.logprobs is not None:
                    k = s.params.logprobs
                    s.logprobs.append((tok, lps[i], list(zip(top_ids[i][:k], top_lps[i][:k]))))
                s.finish_reason = self.finish_reason(s, tok)
                line = self.result_line(s) if s.finish_reason else None
                if line is not None and self.on_finish is not None:
                    self.on_finish(s)
            except Exception as e:  # noqa: BLE001 - this request's error line, not the run's end
                s.finish_reason = "error"
                line = error_line(internal_error(s.req, "could not finish the request", e))
            if line is not None:
                self.sched.finish(s)
                self.write(line)
                if line["error"] is None:
                    self.stats.requests_ok += 1
                    self.stats.prompt_tokens += s.num_prompt
                    self.stats.prompt_tokens_cached += min(s.num_cached, s.num_prompt)
                    self.stats.output_tokens += s.num_output
                else:
                    self.stats.requests_error += 1
        if self.cancelling:
            self._drop_cancelled()
        self.maybe_log()

    def abandon(self) -> None:
        """Drop every request without writing a line (the job's files failed, service mode):
        the micro-batches in flight land unused, every sequence's blocks are released, and
        the stages and the KV cache are ready for the next job."""
        self.lines_done = True
        while self.inflight:
            meta, _ = self.pipeline.recv()
            self.inflight.pop(meta["mb"])
        self.cancelling.clear()
        self.ahead.clear()
        self.sched.drop_waiting()
        self.sched.drop_running()

    def finish_reason(self, s: Sequence, tok: int) -> str | None:
        p = s.params
        is_stop_token = (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
        d = s.detok
        if is_stop_token:
            return "stop"
        if d is not None and d.add(tok):
            return "stop"
        if s.num_output >= p.max_tokens or len(s.token_ids) >= self.max_model_len:
            return "length"
        return None

    def result_line(self, s: Sequence) -> dict:
        d, s.detok = s.detok, None
        text = d.text if d is not None else ""
        req = s.req
        body = response_body(req, text=text, token_ids=s.output_ids,
                             finish_reason=s.finish_reason, logprobs=s.logprobs,
                             model_name=req.model or self.model_name,
                             created=int(time.time()), tokenizer=self.tokenizer)
        return ok_line(req, body)

    def maybe_log(self) -> None:
        now = time.monotonic()
        if self.log is None or self.hooks is not None or now - self.last_log < 10.0:
            # (with hooks, pipemax/ops/progress.py reports progress instead)
            return
        self.last_log = now
        st = self.stats
        self.log(f"done {st.requests_ok + st.requests_error} requests, running "
                 f"{self.sched.num_running()}, waiting {self.queue_sizes()['waiting']}, "
                 f"{st.output_tokens / max(st.seconds(), 1e-9):.1f} output tok/s")


def internal_error(req: Request, what: str, e: Exception) -> RequestError:
    return RequestError(req.index, req.custom_id, "internal_error",
                        one_line(f"{what}: {type(e).__name__}: {e}"))
