"""Where control sockets live: ``pipemax-<pid>.sock`` in systemd's RuntimeDirectory,
``$XDG_RUNTIME_DIR`` or a private ``/tmp/pipemax-<uid>`` (and the systemd unit's
``/run/pipemax/pipemax.sock``); which of them belong to live processes (for the client), and
the sweep of those left by dead ones (at a server's start). A process is alive as
ipc/names.py's ``pid_alive`` says.
"""
from __future__ import annotations

import os
import re
import stat

from pipemax.ipc.names import pid_alive

SERVICE_DIR = "/run/pipemax"        # tools/pipemax.service's RuntimeDirectory
SERVICE_SOCKET = "pipemax.sock"
_SOCK_RE = re.compile(r"^pipemax-(\d+)\.sock$")


def _private_tmp_dir() -> str | None:
    """/tmp/pipemax-<uid>, mode 0700, ours (created if missing); None if it is not safe."""
    d = f"/tmp/pipemax-{os.getuid()}"
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(d)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return d


def socket_dirs(env=None, create: bool = False) -> list[str]:
    """Where sockets are looked for: systemd's RuntimeDirectory, $XDG_RUNTIME_DIR, then a
    private folder under /tmp."""
    env = os.environ if env is None else env
    dirs = []
    rd = env.get("RUNTIME_DIRECTORY")
    if rd:
        dirs.append(rd.split(":")[0])
    if env.get("XDG_RUNTIME_DIR"):
        dirs.append(env["XDG_RUNTIME_DIR"])
    tmp = _private_tmp_dir() if create else f"/tmp/pipemax-{os.getuid()}"
    if tmp:
        dirs.append(tmp)
    return [d for d in dirs if os.path.isdir(d)]


def default_socket_path(env=None) -> str | None:
    dirs = socket_dirs(env, create=True)
    return os.path.join(dirs[0], f"pipemax-{os.getpid()}.sock") if dirs else None


def _is_socket(path: str, uid: int | None = None) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and (uid is None or st.st_uid == uid)


def remove_stale_sockets(directory: str) -> list[str]:
    """Remove ``pipemax-<pid>.sock`` files of dead processes (ours only) from ``directory``."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _SOCK_RE.match(name)
        if not m or pid_alive(int(m.group(1))):
            continue
        p = os.path.join(directory, name)
        if _is_socket(p, os.getuid()):
            try:
                os.unlink(p)
                removed.append(p)
            except OSError:
                pass
    return removed


def live_sockets(env=None) -> list[str]:
    """Sockets of running pipemax processes in the usual folders (for the client), and the
    systemd unit's /run/pipemax/pipemax.sock."""
    out = []
    dirs = socket_dirs(env)
    if os.path.isdir(SERVICE_DIR) and SERVICE_DIR not in dirs:
        dirs.append(SERVICE_DIR)
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            p = os.path.join(d, name)
            m = _SOCK_RE.match(name)
            if ((m and pid_alive(int(m.group(1)))) or name == SERVICE_SOCKET) and _is_socket(p):
                out.append(p)
    return out
