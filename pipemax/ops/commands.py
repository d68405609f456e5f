"""The control commands, one entry each: its name, the check of its arguments, its handler and
how the client (pipemax/ops/ctl.py) asks for it and shows the reply. Adding a command is adding
an entry here.

Two kinds of handler:

* snapshot commands (``engine=False``) are answered in the connection's thread from the
  server (pipemax/ops/server.py): ``handle(server, msg)`` reads only the status snapshot the
  engine loop publishes;
* engine commands (``engine=True``) are queued; the engine loop applies them at a step
  boundary (pipemax/ops/supervisor.py): ``handle(supervisor, msg)`` calls the supervisor's and
  the engine's verbs.

Either returns the reply ``{"ok": bool, ...}`` (``"error"``: one line, when not ok). ``check``
runs in the connection's thread before an engine command is queued: an argument error is
answered at once. This module and the client import only the standard library (and msgpack).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from pipemax.ops.status import describe


def ok(**fields) -> dict:
    return {"ok": True, **fields}


def refused(error: str, **fields) -> dict:
    return {"ok": False, "error": error, **fields}


# ---- the client's side ---------------------------------------------------------------------
def _no_args(p: argparse.ArgumentParser) -> None:
    pass


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="the raw reply as JSON")


def show_plain(a, reply: dict) -> str:
    rest = {k: v for k, v in reply.items() if k != "ok"}
    return "ok" + (f" {json.dumps(rest, default=str)}" if rest else "")


@dataclass(frozen=True)
class Spec:
    name: str
    help: str                                   # one line, for the client's usage
    engine: bool                                # applied by the engine loop (else: snapshot)
    handle: Callable[[Any, dict], dict]         # (server | supervisor, msg) -> reply
    check: Callable[[dict], str | None] = lambda msg: None
    args: Callable[[argparse.ArgumentParser], None] | None = _no_args   # None: no client
    message: Callable[[argparse.Namespace], dict] | None = None         # None: {"cmd": name}
    show: Callable[[argparse.Namespace, dict], str] = show_plain

    def frame(self, a: argparse.Namespace) -> dict:
        """The client's command frame from its parsed arguments."""
        return self.message(a) if self.message is not None else {"cmd": self.name}


# ---- snapshot commands ---------------------------------------------------------------------
def _status(server, msg: dict) -> dict:
    return {**server.snapshot(), "ok": True}


def _jobs(server, msg: dict) -> dict:
    return ok(jobs=server.snapshot().get("jobs", []))


def _metrics(server, msg: dict) -> dict:
    if server.render_metrics is None:
        return refused("metrics are not available")
    return ok(text=server.render_metrics(server.snapshot()))


def _show_jobs(a, reply: dict) -> str:
    rows = [f"{j['id']:>4}  {j['state']:<9} {j['done']}/{j['total']}  {j['input']} -> "
            f"{j['output']}" + (f"  ({j['message']})" if j.get("message") else "")
            for j in reply.get("jobs", [])]
    return "\n".join(rows) if rows else "no jobs"


# ---- engine commands -----------------------------------------------------------------------
def _pause(sup, msg: dict) -> dict:
    if sup.draining:
        return refused("draining: pause does not apply")
    return ok(phase="paused", in_flight=sup.pause())


def _resume(sup, msg: dict) -> dict:
    was = sup.resume()
    return ok(phase=sup.phase, was_paused=was)


def _drain(sup, msg: dict) -> dict:
    sup.drain("drain command")
    return ok(phase="draining", running=sup.engine.queue_sizes()["running"])


def _shutdown(sup, msg: dict) -> dict:
    sup.shutdown()
    return ok(phase="stopping")


def _cancel_ids(msg: dict) -> list | None:
    ids = msg.get("custom_ids")
    if ids is None and msg.get("custom_id") is not None:
        ids = [msg["custom_id"]]
    return ids


def _check_cancel(msg: dict) -> str | None:
    ids = _cancel_ids(msg)
    if ids is not None:
        if (not isinstance(ids, list) or not ids or len(ids) > 10000
                or not all(isinstance(i, str) for i in ids)):
            return "cancel: custom_id must be a string (custom_ids: a list of 1-10000)"
        return None
    job = msg.get("job")
    if isinstance(job, int) and not isinstance(job, bool):
        return None
    return "cancel needs custom_id (a string), custom_ids (a list) or job (a number)"


def _cancel(sup, msg: dict) -> dict:
    ids = _cancel_ids(msg)
    if ids is None:                                     # by job
        if sup.service is None:
            return refused("cancel by job: only in --serve mode")
        done, text = sup.service.cancel(int(msg["job"]))
        return ok(message=text) if done else refused(text)
    results = sup.engine.cancel(ids)
    found = [cid for cid, r in results.items() if r != "not found"]
    if not found:
        return refused("no waiting or running request has custom_id "
                       + ", ".join(repr(i) for i in ids[:5]) + ("..." if len(ids) > 5 else ""),
                       results=results)
    sup.log(f"cancel: {len(found)} request(s) dropped by a control command")
    return ok(results=results)


def _cancel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ids", nargs="*", metavar="CUSTOM_ID")
    p.add_argument("--job", type=int, default=None, help="a queued job's number")


def _cancel_message(a) -> dict:
    if a.job is not None and not a.ids:
        return {"cmd": "cancel", "job": a.job}
    if not a.ids:
        raise SystemExit("pipemax.ctl: cancel needs custom_ids or --job N")
    return {"cmd": "cancel", "custom_ids": list(a.ids)}


def _show_cancel(a, reply: dict) -> str:
    if "results" not in reply:
        return show_plain(a, reply)
    return "\n".join(f"{k}: {v}" for k, v in reply["results"].items())


def _check_submit(msg: dict) -> str | None:
    """On the connection's thread, when the command arrives: its paths as they are now (the
    engine may apply it only after the reply timed out as queued, when the input may be gone;
    the job's start checks again, and fails the job alone)."""
    for k in ("input", "output"):
        if not isinstance(msg.get(k), str) or not msg[k]:
            return f"submit needs {k} (a path)"
    if msg.get("errors") is not None and not isinstance(msg["errors"], str):
        return "submit: errors must be a path"
    from pipemax.job import JobError, check_paths      # (the server's side only)
    try:
        check_paths(msg["input"], msg["output"], msg.get("errors"))
    except JobError as e:
        return str(e)
    return None


def _submit(sup, msg: dict) -> dict:
    if sup.service is None:
        return refused("submit: this run is a batch; start pipemax with --serve to take jobs")
    if sup.draining or sup.stop_now:
        return refused("the service is draining; it takes no new jobs")
    from pipemax.job import JobError                    # (the engine's side only)
    try:           # (the paths were checked when the command arrived: _check_submit)
        job = sup.service.submit(msg["input"], msg["output"], msg.get("errors"))
    except JobError as e:
        return refused(str(e))
    sup.log(f"job {job.id} queued: {job.input} -> {job.output}")
    return ok(job=job.id, queued=sup.service.num_queued())


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--errors", default=None)


def _submit_message(a) -> dict:
    return {"cmd": "submit", "input": os.path.abspath(a.input),
            "output": os.path.abspath(a.output),
            "errors": os.path.abspath(a.errors) if a.errors else None}


COMMANDS: dict[str, Spec] = {s.name: s for s in (
    Spec("status", "phase, progress, tok/s, ETA, KV use, stage busy share", False, _status,
         args=_json_flag, show=lambda a, r: describe(r)),
    Spec("metrics", "the same figures in the Prometheus text exposition format", False,
         _metrics, show=lambda a, r: r.get("text", "").rstrip("\n")),
    Spec("jobs", "the jobs (one in a batch run; the queue with --serve)", False, _jobs,
         args=_json_flag, show=_show_jobs),
    Spec("ping", "is the server there", False, lambda server, msg: ok(), args=None),
    Spec("pause", "launch no new steps (the micro-batches in flight land)", True, _pause),
    Spec("resume", "undo pause", True, _resume),
    Spec("drain", "take nothing new, finish what is running, exit 0 (as SIGTERM)", True,
         _drain),
    Spec("cancel", "drop waiting or running requests by custom_id (their lines: error "
         "\"cancelled\"), or a queued job (--job N, --serve)", True, _cancel,
         check=_check_cancel, args=_cancel_args, message=_cancel_message, show=_show_cancel),
    Spec("shutdown", "stop now, keeping every finished result (exit 0)", True, _shutdown),
    Spec("submit", "queue a job (--serve): input, output, errors (absolute paths)", True,
         _submit, check=_check_submit, args=_submit_args, message=_submit_message,
         show=lambda a, r: f"job {r.get('job')} queued"),
)}
