"""The host KV pool process: owns the pinned host KV memory of every stage.

    launcher ──ring pool-in──► KV pool process ──ring pool-out──► launcher
                                     │ creates, owns, removes
                                     ▼
          /dev/shm/pipemax-<run>-hostkv<s>: host[H, L_s, 2, block_size, kv_heads, head_dim]
                     ▲ mapped (and cudaHostRegister'ed) by stage s, which copies blocks
                     │ in and out on the timetable (stages/offload.py)

The pool creates one segment per stage (sized by the plan, checked against /dev/shm, host
memory and ``ulimit -l`` before anything starts), answers STATS with what it holds, and on
STOP (or when the launcher dies) removes its segments. Which host block holds which tokens is
decided by the driver's extent allocator (pipemax/block_manager.py), so the hot path never
waits on this process: stages copy directly to and from the memory it owns.

Ops (msgpack meta on the rings): READY {segments}  STATS -> {bytes, segments}  STOP -> {}.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import signal
import sys
from dataclasses import dataclass

import posix_ipc

from pipemax.ipc.names import shm_name
from pipemax.ipc.ring import PeerGone, Ring

OP_READY, OP_STATS, OP_STOP = 1, 2, 3
GiB = 1 << 30


class HostMemoryError(ValueError):
    """The host cannot hold the pool; one line with the figures."""


@dataclass(frozen=True)
class PoolSpec:
    segments: tuple[tuple[str, int], ...]   # (shm name, bytes) per stage
    ring_in: str
    ring_out: str
    parent_pid: int


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
def serve(spec: PoolSpec) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):      # the launcher stops us (as the stages)
        signal.signal(sig, signal.SIG_IGN)
    alive = lambda: os.getppid() == spec.parent_pid
    rin, rout = Ring.attach(spec.ring_in), Ring.attach(spec.ring_out)
    made = []
    try:
        for name, size in spec.segments:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
            shm.close_fd()
            made.append(name)
        rout.write({"op": OP_READY, "segments": made}, timeout=30.0, alive=alive)
        while True:
            with rin.read(timeout=None, alive=alive) as m:
                op = m.meta.get("op")
            if op == OP_STATS:
                rout.write({"op": OP_STATS, "segments": made,
                            "bytes": sum(s for _, s in spec.segments)}, timeout=30.0,
                           alive=alive)
            elif op == OP_STOP:
                rout.write({"op": OP_STOP}, timeout=5.0, alive=alive)
                return 0
    except PeerGone:
        return 3
    finally:
        for name in made:
            try:
                posix_ipc.unlink_shared_memory(name)
            except posix_ipc.ExistentialError:
                pass
        rin.close()
        rout.close()


def main(spec: PoolSpec) -> None:
    code = serve(spec)
    sys.stdout.flush()
    os._exit(code)


class KVPool:
    """The pool process, seen from the launcher."""

    def __init__(self, run_id: str, segment_bytes: list[int]):
        self.run_id = run_id
        self.segments = tuple((shm_name(run_id, f"hostkv{i}"), int(b))
                              for i, b in enumerate(segment_bytes))
        self.proc: mp.Process | None = None
        self.rings: list[Ring] = []

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.segments]

    def start(self, check) -> None:
        names = [shm_name(self.run_id, "pool-in"), shm_name(self.run_id, "pool-out")]
        self.rings = [Ring.create(n, 1 << 16) for n in names]
        spec = PoolSpec(self.segments, names[0], names[1], os.getpid())
        self.proc = mp.get_context("spawn").Process(target=main, args=(spec,),
                                                    name="pipemax-kvpool")
        self.proc.start()
        with self.rings[1].read(timeout=60.0, alive=check) as m:
            if m.meta.get("op") != OP_READY:
                raise RuntimeError("KV pool process did not start")

    def check(self) -> bool:
        if self.proc is not None and self.proc.exitcode is not None:
            from pipemax.pipeline import StageFailed
            raise StageFailed(f"KV pool process (pid {self.proc.pid}) exited with code "
                              f"{self.proc.exitcode}")
        return True

    def stats(self, check) -> dict:
        self.rings[0].write({"op": OP_STATS}, timeout=5.0, alive=check)
        with self.rings[1].read(timeout=5.0, alive=check) as m:
            return dict(m.meta)

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.exitcode is None:
                try:
                    self.rings[0].write({"op": OP_STOP}, timeout=2.0)
                    self.proc.join(timeout=5.0)
                except Exception:
                    pass
                if self.proc.exitcode is None:
                    self.proc.kill()
                    self.proc.join(timeout=3.0)
        finally:
            for r in self.rings:
                r.close()
                r.unlink()
            self.rings.clear()
            for name, _ in self.segments:
                try:
                    posix_ipc.unlink_shared_memory(name)
                except posix_ipc.ExistentialError:
                    pass
