"""``python -m pipemax.ctl COMMAND [args] [--socket PATH]``: talk to a running pipemax.

    status [--json]            phase, progress, tok/s, ETA, KV use, stage busy share
    metrics                    Prometheus text exposition format
    jobs [--json]              the jobs (one in a batch run; the queue with --serve)
    pause | resume             stop launching new steps / go on
    drain                      take nothing new, finish what is running, exit 0
    cancel ID [ID ...]         drop waiting or running requests by custom_id
    cancel --job N             drop a queued job (--serve)
    shutdown                   stop now, keeping finished results
    submit IN OUT [--errors F] queue a job (--serve); paths are made absolute here

Without ``--socket``: ``$PIPEMAX_SOCKET``, else the one running pipemax whose socket is in
``$RUNTIME_DIRECTORY``, ``$XDG_RUNTIME_DIR``, ``/tmp/pipemax-<uid>`` or ``/run/pipemax`` (the
systemd unit's).
Exit codes: 0 the command succeeded, 1 the server answered with an error, 2 no answer (no
socket, refused, bad arguments). Only the client's standard library and msgpack are imported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pipemax.control import FrameError, live_sockets, request
from pipemax.status import describe


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipemax.ctl",
                                description="Control a running pipemax through its socket.")
    common = argparse.ArgumentParser(add_help=False)     # the options go before or after
    for q, default in ((p, None), (common, argparse.SUPPRESS)):
        q.add_argument("--socket", default=default, help="the control socket's path")
        q.add_argument("--timeout", type=float, default=30.0 if q is p else default,
                       help="seconds to wait for an answer")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name in ("status", "jobs"):
        s = sub.add_parser(name, parents=[common])
        s.add_argument("--json", action="store_true", help="the raw reply as JSON")
    for name in ("metrics", "pause", "resume", "drain", "shutdown"):
        sub.add_parser(name, parents=[common])
    c = sub.add_parser("cancel", parents=[common])
    c.add_argument("ids", nargs="*", metavar="CUSTOM_ID")
    c.add_argument("--job", type=int, default=None, help="a queued job's number")
    s = sub.add_parser("submit", parents=[common])
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--errors", default=None)
    return p


def find_socket(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("PIPEMAX_SOCKET"):
        return os.environ["PIPEMAX_SOCKET"]
    found = live_sockets()
    if len(found) == 1:
        return found[0]
    if not found:
        raise SystemExit("pipemax.ctl: no running pipemax found (give --socket PATH)")
    raise SystemExit("pipemax.ctl: several running pipemax found, pick one with --socket: "
                     + ", ".join(found))


def message(a) -> dict:
    if a.cmd == "cancel":
        if a.job is not None and not a.ids:
            return {"cmd": "cancel", "job": a.job}
        if not a.ids:
            raise SystemExit("pipemax.ctl: cancel needs custom_ids or --job N")
        return {"cmd": "cancel", "custom_ids": list(a.ids)}
    if a.cmd == "submit":
        return {"cmd": "submit", "input": os.path.abspath(a.input),
                "output": os.path.abspath(a.output),
                "errors": os.path.abspath(a.errors) if a.errors else None}
    return {"cmd": a.cmd}


def show(a, reply: dict) -> str:
    if not reply.get("ok"):
        return f"error: {reply.get('error', 'unknown error')}"
    if getattr(a, "json", False):
        return json.dumps(reply, indent=1, default=str)
    if a.cmd == "status":
        return describe(reply)
    if a.cmd == "metrics":
        return reply.get("text", "").rstrip("\n")
    if a.cmd == "jobs":
        rows = [f"{j['id']:>4}  {j['state']:<9} {j['done']}/{j['total']}  {j['input']} -> "
                f"{j['output']}" + (f"  ({j['message']})" if j.get("message") else "")
                for j in reply.get("jobs", [])]
        return "\n".join(rows) if rows else "no jobs"
    if a.cmd == "submit":
        return f"job {reply.get('job')} queued"
    if a.cmd == "cancel" and "results" in reply:
        return "\n".join(f"{k}: {v}" for k, v in reply["results"].items())
    rest = {k: v for k, v in reply.items() if k != "ok"}
    return "ok" + (f" {json.dumps(rest, default=str)}" if rest else "")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    msg = message(a)
    path = find_socket(a.socket)
    try:
        reply = request(path, msg, timeout=a.timeout)
    except (OSError, FrameError) as e:
        print(f"pipemax.ctl: {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    out = show(a, reply)
    print(out, file=sys.stdout if reply.get("ok") else sys.stderr)
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
