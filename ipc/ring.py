"""A single-writer / single-reader message ring in POSIX shared memory.

Shared-memory segment ``name`` (from ``names.shm_name``)::

    0                                                   64          4096          4096+capacity
    +-------+--------+---------+--------+--------+--------+----+-----+-------------+
    | magic |capacity|write_off|read_off|wr. pid |rd. pid |wr. |rd.  |  data area  |
    |       |        | (total) |(total) |        |        |clsd|clsd |  capacity B |
    +-------+--------+---------+--------+--------+--------+----+-----+-------------+
      little-endian u64 fields; the data area starts on a page boundary

    data area (positions = offset % capacity; records are 64-byte aligned):

    +--------------------+--------------------+-----------+------------------+
    | len | codec bytes  | len | codec bytes  |  free ... | WRAP |  (skip)   |
    +--------------------+--------------------+-----------+------------------+
    ^ 64-byte record header (u64 len), then ``codec`` bytes, padded to 64
      ^read_off                                ^write_off

``write_off`` / ``read_off`` count bytes ever written / freed, so ``used = write_off - read_off``;
only the writer stores ``write_off`` and only the reader stores ``read_off``. A record never
straddles the end: if it does not fit before the end, the writer puts a WRAP marker (len = 2**64-1)
there, counts the skipped tail as used, and writes the record at position 0; the reader, seeing
WRAP, skips to 0. So every message is contiguous and decodes zero-copy. A record takes at most half
the capacity (``max_message``), which guarantees that a wrapped record fits once the ring drains.

Semaphores ``name-items`` (complete messages, posted by the writer) and ``name-space`` (posted by
the reader each time it frees bytes; a hint, the writer re-checks ``read_off``).

State machine, per side (every wait is in slices of SLICE seconds; after each slice: ``alive()``,
the peer's closed flag and the peer's pid are checked -> PeerGone; overall timeout -> RingTimeout)::

    writer:  IDLE --write()--> too big? --yes--> MessageTooLarge
                                 | no
                                 v
                  free >= need? --no--> WAIT on `space` --token--> (re-check free)
                                 | yes
                                 v
                  [WRAP marker] + record written; write_off += skip + rec; post `items` --> IDLE

    reader:  IDLE --read()--> WAIT on `items` --token--> HOLDING (Message: zero-copy tensors)
             HOLDING --release() / end of `with`--> read_off += skip + rec; post `space` --> IDLE
             HOLDING --read()--> RuntimeError (release the previous message first)

Pids are recorded by the writer on its first write and by the reader on its first read. A reader
drains messages already posted before it reports a dead or closed writer.
"""
import mmap
import os
import struct
import time
from typing import Callable

import posix_ipc

from . import codec, names

MAGIC = 0x31474E4952584D50          # b"PMXRING1" little-endian
HEADER_SIZE = 4096
REC_HEADER = codec.ALIGN             # one u64 length, padded so that codec bytes stay aligned
WRAP = 2**64 - 1
SLICE = 0.05

_U64 = struct.Struct("<Q")
_MAGIC, _CAP, _WOFF, _ROFF, _WPID, _RPID, _WCLOSED, _RCLOSED = range(0, 64, 8)


class RingTimeout(TimeoutError):
    """The overall timeout of a read or write ran out."""


class PeerGone(RuntimeError):
    """The other side of the ring died or closed it."""


class MessageTooLarge(ValueError):
    """The message can never fit in this ring."""


def _align(n: int) -> int:
    return (n + codec.ALIGN - 1) // codec.ALIGN * codec.ALIGN


def _unlink_all(name: str, sems=True, shm=True) -> None:
    targets = []
    if shm:
        targets.append((posix_ipc.unlink_shared_memory, name))
    if sems:
        targets += [(posix_ipc.unlink_semaphore, name + "-items"),
                    (posix_ipc.unlink_semaphore, name + "-space")]
    for fn, n in targets:
        try:
            fn(n)
        except posix_ipc.ExistentialError:
            pass


class Message:
    """One message read from a ring; ``tensors`` are views into the ring until ``release()``."""

    def __init__(self, ring: "Ring", meta: dict, tensors: dict, advance: int):
        self.meta = meta
        self.tensors = tensors
        self._ring = ring
        self._advance = advance

    def release(self) -> None:
        """Free the message's bytes for the writer (idempotent)."""
        ring, self._ring = self._ring, None
        if ring is not None:
            ring._release(self, self._advance)

    def __enter__(self) -> "Message":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Ring:
    """One writer and one reader; see the module docstring for the layout."""

    def __init__(self, name: str, mm: mmap.mmap, items, space):
        self.name = name
        self._mm = mm
        self._view = memoryview(mm)
        self._items = items
        self._space = space
        self.capacity = self._get(_CAP)
        self._wrote = False
        self._read = False
        self._pending: Message | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, capacity: int) -> "Ring":
        """Create the segment and both semaphores (fails if any exists)."""
        capacity = _align(capacity)
        if capacity < 4 * codec.ALIGN:
            raise ValueError(f"ring capacity {capacity} is below {4 * codec.ALIGN} bytes")
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=HEADER_SIZE + capacity)
        made = []
        try:
            mm = mmap.mmap(shm.fd, shm.size)
            shm.close_fd()
            for suffix in ("-items", "-space"):
                made.append(posix_ipc.Semaphore(name + suffix, posix_ipc.O_CREX, initial_value=0))
            _U64.pack_into(mm, _CAP, capacity)
            _U64.pack_into(mm, _MAGIC, MAGIC)            # last: attach() checks it
        except BaseException:
            for sem in made:
                sem.unlink()
                sem.close()
            _unlink_all(name, sems=False)
            raise
        return cls(name, mm, *made)

    @classmethod
    def attach(cls, name: str) -> "Ring":
        """Open a ring created by another process."""
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(f"no ring named {name!r}") from None
        try:
            mm = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        if len(mm) < HEADER_SIZE or _U64.unpack_from(mm, _MAGIC)[0] != MAGIC \
                or HEADER_SIZE + _U64.unpack_from(mm, _CAP)[0] > len(mm):
            mm.close()
            raise ValueError(f"{name!r} is not a pipemax ring (or is still being created)")
        try:
            items = posix_ipc.Semaphore(name + "-items")
            space = posix_ipc.Semaphore(name + "-space")
        except posix_ipc.ExistentialError:
            mm.close()
            raise FileNotFoundError(f"semaphores of ring {name!r} are missing") from None
        return cls(name, mm, items, space)

    @property
    def max_message(self) -> int:
        """The largest codec payload (``codec.encoded_size``) that fits."""
        return (self.capacity // 2) // codec.ALIGN * codec.ALIGN - REC_HEADER

    # -- header fields ------------------------------------------------------------------------

    def _get(self, off: int) -> int:
        return _U64.unpack_from(self._mm, off)[0]

    def _set(self, off: int, value: int) -> None:
        _U64.pack_into(self._mm, off, value)

    def _check_open(self) -> None:
        if self._mm is None:
            raise ValueError(f"ring {self.name!r} is closed")

    # -- waiting ------------------------------------------------------------------------------

    def _wait(self, sem, deadline, timeout, alive, pid_off, closed_off, what: str) -> None:
        """Take one token of ``sem``, in slices; raise PeerGone / RingTimeout."""
        while True:
            left = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
            try:
                sem.acquire(max(left, 0))
                return
            except posix_ipc.BusyError:
                pass
            except posix_ipc.SignalError:
                pass  # Python runs the signal's handler at the next bytecode: it may raise
            if alive is not None and not alive():
                raise PeerGone(f"ring {self.name!r}: peer reported gone while waiting for {what}")
            if self._get(closed_off):
                raise PeerGone(f"ring {self.name!r}: peer closed the ring while waiting for {what}")
            pid = self._get(pid_off)
            if pid and not names.pid_alive(pid):
                raise PeerGone(f"ring {self.name!r}: peer pid {pid} died while waiting for {what}")
            if deadline is not None and time.monotonic() >= deadline:
                raise RingTimeout(f"ring {self.name!r}: no {what} within {timeout} s")

    # -- writer -------------------------------------------------------------------------------

    def write(self, meta: dict, tensors: dict | None = None, *, timeout: float | None = 30.0,
              alive: Callable[[], bool] | None = None) -> None:
        """Append one message, waiting (bounded) for space."""
        self._check_open()
        planned = codec.plan(meta, tensors)
        size = planned[2]
        if size > self.max_message:
            raise MessageTooLarge(f"ring {self.name!r}: message of {size} bytes exceeds "
                                  f"max_message {self.max_message} bytes (capacity {self.capacity})")
        if not self._wrote:
            self._wrote = True
            self._set(_WPID, os.getpid())
        cap = self.capacity
        rec = _align(REC_HEADER + size)
        woff = self._get(_WOFF)
        pos = woff % cap
        skip = cap - pos if cap - pos < rec else 0
        while self._space.value > 0:              # stale hints: the check below sees their frees
            try:
                self._space.acquire(0)
            except posix_ipc.BusyError:
                break
        deadline = None if timeout is None else time.monotonic() + timeout
        while cap - (woff - self._get(_ROFF)) < skip + rec:
            self._wait(self._space, deadline, timeout, alive, _RPID, _RCLOSED, "free space")
        if skip:
            _U64.pack_into(self._view, HEADER_SIZE + pos, WRAP)
            pos = 0
        start = HEADER_SIZE + pos + REC_HEADER
        codec.write_plan(self._view[start:start + size], planned)
        _U64.pack_into(self._view, HEADER_SIZE + pos, size)
        self._set(_WOFF, woff + skip + rec)
        self._items.release()

    # -- reader -------------------------------------------------------------------------------

    def read(self, *, timeout: float | None = 30.0,
             alive: Callable[[], bool] | None = None) -> Message:
        """The next message (zero-copy); release it before the next read."""
        self._check_open()
        if self._pending is not None:
            raise RuntimeError(f"ring {self.name!r}: release the previous message before reading")
        if not self._read:
            self._read = True
            self._set(_RPID, os.getpid())
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait(self._items, deadline, timeout, alive, _WPID, _WCLOSED, "message")
        cap = self.capacity
        roff = self._get(_ROFF)
        pos = roff % cap
        size = _U64.unpack_from(self._view, HEADER_SIZE + pos)[0]
        skip = 0
        if size == WRAP:
            skip, pos = cap - pos, 0
            size = _U64.unpack_from(self._view, HEADER_SIZE)[0]
        if size > self.max_message:
            raise codec.CodecError(f"ring {self.name!r}: corrupt record length {size} at {pos}")
        start = HEADER_SIZE + pos + REC_HEADER
        meta, tensors = codec.decode(self._view[start:start + size])
        self._pending = Message(self, meta, tensors, skip + _align(REC_HEADER + size))
        return self._pending

    def _release(self, msg: Message, advance: int) -> None:
        if self._pending is not msg or self._mm is None:
            return
        self._pending = None
        self._set(_ROFF, self._get(_ROFF) + advance)
        self._space.release()

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Mark this side closed, close the semaphores and unmap (idempotent).

        Tensors of a message still referenced keep the mapping alive until they are freed."""
        if self._mm is None:
            return
        if self._wrote:
            self._set(_WCLOSED, 1)
        if self._read:
            self._set(_RCLOSED, 1)
        self._pending = None
        self._items.close()
        self._space.close()
        self._view.release()
        try:
            self._mm.close()
        except BufferError:
            pass                                  # views still exported: unmapped when freed
        self._mm = None

    def unlink(self) -> None:
        """Remove the segment and both semaphores (idempotent)."""
        _unlink_all(self.name)

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ring({self.name!r}, capacity={self.capacity})"
