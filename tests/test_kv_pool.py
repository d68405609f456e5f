"""The host KV pool process (pipemax/kv_pool.py): a program of its own that creates the
stages' segments, answers STATS, and removes the segments on STOP or when the launcher is
gone (its stdin closes)."""
from __future__ import annotations

import os

import posix_ipc
import pytest

from pipemax.ipc import names
from pipemax.kv_pool import KVPool


def _exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def test_a_pool_starts_answers_and_stops_leaving_nothing(run_id):
    pool = KVPool(run_id, [1 << 16, 3 << 16])
    pool.start(lambda: True)
    try:
        assert all(_exists(n) for n in pool.names)
        st = pool.stats(lambda: True)
        assert st["bytes"] == 4 << 16 and st["segments"] == pool.names
        assert "torch" not in open(f"/proc/{pool.proc.pid}/maps").read()   # a light process
        assert pool.check()
    finally:
        pool.close()
    assert pool.proc.returncode == 0
    assert not any(_exists(n) for n in pool.names)


def test_the_pool_removes_its_segments_when_the_launcher_is_gone(run_id):
    """The launcher's end of the pipe closing (as when it is killed) ends the pool, which
    removes what it made; check() then names the pool."""
    pool = KVPool(run_id, [1 << 16])
    pool.start(lambda: True)
    try:
        pool.proc.stdin.close()
        assert pool.proc.wait(timeout=10) == 3
        assert not _exists(pool.names[0])
        with pytest.raises(Exception, match="KV pool process .* exited with code 3"):
            pool.check()
    finally:
        pool.close()


def test_a_pool_that_cannot_start_is_cleaned_up(run_id):
    """A segment name already taken: the pool exits before READY, start raises naming it,
    and close() leaves none of the run's segments in /dev/shm."""
    taken = names.shm_name(run_id, "hostkv0")
    posix_ipc.SharedMemory(taken, posix_ipc.O_CREX, size=4096).close_fd()
    pool = KVPool(run_id, [1 << 16])
    try:
        with pytest.raises(RuntimeError, match="KV pool process .* exited with code 1"):
            pool.start(lambda: True)
        assert pool.proc.poll() is not None
    finally:
        pool.close()          # idempotent after the failed start
    assert not _exists(taken)
