"""The control socket's frames, shared by the server (pipemax/ops/server.py) and the client.

A frame is a 4-byte big-endian length, then that many bytes of msgpack: a map
``{"cmd": str, ...}`` from the client, ``{"ok": bool, ...}`` back (``"error"``: one line, when
not ok). Frames are at most ``MAX_FRAME`` bytes; every read has a timeout. A frame that cannot
be read (a length over the limit, a frame cut short, bytes that are not msgpack) raises
``FrameError``; a well-formed frame that is not a map raises ``NotAMap`` (a FrameError after
which the stream can go on).
"""
from __future__ import annotations

import socket
import struct

import msgpack

MAX_FRAME = 1 << 20
MAX_REPLY = 64 << 20          # what the client accepts (a long job list, metrics)
_HEADER = struct.Struct(">I")


class FrameError(ValueError):
    """A frame that cannot be read."""


class NotAMap(FrameError):
    """A well-formed frame that is not a map (the connection can go on)."""


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
        raise NotAMap(type(obj).__name__)
    return obj


def request(path: str, msg: dict, timeout: float = 30.0) -> dict:
    """Client side: send one command, return the reply (OSError / FrameError on failure)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(encode_frame(msg))
        except (BrokenPipeError, ConnectionResetError):
            pass            # refused before our frame was read: the refusal is waiting
        reply = read_frame(s, max_frame=MAX_REPLY)
    if reply is None:
        raise FrameError("the server closed the connection without a reply")
    return reply
