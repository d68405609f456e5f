"""The engine's hooks: control commands, signals, progress, status and systemd, at step
boundaries.

The driver is single-threaded. ``Engine.step()`` calls ``at_step(engine)`` first; here, in the
engine's own thread, the commands queued by the control socket (pipemax/ops/server.py) are
applied through their handlers (pipemax/ops/commands.py), a SIGTERM becomes a drain, the status
snapshot is published for the socket's threads, the progress display is updated and the
systemd watchdog is fed. The supervisor keeps the run's phase and outcome; the engine's state
changes only through the engine's verbs (pipemax/engine.py):

* pause: ``engine.pause()``: no new steps are launched; those in flight still land. While
  paused with nothing in flight, ``at_step`` blocks on the command queue (with a timeout), so
  the loop does not spin.
* drain (command or first SIGTERM): ``engine.drain()``: no more intake; the waiting queue is
  dropped (those requests have no result line, so a restart with the same --output serves
  them); the running sequences finish; then the run ends with exit code 0.
* cancel: ``engine.cancel(ids)``: a waiting sequence leaves the queue; a running one is
  finished at once if its micro-batch is not in flight, else dropped when its micro-batch
  lands. Either way its line is an error "cancelled".
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

from pipemax.engine import COUNTS
from pipemax.job import Job
from pipemax.ops.commands import COMMANDS
from pipemax.ops.notify import Notifier
from pipemax.ops.progress import Progress
from pipemax.ops.server import Command, ControlError, ControlServer
from pipemax.ops.service import Service
from pipemax.ops.sockets import default_socket_path
from pipemax.ops.status import prometheus

REFRESH = 0.25            # s between snapshots / progress updates
NOTIFY_PERIOD = 2.0       # s between systemd STATUS= updates
IDLE_WAIT = 0.5           # s per wait on the command queue while paused or idle
BUSY_TAU = 30.0           # s, decay of the stage busy estimate
BUSY_METHOD = ("estimated from the driver: time average of min(micro-batches in flight, "
               "stages) / stages, the same for every stage (an upper bound)")


class Supervisor:
    def __init__(self, *, interrupts, control: ControlServer | None = None,
                 notifier: Notifier | None = None, progress: Progress | None = None,
                 service: Service | None = None, log: Callable[[str], None] | None = None,
                 num_stages: int = 1):
        self.interrupts = interrupts
        self.control = control
        self.notifier = notifier or Notifier()
        self.progress = progress
        self.service = service            # pipemax/ops/service.py in --serve mode
        self._log = log or (lambda m: None)
        self.num_stages = num_stages
        self.phase = "loading"
        self.outcome = "done"             # done | drained | shutdown
        self.stop_now = False
        self.draining = False
        self.job: Job | None = None
        self.in_job = False               # between begin_job and end_job
        self.engine = None
        self.started = time.monotonic()
        self.totals = dict.fromkeys(COUNTS, 0)
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
            for k, v in e.stats.counts().items():
                self.totals[k] += v
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
        self._apply_all()
        while engine.held() and not self.stop_now:
            # nothing will land until "resume": wait on the socket's queue, do not spin
            self.refresh(force=True)
            self.notifier.watchdog()
            c = self.control.wait(IDLE_WAIT) if self.control is not None else None
            if c is None and self.control is None:
                time.sleep(IDLE_WAIT)
            if c is not None:
                self.apply(c)
            self._apply_all()
            now = time.monotonic()
        if now - self.last_refresh >= REFRESH:
            self.refresh(now=now)
        self.notifier.watchdog(now)
        return not self.stop_now

    def _apply_all(self) -> None:
        if self.interrupts is not None and getattr(self.interrupts, "drain_requested", False) \
                and not self.draining:
            self.drain("SIGTERM")
        if self.control is not None:
            for c in self.control.pending():
                self.apply(c)

    def next_job(self) -> Job | None:
        """--serve, between jobs: wait for one (applying commands); None on drain/shutdown."""
        while True:
            self._apply_all()
            if self.draining or self.stop_now:
                return None
            job = self.service.next()
            if job is not None:
                return job
            self.refresh(force=True)
            self.notifier.watchdog()
            c = self.control.wait(IDLE_WAIT) if self.control is not None else None
            if c is not None:
                self.apply(c)

    # ---- commands: the table's handlers (pipemax/ops/commands.py) ------------------------
    def apply(self, c: Command) -> None:
        try:
            reply = COMMANDS[c.cmd].handle(self, c.msg)
            c.answer(**reply)
            if c.answered_queued and not reply.get("ok", True):    # nobody hears the reply
                self.log(f"control command {c.cmd} (answered as queued) was refused: "
                         f"{reply.get('error')}")
        except Exception as e:  # noqa: BLE001 - a command's failure is the command's reply
            # never let a command stop the run; say what went wrong
            c.answer(False, error=f"{c.cmd} failed: {type(e).__name__}: {e}")
            self.log(f"control command {c.cmd} failed: {type(e).__name__}: {e}")
        finally:
            self.refresh(force=True)

    def pause(self) -> int:
        """The engine launches no new steps; how many micro-batches are still in flight."""
        in_flight = self.engine.pause()
        self.phase = "paused"
        self.log("paused by a control command (the micro-batches in flight still land)")
        return in_flight

    def resume(self) -> bool:
        """Undo pause; whether it was paused."""
        was = self.engine.resume()
        if self.phase == "paused":
            self.phase = "running" if self.job is not None or self.service is None else "idle"
        if was:
            self.log("resumed by a control command")
        return was

    def shutdown(self) -> None:
        self.stop_now = True
        self.outcome = "shutdown"
        self.phase = "stopping"
        self.log("shutdown by a control command: stopping now; finished results are kept")

    def drain(self, why: str) -> None:
        if self.draining or self.engine is None:
            return
        self.draining = True
        self.outcome = "drained"
        dropped = self.engine.drain()
        self.phase = "draining"
        left = "" if self.job is None else (
            f"; {dropped} waiting request(s) and the rest of {self.job.input} are left for a "
            f"restart with the same output")
        self.log(f"draining ({why}): finishing {self.engine.queue_sizes()['running']} running "
                 f"request(s), taking nothing new{left}")
        self.notifier.stopping(self.status_line())

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
                                 tokens=e.stats.output_tokens, now=now, **e.queue_sizes())
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
            for k, v in st.counts().items():
                snap["totals"][k] += v
        snap["requests"].update(e.queue_sizes())
        if job is not None:
            snap["job"] = job.as_dict()
            snap["requests"].update(total=job.total, done=job.done, resumed=job.resume.skipped,
                                    ok=job.counts["ok"], failed=job.counts["error"])
            if p is not None:
                snap["tok_s"] = p.tok_s()
                snap["eta_s"] = p.eta_s()
        snap["kv"] = e.sched.kv_usage()
        snap["preemptions"] = e.sched.num_preemptions
        share = self.busy_share()
        snap["stages"] = [{"stage": i, "busy": share} for i in range(self.num_stages)]
        snap["stage_busy_method"] = BUSY_METHOD
        wait, secs = st.driver_wait_s, st.seconds()
        if secs > 0 and self.in_job:   # the driver's own share of time
            snap["driver_busy"] = max(0.0, min(1.0, 1.0 - wait / secs))
        return snap

    def publish(self) -> None:
        if self.control is not None:
            self.control.publish(self.snapshot())


def build(cfg, interrupts, log: Callable[[str], None], new_parser) -> Supervisor:
    """The run's operations from its config: control socket (not started yet: ``start()``),
    systemd notifier, progress display, and the job queue with ``--serve`` (each job parsed by
    a parser of ``new_parser()``). Raises ControlError."""
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
            raise ControlError("no folder for the control socket ($RUNTIME_DIRECTORY, "
                               "$XDG_RUNTIME_DIR or /tmp/pipemax-<uid>): give --socket PATH")
        else:
            log("no folder for the control socket; running without one (give --socket PATH)")
    # the rates behind status/ETA are kept even when nothing is shown ("off")
    show = not (cfg.quiet or cfg.progress == "off") and (cfg.input is not None or cfg.serve)
    progress = Progress(cfg.progress if show else "off", cfg.progress_interval)
    service = Service(new_parser, log) if cfg.serve else None
    return Supervisor(interrupts=interrupts, control=control, notifier=Notifier.from_env(),
                      progress=progress, service=service, log=log, num_stages=cfg.gpus)
