import multiprocessing as mp
import os
import random
import signal
import threading
import time
import zlib

import posix_ipc
import pytest
import torch

from pipemax.ipc import codec, names
from pipemax.ipc.ring import (REC_HEADER, MessageTooLarge, PeerGone, Ring, RingTimeout, _align)

SPAWN = mp.get_context("spawn")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
          torch.bool]


@pytest.fixture
def ring_name(run_id):
    return names.shm_name(run_id, "ring0")


def _crc(tensors):
    c = 0
    for k, t in tensors.items():
        c = zlib.crc32(k.encode(), c)
        c = zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), c)
    return c


def _message(i, max_bytes):
    """Message i: a random mix of tensors totalling at most about max_bytes."""
    rng = random.Random(i)
    g = torch.Generator().manual_seed(i)
    tensors = {}
    budget = rng.choice([0, 16, 200, 3000, max_bytes // 2, max_bytes])
    for j in range(rng.randint(0, 4)):
        dt = rng.choice(DTYPES)
        n = rng.randint(0, max(budget // (4 * dt.itemsize), 0))
        t = torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8).to(dt)
        tensors[f"t{j}"] = t
    meta = {"seq": i, "pad": "x" * rng.randint(0, 300), "crc": _crc(tensors)}
    return meta, tensors


# -- workers (module level for spawn) -------------------------------------------------------


def _writer_main(name, n, max_bytes):
    ring = Ring.attach(name)
    for i in range(n):
        meta, tensors = _message(i, max_bytes)
        ring.write(meta, tensors, timeout=20)
    ring.write({"done": True}, timeout=20)
    ring.close()


def _reader_main(name, n, delay, q):
    ring = Ring.attach(name)
    time.sleep(delay)
    try:
        seqs = []
        for _ in range(n):
            with ring.read(timeout=20) as m:
                assert _crc(m.tensors) == m.meta["crc"]
                seqs.append(m.meta["seq"])
        q.put(seqs)
    except BaseException as e:
        q.put(repr(e))
    ring.close()


def _reader_then_hang(name, ev):
    ring = Ring.attach(name)
    ring.read(timeout=20).release()
    ev.set()
    time.sleep(60)


def _writer_then_hang(name, n, ev):
    ring = Ring.attach(name)
    for i in range(n):
        ring.write({"seq": i}, {"x": torch.full((10,), i)}, timeout=20)
    ev.set()
    time.sleep(60)


def _kill_after(proc, delay):
    t = threading.Timer(delay, os.kill, (proc.pid, signal.SIGKILL))
    t.start()
    return t


# -- cross-process ------------------------------------------------------------------------


def test_many_messages_across_processes_with_wrap(ring_name):
    n = 1200
    ring = Ring.create(ring_name, 64 * 1024)
    max_bytes = ring.max_message - 2048
    p = SPAWN.Process(target=_writer_main, args=(ring_name, n, max_bytes))
    p.start()
    try:
        skipped = total = 0
        for i in range(n):
            with ring.read(timeout=20) as m:
                meta, tensors = _message(i, max_bytes)
                assert m.meta == meta                      # order and meta
                assert _crc(m.tensors) == meta["crc"]      # checksum of the received bytes
                assert list(m.tensors) == list(tensors)
                for k, t in tensors.items():
                    assert torch.equal(m.tensors[k], t)
                rec = _align(REC_HEADER + codec.encoded_size(meta, tensors))
                skipped += m._advance - rec
                total += m._advance
        with ring.read(timeout=20) as m:
            assert m.meta == {"done": True} and m.tensors == {}
        p.join(20)
        assert p.exitcode == 0
        assert total > 20 * ring.capacity                  # went round many times
        assert skipped > 0                                 # and took the WRAP path
    finally:
        p.kill()
        ring.close()
        ring.unlink()


def test_full_ring_blocks_writer_until_reader_frees(ring_name):
    ring = Ring.create(ring_name, 8192)
    payload = {"x": torch.arange(200, dtype=torch.int32)}      # ~900-byte messages
    k = 0
    with pytest.raises(RingTimeout):
        while True:
            ring.write({"seq": k, "crc": _crc(payload)}, payload, timeout=0.1)
            k += 1
    assert k >= 4
    extra = 5
    q = SPAWN.Queue()
    p = SPAWN.Process(target=_reader_main, args=(ring_name, k + extra, 0.5, q))
    p.start()
    try:
        t0 = time.monotonic()
        for i in range(extra):
            ring.write({"seq": k + i, "crc": _crc(payload)}, payload, timeout=20)
        assert time.monotonic() - t0 > 0.4                     # blocked until the reader freed
        assert q.get(timeout=20) == list(range(k + extra))     # the timed-out write left no trace
        p.join(20)
        assert p.exitcode == 0
    finally:
        p.kill()
        ring.close()
        ring.unlink()


def test_reader_killed_while_writer_blocked(ring_name):
    ring = Ring.create(ring_name, 8192)
    ev = SPAWN.Event()
    p = SPAWN.Process(target=_reader_then_hang, args=(ring_name, ev))
    p.start()
    try:
        ring.write({"first": 1}, timeout=20)
        assert ev.wait(20)
        timer = _kill_after(p, 0.3)
        with pytest.raises(PeerGone, match=str(p.pid)):
            while True:                                         # fills the ring, then blocks
                ring.write({}, {"x": torch.zeros(1000, dtype=torch.uint8)}, timeout=30)
        killed_at = time.monotonic()
        timer.join()
        assert time.monotonic() - killed_at < 3
    finally:
        p.kill()
        p.join()
        ring.close()
        ring.unlink()


def test_writer_killed_reader_drains_then_peer_gone(ring_name):
    ring = Ring.create(ring_name, 8192)
    ev = SPAWN.Event()
    p = SPAWN.Process(target=_writer_then_hang, args=(ring_name, 3, ev))
    p.start()
    try:
        assert ev.wait(20)
        for i in range(3):                                      # what was posted is still read
            with ring.read(timeout=20) as m:
                assert m.meta == {"seq": i} and torch.equal(m.tensors["x"], torch.full((10,), i))
        _kill_after(p, 0.3).join()
        t0 = time.monotonic()
        with pytest.raises(PeerGone):
            ring.read(timeout=30)
        assert time.monotonic() - t0 < 3
    finally:
        p.kill()
        p.join()
        ring.close()
        ring.unlink()


def test_writer_killed_while_reader_blocked(ring_name):
    ring = Ring.create(ring_name, 8192)
    ev = SPAWN.Event()
    p = SPAWN.Process(target=_writer_then_hang, args=(ring_name, 1, ev))
    p.start()
    try:
        assert ev.wait(20)
        ring.read(timeout=20).release()
        _kill_after(p, 0.3)
        t0 = time.monotonic()
        with pytest.raises(PeerGone):
            ring.read(timeout=None)                             # no overall limit, liveness still checked
        assert 0.2 < time.monotonic() - t0 < 3
    finally:
        p.kill()
        p.join()
        ring.close()
        ring.unlink()


# -- one process --------------------------------------------------------------------------


def test_empty_ring_read_times_out(ring_name):
    ring = Ring.create(ring_name, 4096)
    try:
        for timeout in (0, 0.3):
            t0 = time.monotonic()
            with pytest.raises(RingTimeout):
                ring.read(timeout=timeout)
            assert timeout <= time.monotonic() - t0 < timeout + 1
    finally:
        ring.close()
        ring.unlink()


def _payload_of(ring, size):
    """A uint8 tensor such that the encoded message is exactly `size` bytes."""
    n = size
    while True:
        got = codec.encoded_size({}, {"x": torch.empty(n, dtype=torch.uint8)})
        if got == size:
            return {"x": torch.randint(0, 255, (n,), dtype=torch.uint8)}
        n += size - got


def test_message_near_max_and_too_large(ring_name):
    ring = Ring.create(ring_name, 10000)
    try:
        assert ring.capacity % codec.ALIGN == 0 and ring.capacity >= 10000
        big = _payload_of(ring, ring.max_message)
        rng = random.Random(0)
        for i in range(40):       # a small message first, so the big one lands everywhere, wrapped
            ring.write({"i": i}, {"s": torch.zeros(rng.randint(0, 2000), dtype=torch.uint8)},
                       timeout=1)
            ring.read(timeout=1).release()
            ring.write({}, big, timeout=1)                      # must never deadlock
            with ring.read(timeout=1) as m:
                assert torch.equal(m.tensors["x"], big["x"])
        too_big = _payload_of(ring, ring.max_message + 1)
        t0 = time.monotonic()
        with pytest.raises(MessageTooLarge, match=f"{ring.max_message + 1} bytes.*{ring.max_message}"):
            ring.write({}, too_big, timeout=10)
        assert time.monotonic() - t0 < 1
        with pytest.raises(MessageTooLarge):
            ring.write({}, {"x": torch.zeros(ring.capacity)})
    finally:
        ring.close()
        ring.unlink()


def test_alive_callback_false_raises_peer_gone(ring_name):
    ring = Ring.create(ring_name, 4096)
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerGone):
            ring.read(timeout=10, alive=lambda: False)
        assert time.monotonic() - t0 < 1
        with pytest.raises(PeerGone):                           # fill, then the callback says gone
            while True:
                ring.write({}, {"x": torch.zeros(500, dtype=torch.uint8)}, timeout=10,
                           alive=lambda: False)
        calls = []
        with pytest.raises(PeerGone):                           # flips after a few slices
            ring.write({}, {"x": torch.zeros(500, dtype=torch.uint8)}, timeout=None,
                       alive=lambda: calls.append(1) or len(calls) < 4)
        assert len(calls) == 4
    finally:
        ring.close()
        ring.unlink()


def test_peer_close_is_peer_gone_after_drain(ring_name):
    reader = Ring.create(ring_name, 4096)
    writer = Ring.attach(ring_name)
    try:
        writer.write({"a": 1}, timeout=1)
        writer.close()
        writer.close()                                          # idempotent
        with reader.read(timeout=1) as m:
            assert m.meta == {"a": 1}
        with pytest.raises(PeerGone, match="closed"):
            reader.read(timeout=5)
        with pytest.raises(ValueError):
            writer.write({})
    finally:
        reader.close()
        reader.unlink()


def test_message_protocol(ring_name):
    ring = Ring.create(ring_name, 4096)
    try:
        ring.write({"a": 1}, {"x": torch.arange(3)})
        ring.write({"a": 2}, {"x": torch.arange(4)})
        m = ring.read()
        with pytest.raises(RuntimeError):
            ring.read()
        m.release()
        m.release()                                             # idempotent
        with ring.read() as m2:
            assert m2.meta == {"a": 2}
        with pytest.raises(RingTimeout):                        # released by the `with`, and once
            ring.read(timeout=0)
        ring.write({"a": 3}, {"x": torch.arange(5)})
        m3 = ring.read()
        x = m3.tensors["x"]
        ring.close()                                            # tensors stay valid after close
        ring.close()
        assert torch.equal(x, torch.arange(5))
        m3.release()                                            # no-op once closed
    finally:
        ring.close()
        ring.unlink()
        ring.unlink()                                           # idempotent


def test_create_attach_errors(ring_name):
    with pytest.raises(FileNotFoundError):
        Ring.attach(ring_name)
    ring = Ring.create(ring_name, 4096)
    try:
        with pytest.raises(posix_ipc.ExistentialError):
            Ring.create(ring_name, 4096)
        other = Ring.attach(ring_name)
        assert other.capacity == ring.capacity and other.max_message == ring.max_message
        other.close()
        with pytest.raises(ValueError):
            Ring.create(ring_name + "x", 16)
    finally:
        ring.close()
        ring.unlink()


def test_create_cleans_up_when_a_semaphore_exists(ring_name):
    stale = posix_ipc.Semaphore(ring_name + "-space", posix_ipc.O_CREX)
    try:
        with pytest.raises(posix_ipc.ExistentialError):
            Ring.create(ring_name, 4096)
        rid = ring_name.split("-", 1)[1].rsplit("-", 1)[0]
        assert names.run_objects(rid) == [f"sem.{ring_name[1:]}-space"]
    finally:
        stale.unlink()
        stale.close()
