import os
import re
import subprocess
import sys
import time

import posix_ipc
import pytest

from pipemax.ipc import names
from pipemax.ipc.ring import Ring


def _make_objects(rid):
    """A ring (segment + 2 semaphores), a bare segment and a bare semaphore."""
    ring = Ring.create(names.shm_name(rid, "ring0"), 4096)
    ring.close()
    shm = posix_ipc.SharedMemory(names.shm_name(rid, "kv"), posix_ipc.O_CREX, size=8192)
    shm.close_fd()
    posix_ipc.Semaphore(names.shm_name(rid, "lock"), posix_ipc.O_CREX).close()
    return 5


def test_new_run_id_and_shm_name():
    rid = names.new_run_id()
    assert re.fullmatch(rf"{os.getpid()}-[0-9a-f]{{8}}", rid)
    assert names.new_run_id() != rid
    assert names.shm_name(rid, "ring0") == f"/pipemax-{rid}-ring0"
    for bad in [("", "x"), (rid, ""), (rid, "a/b"), ("a/b", "x"), (rid, "x" * 250)]:
        with pytest.raises(ValueError):
            names.shm_name(*bad)


def test_longest_allowed_name_works(run_id):
    what = "w"
    while True:
        try:
            names.shm_name(run_id, what + "w")
        except ValueError:
            break
        what += "w"
    name = names.shm_name(run_id, what)
    assert len(name) < 250
    ring = Ring.create(name, 4096)                 # the "-items"/"-space" semaphores fit too
    ring.close()
    ring.unlink()


def test_cleanup_run_removes_everything(run_id):
    other = names.new_run_id()
    n = _make_objects(run_id)
    _make_objects(other)
    try:
        objs = names.run_objects(run_id)
        assert len(objs) == n
        assert sum(o.startswith("sem.") for o in objs) == 3
        assert names.cleanup_run(run_id) == n
        assert names.run_objects(run_id) == []
        assert names.cleanup_run(run_id) == 0              # already gone: no raise
        assert len(names.run_objects(other)) == n          # another run is untouched
    finally:
        names.cleanup_run(other)
    assert names.run_objects(other) == []


def test_run_objects_does_not_match_a_longer_run_id(run_id):
    longer = run_id + "0"
    shm = posix_ipc.SharedMemory(names.shm_name(longer, "x"), posix_ipc.O_CREX, size=64)
    shm.close_fd()
    try:
        assert names.run_objects(run_id) == []
        assert names.cleanup_run(run_id) == 0
        assert names.run_objects(longer) == [f"pipemax-{longer}-x"]
    finally:
        assert names.cleanup_run(longer) == 1


def test_pid_alive():
    assert names.pid_alive(os.getpid())
    assert names.pid_alive(1)
    assert not names.pid_alive(0)
    assert not names.pid_alive(-1)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not names.pid_alive(p.pid)


def test_pid_alive_false_for_zombie():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while names.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not names.pid_alive(pid)
        with open(f"/proc/{pid}/stat") as f:              # still there, unreaped
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        os.waitpid(pid, 0)


def test_cleanup_stale(run_id):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = f"{p.pid}-{os.urandom(4).hex()}"
    try:
        n = _make_objects(dead)
        _make_objects(run_id)
        assert len(names.run_objects(dead)) == n
        cleaned = names.cleanup_stale()
        assert dead in cleaned
        assert run_id not in cleaned
        assert names.run_objects(dead) == []
        assert len(names.run_objects(run_id)) == n          # ours (alive pid) kept
        assert dead not in names.cleanup_stale()
    finally:
        names.cleanup_run(dead)
        names.cleanup_run(run_id)
