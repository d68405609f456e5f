"""Who may use a control socket: the peer credentials of a connection (SO_PEERCRED).

The owner's uid, root, or (with a socket group) a member of that group, by its primary group
or a supplementary one (read from /proc); anyone else is refused with one line.
"""
from __future__ import annotations

import socket
import struct

_UCRED = struct.Struct("3i")


def groups_of(pid: int) -> set[int]:
    """Supplementary groups of a process (from /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def peer_allowed(conn: socket.socket, owner_uid: int, group: int | None) -> tuple[bool, str]:
    """(allowed, why not) for the process at the other end of ``conn``."""
    try:
        pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _UCRED.size))
    except OSError as e:
        return False, f"cannot read peer credentials: {e.strerror}"
    if uid in (owner_uid, 0):
        return True, ""
    if group is not None and (gid == group or group in groups_of(pid)):
        return True, ""
    return False, f"permission denied: uid {uid} is not the owner (uid {owner_uid})"
