"""One message as bytes: msgpack metadata plus raw tensor bytes (never pickle).

Layout (all little-endian; offsets are from the start of the message)::

    0        4          8                 8+meta_len   aligned to ALIGN
    +--------+----------+-----------------+---------+--------------+-----+--------------+
    |meta_len| reserved | msgpack(meta)   | padding | tensor 0     | pad | tensor 1 ... |
    |  u32   |   u32=0  | incl. "_t"      |         | raw bytes    |     |              |
    +--------+----------+-----------------+---------+--------------+-----+--------------+

``meta["_t"]`` is a list of ``[name, dtype_name, shape, offset, nbytes]``, one per tensor in
order. Each tensor starts at an ALIGN-aligned offset, so when the message itself starts at an
aligned address (as in a ring) the decoded tensors are aligned zero-copy views.
"""
import struct

import msgpack
import torch

ALIGN = 64
_HEADER = struct.Struct("<II")
_KEY = "_t"


class CodecError(ValueError):
    """The buffer is not a well-formed message."""


DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16",
    "int64", "int32", "int16", "int8", "uint8", "bool",
    "uint16", "uint32", "uint64", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2") if isinstance(getattr(torch, name, None), torch.dtype)}
DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan(meta: dict, tensors: dict | None):
    """Lay out a message: (packed meta, [(tensor, offset, nbytes)], total size).

    ``write_plan(buf, plan(meta, tensors))`` is ``encode_into`` without packing the meta twice
    when the caller needs the size first (the ring does)."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    if _KEY in meta:
        raise ValueError(f"meta key {_KEY!r} is reserved by the codec")
    table, items = [], []
    for name, t in (tensors or {}).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} is not supported")
        nbytes = t.numel() * t.element_size()
        table.append([name, DTYPE_NAMES[t.dtype], list(t.shape), 0, nbytes])
        items.append((t, nbytes))
    # offsets depend on the packed length and the packed length on the offsets: iterate
    offsets = [0] * len(items)
    while True:
        for row, off in zip(table, offsets):
            row[3] = off
        packed = msgpack.packb({**meta, _KEY: table}, use_bin_type=True)
        pos, new = _align(_HEADER.size + len(packed)), []
        for _, nbytes in items:
            new.append(pos)
            pos = _align(pos + nbytes)
        if new == offsets:
            break
        offsets = new
    end = offsets[-1] + items[-1][1] if items else _HEADER.size + len(packed)
    return packed, [(t, off, n) for (t, n), off in zip(items, offsets)], end


def encoded_size(meta: dict, tensors: dict | None) -> int:
    """Bytes that ``encode_into`` will write for this message."""
    return plan(meta, tensors)[2]


def write_plan(buf: memoryview, planned) -> int:
    """Write a message planned by ``plan()`` into ``buf``; returns bytes written."""
    packed, items, total = planned
    buf = memoryview(buf)
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    if len(buf) < total:
        raise ValueError(f"buffer of {len(buf)} bytes is too small for a {total}-byte message")
    _HEADER.pack_into(buf, 0, len(packed), 0)
    buf[_HEADER.size:_HEADER.size + len(packed)] = packed
    with torch.no_grad():
        for t, off, nbytes in items:
            if nbytes:
                dst = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=off)
                dst.view(t.shape).copy_(t)      # strided / CUDA sources copied in one pass
    return total


def encode_into(buf: memoryview, meta: dict, tensors: dict | None) -> int:
    """Write header, meta and tensors at ``buf[0:]``; returns bytes written."""
    return write_plan(buf, plan(meta, tensors))


def encode(meta: dict, tensors: dict | None = None) -> bytearray:
    """The message as a new bytearray (convenience for tests and sockets)."""
    planned = plan(meta, tensors)
    out = bytearray(planned[2])
    write_plan(memoryview(out), planned)
    return out


def decode(buf) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors); the tensors are zero-copy views into ``buf`` (copy before reuse)."""
    buf = memoryview(buf)
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    if buf.readonly:                       # torch.frombuffer needs a writable buffer
        buf = memoryview(bytearray(buf))
    if len(buf) < _HEADER.size:
        raise CodecError(f"message of {len(buf)} bytes is shorter than its header")
    meta_len, _ = _HEADER.unpack_from(buf, 0)
    if _HEADER.size + meta_len > len(buf):
        raise CodecError(f"meta length {meta_len} runs past the end of a {len(buf)}-byte buffer")
    try:
        meta = msgpack.unpackb(buf[_HEADER.size:_HEADER.size + meta_len], raw=False,
                               strict_map_key=False)
    except Exception as e:
        raise CodecError(f"bad msgpack metadata: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get(_KEY), list):
        raise CodecError("metadata is not a map with a tensor table")
    tensors = {}
    for row in meta.pop(_KEY):
        try:
            name, dtype_name, shape, off, nbytes = row
            dtype = DTYPES[dtype_name]
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError, KeyError):
            raise CodecError(f"bad tensor table entry {row!r}") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise CodecError(f"tensor {name!r}: negative dimension in {shape}")
            numel *= s
        if not (isinstance(off, int) and isinstance(nbytes, int)) or nbytes != numel * dtype.itemsize \
                or off < _HEADER.size + meta_len or off + nbytes > len(buf):
            raise CodecError(f"tensor {name!r}: offset {off} / {nbytes} bytes do not fit "
                             f"shape {shape} {dtype_name} in a {len(buf)}-byte message")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=off).view(shape)
    return meta, tensors
