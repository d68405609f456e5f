"""The engine's hooks: control commands, signals, progress, status and systemd, at step
boundaries.

The driver is single-threaded. ``Engine.step()`` calls ``at_step(engine)`` first; here, in the
engine's own thread, the commands queued by the control socket (pipemax/control.py) are applied,
a SIGTERM becomes a drain, the status snapshot is published for the socket's threads, the
progress display is updated and the systemd watchdog is fed:

* pause: ``engine.paused``: no new steps are launched; those in flight still land. While paused
  with nothing in flight, ``at_step`` blocks on the command queue (with a timeout), so the loop
  does not spin.
* drain (command or first SIGTERM): ``engine.draining``: no more intake; the waiting queue is
  dropped (those requests have no result line, so a restart with the same --output serves
  them); the running sequences finish; then the run ends with exit code 0.
* cancel: a waiting sequence leaves the queue; a running one is finished at once
  (``sched.finish``) if its micro-batch is not in flight, else marked and dropped at the first
  step boundary after its micro-batch lands. Either way its line is an error "cancelled".
* shutdown: ``at_step`` returns False: the loop ends at once, what is in flight is abandoned
  (served again by a restart), finished results are kept, exit code 0.

Stage busy share: the driver cannot see inside the pipeline, so it is estimated from what the
driver sees at step boundaries: a stage can only work while a micro-batch is in flight, and with
m micro-batches in flight at most min(m, S) of the S stages are busy. The estimate is the time
average (decaying over ~30 s) of min(m, S) / S, the same figure for every stage (layers are
split so that stages take about the same time per step); it is an upper bound: queueing in the
rings and transfer time count as busy.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

from pipemax.control import Command, ControlServer
from pipemax.job import Job, JobError, check_paths
from pipemax.notify import Notifier
from pipemax.progress import Progress
from pipemax.requests import RequestError
from pipemax.results import error_line

REFRESH = 0.25            # s between snapshots / progress updates
NOTIFY_PERIOD = 2.0       # s between systemd STATUS= updates
IDLE_WAIT = 0.5           # s per wait on the command queue while paused or idle
BUSY_TAU = 30.0           # s, decay of the stage busy estimate
BUSY_METHOD = ("estimated from the driver: time average of min(micro-batches in flight, "
               "stages) / stages, the same for every stage (an upper bound)")


class Supervisor:
    def __init__(self, *, interrupts, control: ControlServer | None = None,
                 notifier: Notifier | None = None, progress: Progress | None = None,
                 service=None, log: Callable[[str], None] | None = None, num_stages: int = 1,
                 block_size: int = 16):
        self.interrupts = interrupts
        self.control = control
        self.notifier = notifier or Notifier()
        self.progress = progress
        self.service = service            # pipemax/service.py in --serve mode
        self._log = log or (lambda m: None)
        self.num_stages = num_stages
        self.block_size = block_size
        self.phase = "loading"
        self.outcome = "done"             # done | drained | shutdown
        self.stop_now = False
        self.draining = False
        self.job: Job | None = None
        self.in_job = False               # between begin_job and end_job
        self.engine = None
        self.marked: dict[int, object] = {}   # id(seq) -> seq, cancelled while in flight
        self.started = time.monotonic()
        self.totals = {"requests_ok": 0, "requests_error": 0, "prompt_tokens": 0,
                       "prompt_tokens_cached": 0, "output_tokens": 0, "steps": 0}
        self.last_refresh = 0.0
        self.last_notify = 0.0
        self._busy = 0.0
        self._wall = 0.0
        self._t_busy = None
        self._steps_seen = 0
        self.publish()

    def log(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.clear()
        self._log(msg)

    def start(self) -> None:
        """Open the control socket (raises ControlError)."""
        if self.control is not None:
            self.control.start()
            self.log(f"control socket {self.control.path} (python -m pipemax.ctl status "
                     f"--socket {self.control.path})")

    def close(self) -> None:
        """Every exit path: STOPPING=1, the socket file removed."""
        try:
            self.finish()
        finally:
            if self.control is not None:
                self.control.close()

    # ---- lifecycle ------------------------------------------------------------------------
    def loaded(self, engine) -> None:
        """The model is loaded and the engine built: READY=1."""
        self.engine = engine
        self.phase = "idle" if self.service is not None else "running"
        self.notifier.ready("model loaded" + ("; waiting for jobs" if self.service else ""))
        self.refresh(force=True)

    def begin_job(self, job: Job | None) -> None:
        self.job = job
        self.in_job = True
        if job is not None and self.progress is not None:
            self.progress.start(job.total, label=f"job {job.id}: " if self.service else "")
        self.phase = "paused" if self.engine is not None and self.engine.paused else "running"
        self._steps_seen = 0
        self._t_busy = None
        self.refresh(force=True)

    def end_job(self) -> None:
        """After ``engine.run()`` returned: close the job, add its figures to the totals."""
        e, job = self.engine, self.job
        self.in_job = False
        if e is not None:
            for k in ("requests_ok", "requests_error", "prompt_tokens",
                      "prompt_tokens_cached", "output_tokens", "steps"):
                self.totals[k] += getattr(e.stats, k)
        if job is not None:
            if self.progress is not None:
                self.refresh(force=True)
                self.progress.finish()
            if self.outcome == "done":
                job.close("done")
            else:
                job.close("stopped", f"{self.outcome}; a restart with the same output "
                                     "serves the rest")
            if e is not None:
                job.final_stats = e.stats.as_dict()
        self.job = None
        if self.service is None or self.outcome != "done":
            self.phase = "stopping" if self.outcome != "done" else "done"
        else:
            self.phase = "idle"
        self.refresh(force=True)

    def finish(self) -> None:
        """The run ends (every exit path): STOPPING=1."""
        self.phase = "done" if self.outcome == "done" and not self.stop_now else "stopping"
        self.publish()
        self.notifier.stopping(self.status_line())

    # ---- the hook -------------------------------------------------------------------------
    def at_step(self, engine) -> bool:
        """Called at the start of every ``Engine.step()``; False ends the loop (shutdown)."""
        now = time.monotonic()
        self._account_busy(engine, now)
        self._apply_all(engine)
        if self.marked:
            self._drop_marked(engine)
        while (engine.paused and not engine.inflight and not self.stop_now
               and (not engine.lines_done or engine.sched.has_work())):
            # nothing will land until "resume": wait on the socket's queue, do not spin
            self.refresh(force=True)
            self.notifier.watchdog()
            c = self.control.wait(IDLE_WAIT) if self.control is not None else None
            if c is None and self.control is None:
                time.sleep(IDLE_WAIT)
            if c is not None:
                self.apply(engine, c)
            self._apply_all(engine)
            now = time.monotonic()
        if now - self.last_refresh >= REFRESH:
            self.refresh(now=now)
        self.notifier.watchdog(now)
        return not self.stop_now

    def _apply_all(self, engine) -> None:
        if self.interrupts is not None and getattr(self.interrupts, "drain_requested", False) \
                and not self.draining:
            self.drain(engine, "SIGTERM")
        if self.control is not None:
            for c in self.control.pending():
                self.apply(engine, c)

    def next_job(self) -> Job | None:
        """--serve, between jobs: wait for one (applying commands); None on drain/shutdown."""
        while True:
            self._apply_all(self.engine)
            if self.draining or self.stop_now:
                return None
            job = self.service.next()
            if job is not None:
                return job
            self.refresh(force=True)
            self.notifier.watchdog()
            c = self.control.wait(IDLE_WAIT) if self.control is not None else None
            if c is not None:
                self.apply(self.engine, c)

    # ---- commands -------------------------------------------------------------------------
    def apply(self, engine, c: Command) -> None:
        try:
            getattr(self, f"_cmd_{c.cmd}")(engine, c)
        except Exception as e:  # noqa: BLE001 - a command's failure is the command's reply
            # never let a command stop the run; say what went wrong
            c.answer(False, error=f"{c.cmd} failed: {type(e).__name__}: {e}")
            self.log(f"control command {c.cmd} failed: {type(e).__name__}: {e}")
        finally:
            self.refresh(force=True)

    def _cmd_pause(self, engine, c: Command) -> None:
        if self.draining:
            c.answer(False, error="draining: pause does not apply")
            return
        engine.paused = True
        self.phase = "paused"
        self.log("paused by a control command (the micro-batches in flight still land)")
        c.answer(True, phase="paused", in_flight=len(engine.inflight))

    def _cmd_resume(self, engine, c: Command) -> None:
        was = engine.paused
        engine.paused = False
        if self.phase == "paused":
            self.phase = "running" if self.job is not None or self.service is None else "idle"
        if was:
            self.log("resumed by a control command")
        c.answer(True, phase=self.phase, was_paused=was)

    def _cmd_drain(self, engine, c: Command) -> None:
        self.drain(engine, "drain command")
        c.answer(True, phase="draining", running=engine.sched.num_running())

    def _cmd_shutdown(self, engine, c: Command) -> None:
        self.stop_now = True
        self.outcome = "shutdown"
        self.phase = "stopping"
        self.log("shutdown by a control command: stopping now; finished results are kept")
        c.answer(True, phase="stopping")

    def _cmd_cancel(self, engine, c: Command) -> None:
        if c.msg.get("job") is not None and c.msg.get("custom_id") is None \
                and c.msg.get("custom_ids") is None:
            if self.service is None:
                c.answer(False, error="cancel by job: only in --serve mode")
                return
            ok, msg = self.service.cancel(int(c.msg["job"]))
            c.answer(ok, **({"message": msg} if ok else {"error": msg}))
            return
        ids = c.msg.get("custom_ids") or [c.msg["custom_id"]]
        results = self.cancel(engine, ids)
        n = sum(1 for r in results.values() if r != "not found")
        if n:
            self.log(f"cancel: {n} request(s) dropped by a control command")
        found = [cid for cid, r in results.items() if r != "not found"]
        if not found:
            c.answer(False, error=("no waiting or running request has custom_id "
                                   + ", ".join(repr(i) for i in ids[:5])
                                   + ("..." if len(ids) > 5 else "")), results=results)
        else:
            c.answer(True, results=results)

    def _cmd_submit(self, engine, c: Command) -> None:
        if self.service is None:
            c.answer(False, error="submit: this run is a batch; start pipemax with --serve "
                                  "to take jobs")
            return
        if self.draining or self.stop_now:
            c.answer(False, error="the service is draining; it takes no new jobs")
            return
        m = c.msg
        try:
            check_paths(m["input"], m["output"], m.get("errors"))
            job = self.service.submit(m["input"], m["output"], m.get("errors"))
        except JobError as e:
            c.answer(False, error=str(e))
            return
        self.log(f"job {job.id} queued: {job.input} -> {job.output}")
        c.answer(True, job=job.id, queued=self.service.num_queued())

    # ---- actions --------------------------------------------------------------------------
    def drain(self, engine, why: str) -> None:
        if self.draining or engine is None:
            return
        self.draining = True
        self.outcome = "drained"
        engine.draining = True
        engine.paused = False
        sched = engine.sched
        dropped = len(sched.waiting)
        sched.waiting.clear()
        self.phase = "draining"
        left = "" if self.job is None else (
            f"; {dropped} waiting request(s) and the rest of {self.job.input} are left for a "
            f"restart with the same output")
        self.log(f"draining ({why}): finishing {sched.num_running()} running request(s), "
                 f"taking nothing new{left}")
        self.notifier.stopping(self.status_line())

    def cancel(self, engine, ids: list[str]) -> dict[str, str]:
        """Drop the waiting or running requests with these custom_ids; what became of each."""
        sched = engine.sched
        where = {s.req.custom_id: s for s in sched.waiting}
        for run in sched.running:
            where.update((s.req.custom_id, s) for s in run)
        results = {}
        for cid in ids:
            s = where.pop(cid, None)
            if s is None:
                results[cid] = results.get(cid, "not found")
            elif s.mb < 0:
                sched.waiting.remove(s)
                self._write_cancelled(engine, s)
                results[cid] = "cancelled (waiting)"
            elif s.mb in engine.inflight:
                self.marked[id(s)] = s
                results[cid] = "cancelling (running): dropped when its micro-batch lands"
            else:
                sched.finish(s)
                self._write_cancelled(engine, s)
                results[cid] = "cancelled (running)"
        return results

    def _drop_marked(self, engine) -> None:
        for key, s in list(self.marked.items()):
            if s.finish_reason is not None:        # it finished before the cancel applied
                del self.marked[key]
            elif s.mb < 0:                         # back in the waiting queue
                del self.marked[key]
                if s in engine.sched.waiting:
                    engine.sched.waiting.remove(s)
                    self._write_cancelled(engine, s)
            elif s.mb not in engine.inflight:
                del self.marked[key]
                engine.sched.finish(s)
                self._write_cancelled(engine, s)

    def _write_cancelled(self, engine, s) -> None:
        engine.write(error_line(RequestError(s.req.index, s.req.custom_id, "cancelled",
                                             "cancelled by a control command")))
        engine.stats.requests_error += 1

    # ---- figures --------------------------------------------------------------------------
    def _account_busy(self, engine, now: float) -> None:
        steps = engine.stats.steps
        if self._t_busy is not None:
            dt = now - self._t_busy
            landed = steps > self._steps_seen
            m = len(engine.inflight) + (1 if landed else 0)
            decay = math.exp(-dt / BUSY_TAU)
            self._busy = self._busy * decay + dt * min(m, self.num_stages) / self.num_stages
            self._wall = self._wall * decay + dt
        self._t_busy = now
        self._steps_seen = steps

    def busy_share(self) -> float:
        return self._busy / self._wall if self._wall > 0 else 0.0

    def status_line(self) -> str:
        p = self.progress
        if self.phase in ("idle", "loading") or self.job is None or p is None:
            if self.service is not None and self.phase == "idle":
                return f"idle: waiting for jobs ({self.service.num_queued()} queued)"
            return self.phase
        return f"{self.phase}: job {self.job.id}, {p.text()}"

    def refresh(self, now: float | None = None, force: bool = False) -> None:
        now = time.monotonic() if now is None else now
        self.last_refresh = now
        e, job = self.engine, self.job
        if job is not None and e is not None and self.progress is not None:
            self.progress.update(done=job.done, resumed=job.resume.skipped,
                                 tokens=e.stats.output_tokens, running=e.sched.num_running(),
                                 waiting=len(e.sched.waiting), now=now)
        self.publish()
        if self.notifier.enabled and (force or now - self.last_notify >= NOTIFY_PERIOD):
            self.last_notify = now
            self.notifier.status(self.status_line())

    def snapshot(self) -> dict:
        e, job, p = self.engine, self.job, self.progress
        snap = {"pid": os.getpid(), "mode": "serve" if self.service is not None else "batch",
                "phase": self.phase, "paused": bool(e is not None and e.paused),
                "draining": self.draining, "uptime_s": time.monotonic() - self.started,
                "tok_s": 0.0, "eta_s": None, "job": None,
                "requests": {"total": 0, "done": 0, "resumed": 0, "ok": 0, "failed": 0,
                             "running": 0, "waiting": 0},
                "totals": dict(self.totals), "stages": [], "kv": None, "preemptions": 0}
        if self.service is not None:
            snap["jobs"] = self.service.as_list()
        elif job is not None:
            snap["jobs"] = [job.as_dict()]
        else:
            snap["jobs"] = []
        if e is None:
            return snap
        st = e.stats
        if self.in_job:
            for k in ("requests_ok", "requests_error", "prompt_tokens",
                      "prompt_tokens_cached", "output_tokens", "steps"):
                snap["totals"][k] += getattr(st, k)
        sched = e.sched
        snap["requests"].update(running=sched.num_running(), waiting=len(sched.waiting))
        if job is not None:
            snap["job"] = job.as_dict()
            snap["requests"].update(total=job.total, done=job.done, resumed=job.resume.skipped,
                                    ok=job.counts["ok"], failed=job.counts["error"])
            if p is not None:
                snap["tok_s"] = p.tok_s()
                snap["eta_s"] = p.eta_s()
        blocks = sched.blocks
        host = getattr(sched, "host", None)
        snap["kv"] = {"block_size": self.block_size, "gpu_total": blocks.num_blocks,
                      "gpu_used": blocks.num_blocks - blocks.num_free,
                      "gpu_cached_idle": getattr(blocks, "num_idle_cached", 0),
                      "host_total": getattr(host, "num_blocks", None),
                      "host_used": getattr(host, "used", None)}
        snap["preemptions"] = int(getattr(sched, "num_preemptions", 0))
        share = self.busy_share()
        snap["stages"] = [{"stage": i, "busy": share} for i in range(self.num_stages)]
        snap["stage_busy_method"] = BUSY_METHOD
        wait, secs = getattr(st, "driver_wait_s", None), st.seconds()
        if wait is not None and secs > 0 and self.in_job:   # the driver's own share of time
            snap["driver_busy"] = max(0.0, min(1.0, 1.0 - wait / secs))
        return snap

    def publish(self) -> None:
        if self.control is not None:
            self.control.publish(self.snapshot())


def build(cfg, interrupts, log: Callable[[str], None]) -> Supervisor:
    """The run's operations from its config: control socket (not started yet: ``start()``),
    systemd notifier, progress display, and the job queue with ``--serve``."""
    from pipemax.control import default_socket_path
    from pipemax.service import Service
    from pipemax.status import prometheus
    control = None
    if not cfg.no_socket:
        path = cfg.socket or default_socket_path()
        if path is not None:
            group = None
            if cfg.socket_group is not None:
                import grp
                group = grp.getgrnam(cfg.socket_group).gr_gid
            control = ControlServer(path, group=group, log=log, render_metrics=prometheus)
        elif cfg.serve:
            from pipemax.control import ControlError
            raise ControlError("no folder for the control socket ($RUNTIME_DIRECTORY, "
                               "$XDG_RUNTIME_DIR or /tmp/pipemax-<uid>): give --socket PATH")
        else:
            log("no folder for the control socket; running without one (give --socket PATH)")
    # the rates behind status/ETA are kept even when nothing is shown ("off")
    show = not (cfg.quiet or cfg.progress == "off") and (cfg.input is not None or cfg.serve)
    progress = Progress(cfg.progress if show else "off", cfg.progress_interval)
    return Supervisor(interrupts=interrupts, control=control, notifier=Notifier.from_env(),
                      progress=progress, service=Service(log) if cfg.serve else None, log=log,
                      num_stages=cfg.gpus, block_size=cfg.block_size)
