"""The control socket's server: a Unix stream socket taking length-prefixed msgpack commands
(pipemax/ops/framing.py), one reply frame per command. The commands are the table of
pipemax/ops/commands.py; ``python -m pipemax.ctl`` is the client.

A frame that cannot be read (a length over the limit, a frame cut short, bytes that are not
msgpack) is answered with an error and the connection is closed, since the stream cannot be
resynchronised; a well-formed frame with a bad command is answered and the connection stays.

Access: the socket file is created mode 0600 (0660 and the group changed with
``--socket-group``), and every connection's peer credentials are checked
(pipemax/ops/peers.py); anyone else gets an error reply and is disconnected. A start removes
the sockets of dead runs from its folder (pipemax/ops/sockets.py).

Threads: one accepting thread, one thread per connection (at most ``MAX_CONNECTIONS``). They
never touch engine state: snapshot commands (``status``, ``metrics``, ``jobs``) are answered
from the snapshot that the engine loop publishes under a lock; engine commands go on a queue
that the engine loop applies at step boundaries (pipemax/ops/supervisor.py), and the
connection's thread waits for the engine's answer (``REPLY_TIMEOUT``; after that it answers
``queued``).
"""
from __future__ import annotations

import errno
import os
import queue
import socket
import stat
import threading
from typing import Callable

from pipemax.ops.commands import COMMANDS
from pipemax.ops.framing import FrameError, NotAMap, encode_frame, read_frame
from pipemax.ops.peers import peer_allowed
from pipemax.ops.sockets import remove_stale_sockets

READ_TIMEOUT = 10.0
REPLY_TIMEOUT = 10.0
MAX_CONNECTIONS = 8
MAX_QUEUED = 256
MAX_PATH = 107                      # sun_path is 108 bytes with the terminating NUL


class ControlError(ValueError):
    """The control socket cannot be set up; one line for the user."""


class Command:
    """An engine command waiting for the engine loop; ``answer()`` wakes the connection."""

    def __init__(self, msg: dict):
        self.msg = msg
        self.cmd: str = msg["cmd"]
        self._event = threading.Event()
        self._reply: dict | None = None
        self.answered_queued = False      # the connection gave up waiting and said "queued"

    def answer(self, ok: bool = True, **fields) -> None:
        if not self._event.is_set():
            self._reply = {"ok": bool(ok), **fields}
            self._event.set()

    def wait(self, timeout: float) -> dict | None:
        return self._reply if self._event.wait(timeout) else None


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

    def _serve(self, conn: socket.socket) -> None:
        try:
            ok, why = peer_allowed(conn, self.owner_uid, self.group)
            if not ok:
                self.refused += 1
                self._reply_and_close(conn, {"ok": False, "error": why})
                return
            conn.settimeout(READ_TIMEOUT)
            while not self._stop.is_set():
                try:
                    msg = read_frame(conn)
                except NotAMap as e:
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
        spec = COMMANDS.get(cmd)
        if spec is None:
            return {"ok": False, "error": f"unknown command {cmd[:40]!r}; known: "
                                          f"{', '.join(COMMANDS)}"}
        if not spec.engine:
            return spec.handle(self, msg)
        bad = spec.check(msg)
        if bad:
            return {"ok": False, "error": bad}
        c = Command(msg)
        try:
            self.queue.put_nowait(c)
        except queue.Full:
            return {"ok": False, "error": "too many commands waiting; try again"}
        reply = c.wait(REPLY_TIMEOUT)
        if reply is None:
            c.answered_queued = True
            return {"ok": True, "queued": True,
                    "message": f"{cmd}: queued; it applies at the engine's next step boundary"}
        return reply
