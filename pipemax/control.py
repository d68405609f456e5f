"""The control socket: a Unix stream socket taking length-prefixed msgpack commands.

A frame is a 4-byte big-endian length, then that many bytes of msgpack: a map
``{"cmd": str, ...}``. Every frame gets one reply frame ``{"ok": bool, ...}`` (``"error"``:
one line, when not ok). Frames are at most ``MAX_FRAME`` bytes; every read has a timeout.
A frame that cannot be read (a length over the limit, a frame cut short, bytes that are not
msgpack) is answered with an error and the connection is closed, since the stream cannot be
resynchronised; a well-formed frame with a bad command is answered and the connection stays.

Commands (pipemax/ctl.py is the client):

=========  ====================================================================================
status     phase, requests done / total, tok/s, ETA, stage busy share, KV use, jobs
metrics    the same figures in the Prometheus text exposition format (``"text"``)
jobs       the jobs of this process (one in a batch run; the queue in ``--serve`` mode)
pause      launch no new steps (the micro-batches in flight land); ``resume`` undoes it
drain      take nothing new, finish what is running, then exit 0 (SIGTERM does the same)
cancel     ``custom_id`` (or ``custom_ids``): drop a waiting or running request; its line is
           an error with code "cancelled". ``job``: drop a queued job (``--serve``)
shutdown   stop now, keeping every finished result (exit 0)
submit     ``--serve`` only: ``input``, ``output`` (absolute paths), ``errors`` (optional)
=========  ====================================================================================

Access: the socket file is created mode 0600 (0660 and the group changed with
``--socket-group``), and every connection's peer credentials (SO_PEERCRED) are checked: the
owner's uid, root, or (with a socket group) a member of that group; anyone else gets an error
reply and is disconnected.

Threads: one accepting thread, one thread per connection (at most ``MAX_CONNECTIONS``). They
never touch engine state: ``status``, ``metrics`` and ``jobs`` are answered from the snapshot
that the engine loop publishes under a lock; the other commands go on a queue that the engine
loop applies at step boundaries (pipemax/supervisor.py), and the connection's thread waits for
the engine's answer (``REPLY_TIMEOUT``; after that it answers ``queued``).
"""
from __future__ import annotations

import errno
import os
import queue
import re
import socket
import stat
import struct
import threading
from typing import Callable

import msgpack

from ipc.names import pid_alive

MAX_FRAME = 1 << 20
READ_TIMEOUT = 10.0
REPLY_TIMEOUT = 10.0
MAX_CONNECTIONS = 8
MAX_QUEUED = 256
MAX_PATH = 107                      # sun_path is 108 bytes with the terminating NUL
SNAPSHOT_COMMANDS = ("status", "metrics", "jobs", "ping")
ENGINE_COMMANDS = ("pause", "resume", "drain", "cancel", "shutdown", "submit")
COMMANDS = SNAPSHOT_COMMANDS + ENGINE_COMMANDS
_HEADER = struct.Struct(">I")
_UCRED = struct.Struct("3i")
_SOCK_RE = re.compile(r"^pipemax-(\d+)\.sock$")


class ControlError(ValueError):
    """The control socket cannot be set up; one line for the user."""


class FrameError(ValueError):
    """A frame that cannot be read."""


# ---- frames ---------------------------------------------------------------------------------
def encode_frame(obj: dict) -> bytes:
    data = msgpack.packb(obj, use_bin_type=True)
    return _HEADER.pack(len(data)) + data


def _recv_exact(sock: socket.socket, n: int, what: str, got_before: int = 0) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 16))
        except socket.timeout:
            if not buf and not got_before:
                raise
            raise FrameError(f"truncated frame: timed out after {len(buf)} of {n} {what} "
                             "bytes") from None
        if not chunk:
            if not buf and not got_before:
                raise EOFError
            raise FrameError(f"truncated frame: the connection ended after {len(buf)} of {n} "
                             f"{what} bytes")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket, max_frame: int = MAX_FRAME) -> dict | None:
    """The next frame as a map; None on a clean end (EOF before a frame). Raises FrameError,
    or socket.timeout when nothing at all arrived in time."""
    try:
        head = _recv_exact(sock, _HEADER.size, "header")
    except EOFError:
        return None
    (n,) = _HEADER.unpack(head)
    if n > max_frame:
        raise FrameError(f"frame of {n} bytes is over the limit of {max_frame} bytes")
    body = _recv_exact(sock, n, "body", got_before=len(head)) if n else b""
    try:
        obj = msgpack.unpackb(body, raw=False)
    except Exception as e:  # noqa: BLE001 - any malformed input is the peer's error
        raise FrameError(f"frame is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise _NotAMap(type(obj).__name__)
    return obj


class _NotAMap(FrameError):
    """A well-formed frame that is not a map (the connection can go on)."""


def request(path: str, msg: dict, timeout: float = 30.0) -> dict:
    """Client side: send one command, return the reply (OSError / FrameError on failure)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(encode_frame(msg))
        except (BrokenPipeError, ConnectionResetError):
            pass            # refused before our frame was read: the refusal is waiting
        reply = read_frame(s, max_frame=64 << 20)
    if reply is None:
        raise FrameError("the server closed the connection without a reply")
    return reply


# ---- where the socket lives -----------------------------------------------------------------
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
        try:
            st = os.lstat(p)
            if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid():
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
    if os.path.isdir("/run/pipemax") and "/run/pipemax" not in dirs:
        dirs.append("/run/pipemax")     # tools/pipemax.service's RuntimeDirectory
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            p = os.path.join(d, name)
            m = _SOCK_RE.match(name)
            if (m and pid_alive(int(m.group(1)))) or name == "pipemax.sock":
                try:
                    if stat.S_ISSOCK(os.lstat(p).st_mode):
                        out.append(p)
                except OSError:
                    pass
    return out


# ---- the server -----------------------------------------------------------------------------
class Command:
    """An engine command waiting for the engine loop; ``answer()`` wakes the connection."""

    def __init__(self, msg: dict):
        self.msg = msg
        self.cmd: str = msg["cmd"]
        self._event = threading.Event()
        self._reply: dict | None = None

    def answer(self, ok: bool = True, **fields) -> None:
        if not self._event.is_set():
            self._reply = {"ok": bool(ok), **fields}
            self._event.set()

    def wait(self, timeout: float) -> dict | None:
        return self._reply if self._event.wait(timeout) else None


def _check_args(msg: dict) -> str | None:
    """Argument errors of an engine command (checked in the connection's thread)."""
    cmd = msg["cmd"]
    if cmd == "cancel":
        ids = msg.get("custom_ids")
        if ids is None and msg.get("custom_id") is not None:
            ids = [msg["custom_id"]]
        if ids is not None:
            if (not isinstance(ids, list) or not ids or len(ids) > 10000
                    or not all(isinstance(i, str) for i in ids)):
                return "cancel: custom_id must be a string (custom_ids: a list of 1-10000)"
            return None
        job = msg.get("job")
        if isinstance(job, int) and not isinstance(job, bool):
            return None
        return "cancel needs custom_id (a string), custom_ids (a list) or job (a number)"
    if cmd == "submit":
        for k in ("input", "output"):
            if not isinstance(msg.get(k), str) or not msg[k]:
                return f"submit needs {k} (a path)"
        if msg.get("errors") is not None and not isinstance(msg["errors"], str):
            return "submit: errors must be a path"
    return None


class ControlServer:
    def __init__(self, path: str, *, group: int | None = None,
                 log: Callable[[str], None] | None = None,
                 render_metrics: Callable[[dict], str] | None = None):
        self.path = path
        self.group = group
        self.log = log or (lambda m: None)
        self.render_metrics = render_metrics
        self.queue: queue.Queue[Command] = queue.Queue(MAX_QUEUED)
        self._lock = threading.Lock()
        self._snapshot: dict = {"phase": "starting"}
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._sock: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self.owner_uid = os.getuid()
        self.refused = 0            # connections refused (credentials, too many)
        self.bad_frames = 0

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        path = self.path
        if len(os.fsencode(path)) > MAX_PATH:
            raise ControlError(f"--socket {path}: path longer than {MAX_PATH} bytes")
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise ControlError(f"--socket {path}: folder {d} does not exist")
        remove_stale_sockets(d)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ControlError(f"--socket {path} exists and is not a socket")
            if self._answers(path):
                raise ControlError(f"--socket {path} is in use by another running process")
            os.unlink(path)         # left by a process that is gone
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)       # the file is born 0600: no window where others connect
        try:
            s.bind(path)
            st = os.lstat(path)
            self._ino = (st.st_dev, st.st_ino)      # close() removes this file, no other
        except OSError as e:
            s.close()
            raise ControlError(f"--socket {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        try:
            if self.group is not None:
                os.chown(path, -1, self.group)
                os.chmod(path, 0o660)
            else:
                os.chmod(path, 0o600)
            s.listen(16)
            s.settimeout(0.5)
        except OSError as e:
            s.close()
            self._unlink()
            raise ControlError(f"--socket {path}: {e.strerror}") from None
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, name="pipemax-control",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _answers(path: str) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(1.0)
            try:
                c.connect(path)
                return True
            except OSError as e:
                return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)

    def close(self) -> None:
        """Stop accepting, answer what is queued, remove the socket file (if still ours)."""
        self._stop.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)     # wakes the accepting thread
            except OSError:
                pass
            try:
                self._sock.close()
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._unlink()
        while True:
            try:
                self.queue.get_nowait().answer(False, error="the run is ending")
            except queue.Empty:
                break

    def _unlink(self) -> None:
        try:
            st = os.lstat(self.path)
            if self._ino is not None and (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    # ---- the engine's side ----------------------------------------------------------------
    def publish(self, snapshot: dict) -> None:
        with self._lock:
            self._snapshot = snapshot

    def snapshot(self) -> dict:
        with self._lock:
            return self._snapshot

    def pending(self) -> list[Command]:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float) -> Command | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    # ---- connections ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                self.refused += 1
                self._reply_and_close(conn, {"ok": False, "error": "too many connections"})
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name="pipemax-control-conn").start()
            except RuntimeError:
                self._slots.release()
                conn.close()

    @staticmethod
    def _reply_and_close(conn: socket.socket, reply: dict) -> None:
        try:
            conn.settimeout(1.0)
            conn.sendall(encode_frame(reply))
        except OSError:
            pass
        finally:
            conn.close()

    def _peer_allowed(self, conn: socket.socket) -> tuple[bool, str]:
        try:
            pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          _UCRED.size))
        except OSError as e:
            return False, f"cannot read peer credentials: {e.strerror}"
        if uid in (self.owner_uid, 0):
            return True, ""
        if self.group is not None and (gid == self.group or self.group in _groups(pid)):
            return True, ""
        return False, f"permission denied: uid {uid} is not the owner (uid {self.owner_uid})"

    def _serve(self, conn: socket.socket) -> None:
        try:
            ok, why = self._peer_allowed(conn)
            if not ok:
                self.refused += 1
                self._reply_and_close(conn, {"ok": False, "error": why})
                return
            conn.settimeout(READ_TIMEOUT)
            while not self._stop.is_set():
                try:
                    msg = read_frame(conn)
                except _NotAMap as e:
                    self.bad_frames += 1
                    reply = {"ok": False, "error": f"a command is a map with \"cmd\", got {e}"}
                    conn.sendall(encode_frame(reply))
                    continue
                except FrameError as e:
                    self.bad_frames += 1
                    self._reply_and_close(conn, {"ok": False, "error": str(e)})
                    return
                except (socket.timeout, OSError):
                    return          # idle (nothing for READ_TIMEOUT) or gone
                if msg is None:
                    return
                conn.sendall(encode_frame(self._handle(msg)))
        except Exception:  # noqa: BLE001 - a connection's trouble must never reach the run
            pass
        finally:
            try:
                conn.close()
            finally:
                self._slots.release()

    def _handle(self, msg: dict) -> dict:
        cmd = msg.get("cmd")
        if not isinstance(cmd, str):
            return {"ok": False, "error": "a command is a map with \"cmd\": a string"}
        if cmd not in COMMANDS:
            return {"ok": False, "error": f"unknown command {cmd[:40]!r}; known: "
                                          f"{', '.join(COMMANDS)}"}
        if cmd == "ping":
            return {"ok": True}
        if cmd in SNAPSHOT_COMMANDS:
            snap = self.snapshot()
            if cmd == "status":
                return {**snap, "ok": True}
            if cmd == "jobs":
                return {"ok": True, "jobs": snap.get("jobs", [])}
            if self.render_metrics is None:
                return {"ok": False, "error": "metrics are not available"}
            return {"ok": True, "text": self.render_metrics(snap)}
        bad = _check_args(msg)
        if bad:
            return {"ok": False, "error": bad}
        c = Command(msg)
        try:
            self.queue.put_nowait(c)
        except queue.Full:
            return {"ok": False, "error": "too many commands waiting; try again"}
        reply = c.wait(REPLY_TIMEOUT)
        if reply is None:
            return {"ok": True, "queued": True,
                    "message": f"{cmd}: queued; it applies at the engine's next step boundary"}
        return reply


def _groups(pid: int) -> set[int]:
    """Supplementary groups of a process (from /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()
