"""``python -m pipemax.ctl COMMAND [args] [--socket PATH]``: talk to a running pipemax.

The commands and what each shows are the table of pipemax/ops/commands.py
(``python -m pipemax.ctl --help`` lists them).

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

from pipemax.ops.commands import COMMANDS
from pipemax.ops.framing import FrameError, request
from pipemax.ops.sockets import live_sockets


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipemax.ctl",
                                description="Control a running pipemax through its socket.")
    common = argparse.ArgumentParser(add_help=False)     # the options go before or after
    for q, default in ((p, None), (common, argparse.SUPPRESS)):
        q.add_argument("--socket", default=default, help="the control socket's path")
        q.add_argument("--timeout", type=float, default=30.0 if q is p else default,
                       help="seconds to wait for an answer")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for spec in COMMANDS.values():
        if spec.args is not None:
            spec.args(sub.add_parser(spec.name, parents=[common], help=spec.help))
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


def show(a, reply: dict) -> str:
    if not reply.get("ok"):
        return f"error: {reply.get('error', 'unknown error')}"
    if getattr(a, "json", False):
        return json.dumps(reply, indent=1, default=str)
    return COMMANDS[a.cmd].show(a, reply)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    msg = COMMANDS[a.cmd].frame(a)
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
