"""Names of every shared-memory object of a run, and their cleanup.

Every POSIX shared-memory segment and semaphore of a run is named
``/pipemax-<run_id>-<what>``, and a run id starts with the pid of the process that
owns the run (``<pid>-<8 hex>``). On Linux these objects live in /dev/shm as
``pipemax-<run_id>-<what>`` (segments) and ``sem.pipemax-<run_id>-<what>``
(semaphores), so a crashed run can be found and removed by the next start:
``cleanup_stale()`` removes the objects of every run whose owner pid is gone.
"""
import os
import re
import secrets

import posix_ipc

PREFIX = "pipemax"
SHM_DIR = "/dev/shm"
_MAX_NAME = 249          # POSIX semaphores get "sem." prepended, NAME_MAX is 255
_RUN_RE = re.compile(r"^(?:sem\.)?" + PREFIX + r"-(\d+-[0-9a-f]+)-.")


def new_run_id() -> str:
    """A fresh run id, ``<pid>-<8 hex>``; the pid comes first so stale runs can be detected."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def shm_name(run_id: str, what: str) -> str:
    """The POSIX name of one object of a run: ``/pipemax-<run_id>-<what>``."""
    if not run_id or not what or "/" in run_id + what or "\0" in run_id + what:
        raise ValueError(f"bad run id or object name: {run_id!r}, {what!r}")
    name = f"/{PREFIX}-{run_id}-{what}"
    if len(name) > _MAX_NAME - len("-items"):   # ring semaphores append "-items"/"-space"
        raise ValueError(f"shared-memory name too long ({len(name)} chars): {name!r}")
    return name


def run_objects(run_id: str) -> list[str]:
    """The /dev/shm file names (segments and ``sem.`` semaphores) belonging to ``run_id``."""
    shm = f"{PREFIX}-{run_id}-"
    sem = "sem." + shm
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith(shm) or e.startswith(sem))


def _unlink(entry: str) -> bool:
    """Remove one /dev/shm entry; True if it was removed here, False if already gone."""
    try:
        if entry.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + entry[4:])
        else:
            posix_ipc.unlink_shared_memory("/" + entry)
        return True
    except posix_ipc.ExistentialError:
        return False
    except (posix_ipc.Error, OSError, ValueError):
        pass
    try:
        os.unlink(os.path.join(SHM_DIR, entry))
        return True
    except FileNotFoundError:
        return False


def cleanup_run(run_id: str) -> int:
    """Unlink every segment and semaphore of ``run_id``; returns how many were removed."""
    return sum(_unlink(e) for e in run_objects(run_id))


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                      # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    # "<pid> (<comm>) <state> ...": comm may contain spaces or parentheses
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def cleanup_stale() -> list[str]:
    """Remove the objects of every run whose owner pid is dead; returns the run ids cleaned."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    runs = set()
    for e in entries:
        m = _RUN_RE.match(e)
        if m:
            runs.add(m.group(1))
    cleaned = []
    for run_id in sorted(runs):
        if not pid_alive(int(run_id.split("-", 1)[0])):
            cleanup_run(run_id)
            cleaned.append(run_id)
    return cleaned
