"""The host KV pool process: owns the pinned host KV memory of every stage.

    launcher ──its stdin (a pipe)──► KV pool process ──its stdout (a pipe)──► launcher
                                     │ creates, owns, removes
                                     ▼
          /dev/shm/pipemax-<run>-hostkv<s>: host[H, L_s, 2, block_size, kv_heads, head_dim]
                     ▲ mapped (and cudaHostRegister'ed) by stage s, which copies blocks
                     │ in and out on the timetable (stages/offload.py)

The pool creates one segment per stage (sized by the plan, checked against /dev/shm, host
memory and ``ulimit -l`` before anything starts), answers STATS with what it holds, and on
STOP, or when its stdin closes (the launcher is gone, however it died), removes its segments.
Which host block holds which tokens is decided by the driver's extent allocator
(pipemax/block_manager.py), so the hot path never waits on this process: stages copy directly
to and from the memory it owns.

It is a program of its own (``python -m pipemax.kv_pool SEGMENTS``), not a spawned copy of
the launcher: it needs neither torch nor the launcher's modules, so it is ready within a
fraction of a second of being asked for (the plan needs the stages' reports first, so its
start is on the run's critical path).

Ops (msgpack maps, one after another on each pipe): READY {segments}  STATS -> {bytes,
segments}  STOP -> {}.
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time

import msgpack
import posix_ipc

from pipemax.ipc.names import shm_name

OP_READY, OP_STATS, OP_STOP = 1, 2, 3
GiB = 1 << 30


class HostMemoryError(ValueError):
    """The host cannot hold the pool; one line with the figures."""


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def shm_free() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


def check_host_memory(total: int, pinned: bool) -> None:
    """Refuse, with the figures, a pool the host cannot hold."""
    avail, shm = mem_available(), shm_free()
    if total > shm:
        raise HostMemoryError(f"host KV pool needs {total / GiB:.2f} GiB but /dev/shm has "
                              f"{shm / GiB:.2f} GiB free (lower --host-kv-gb, or enlarge /dev/shm)")
    if total > avail:
        raise HostMemoryError(f"host KV pool needs {total / GiB:.2f} GiB but the host has "
                              f"{avail / GiB:.2f} GiB available (lower --host-kv-gb)")
    if pinned and os.geteuid() != 0:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY and total > soft:
            raise HostMemoryError(f"host KV pool needs {total / GiB:.2f} GiB of pinned memory "
                                  f"but `ulimit -l` allows {soft / GiB:.2f} GiB "
                                  "(raise it: LimitMEMLOCK=infinity)")


def default_host_bytes(pinned: bool) -> int:
    """A safe share of the host: half of what is available, within /dev/shm and memlock."""
    b = min(mem_available() // 2, int(shm_free() * 0.9))
    if pinned and os.geteuid() != 0:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY:
            b = min(b, soft)
    return max(0, b)


# ---- the process ---------------------------------------------------------------------------
def serve(segments: list[tuple[str, int]], rfd: int = 0, wfd: int = 1) -> int:
    """Create the segments, say READY, answer until STOP or the end of ``rfd``; returns the
    exit code (0: STOP, 3: the launcher went away). The segments are removed either way."""
    for sig in (signal.SIGINT, signal.SIGTERM):      # the launcher stops us (as the stages)
        signal.signal(sig, signal.SIG_IGN)
    send = lambda m: os.write(wfd, msgpack.packb(m))
    made = []
    try:
        for name, size in segments:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
            shm.close_fd()
            made.append(name)
        send({"op": OP_READY, "segments": made})
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            data = os.read(rfd, 1 << 12)
            if not data:
                return 3
            unpacker.feed(data)
            for m in unpacker:
                op = m.get("op") if isinstance(m, dict) else None
                if op == OP_STATS:
                    send({"op": OP_STATS, "segments": made,
                          "bytes": sum(s for _, s in segments)})
                elif op == OP_STOP:
                    send({"op": OP_STOP})
                    return 0
    except BrokenPipeError:
        return 3
    finally:
        for name in made:
            try:
                posix_ipc.unlink_shared_memory(name)
            except posix_ipc.ExistentialError:
                pass


class KVPool:
    """The pool process, seen from the launcher."""

    def __init__(self, run_id: str, segment_bytes: list[int]):
        self.run_id = run_id
        self.segments = tuple((shm_name(run_id, f"hostkv{i}"), int(b))
                              for i, b in enumerate(segment_bytes))
        self.proc: subprocess.Popen | None = None
        self._unpacker = msgpack.Unpacker(raw=False)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.segments]

    def start(self, check) -> None:
        """Start the process and wait (at most 60 s, ``check()`` between slices) for READY;
        on any failure the process is stopped and the segments removed."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipemax.kv_pool", json.dumps(self.segments)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            if self._recv(60.0, check).get("op") != OP_READY:
                raise RuntimeError("KV pool process did not start")
        except BaseException:
            self.close()
            raise

    def _recv(self, timeout: float, check) -> dict:
        """The pool's next message, waiting in slices of at most 0.5 s (``check()`` between
        them, which raises if the run is failing); RuntimeError if the pool exits first or
        nothing comes within ``timeout``."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            for m in self._unpacker:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"KV pool process (pid {self.proc.pid}) did not answer "
                                   f"within {timeout:.0f} s")
            if select.select([fd], [], [], min(0.5, left))[0]:
                data = os.read(fd, 1 << 12)
                if not data:
                    code = self.proc.wait(timeout=5.0)
                    raise RuntimeError(f"KV pool process (pid {self.proc.pid}) exited with "
                                       f"code {code}")
                self._unpacker.feed(data)
            check()

    def _send(self, m: dict) -> None:
        self.proc.stdin.write(msgpack.packb(m))
        self.proc.stdin.flush()

    def check(self) -> bool:
        code = self.proc.poll() if self.proc is not None else None
        if code is not None:
            from pipemax.pipeline import StageFailed
            raise StageFailed(f"KV pool process (pid {self.proc.pid}) exited with code {code}")
        return True

    def stats(self, check) -> dict:
        self._send({"op": OP_STATS})
        return dict(self._recv(5.0, check))

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self._send({"op": OP_STOP})
                    self.proc.wait(timeout=5.0)
                except Exception:
                    pass
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait(timeout=3.0)
        finally:
            if self.proc is not None:
                for f in (self.proc.stdin, self.proc.stdout):
                    try:
                        f.close()
                    except OSError:
                        pass
            for name, _ in self.segments:
                try:
                    posix_ipc.unlink_shared_memory(name)
                except posix_ipc.ExistentialError:
                    pass


if __name__ == "__main__":
    sys.exit(serve([(str(n), int(b)) for n, b in json.loads(sys.argv[1])]))
