import struct

import msgpack
import pytest
import torch

from pipemax.ipc import codec
from pipemax.ipc.codec import ALIGN, CodecError, decode, encode, encode_into, encoded_size


def _sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -2**62), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (works for every dtype, incl. float8 and NaN payloads)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _roundtrip(meta, tensors):
    n = encoded_size(meta, tensors)
    buf = bytearray(n + 100)
    assert encode_into(memoryview(buf), meta, tensors) == n
    return decode(memoryview(buf)[:n])


@pytest.mark.parametrize("name", sorted(codec.DTYPES))
def test_every_dtype_roundtrips(name):
    dtype = codec.DTYPES[name]
    tensors = {f"{name}_{i}": _sample(dtype, shape, i)
               for i, shape in enumerate([(7,), (3, 5), (), (0,), (2, 0, 3), (1, 1, 1, 9)])}
    meta, out = _roundtrip({"k": name}, tensors)
    assert meta == {"k": name}
    assert list(out) == list(tensors)                     # order kept
    for k, t in tensors.items():
        assert _same(out[k], t), k


def test_required_dtypes_are_in_the_table():
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int64,
               torch.bool, torch.uint8):
        assert codec.DTYPES[codec.DTYPE_NAMES[dt]] is dt


def test_non_contiguous_and_expanded_inputs():
    base = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
    tensors = {"t": base.transpose(0, 2), "step": base[:, ::2, 1:4], "bf": base.bfloat16().mT,
               "expand": torch.tensor([1, 2, 3]).expand(4, 3), "neg": base[1, 2]}
    assert not tensors["t"].is_contiguous()
    _, out = _roundtrip({}, tensors)
    for k, t in tensors.items():
        assert out[k].is_contiguous()
        assert torch.equal(out[k], t), k


def test_requires_grad_tensor_is_encoded():
    t = torch.randn(3, 4, requires_grad=True)
    _, out = _roundtrip({}, {"w": t * 2})
    assert torch.equal(out["w"], (t * 2).detach())


def test_big_and_varied_meta():
    meta = {"ints": list(range(20000)), "neg": -5, "u64": 2**64 - 1, "i64": -2**63,
            "float": 1.5e300, "str": "ünïcode" * 1000, "bytes": bytes(range(256)) * 4000,
            "none": None, "bools": [True, False], "nested": {"a": {"b": [1, [2, {"c": None}]]}},
            7: "int key", "empty": {}, "block_tables": [[i] * 64 for i in range(100)]}
    tensors = {"x": torch.arange(10)}
    m, out = _roundtrip(meta, tensors)
    assert m == meta
    assert torch.equal(out["x"], tensors["x"])


def test_meta_only_and_no_tensors():
    for tensors in (None, {}):
        m, out = _roundtrip({"op": 4}, tensors)
        assert m == {"op": 4} and out == {}
    assert encoded_size({}, None) == len(encode({}))


def test_layout_and_alignment_and_zero_copy():
    tensors = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.zeros((), dtype=torch.bfloat16)}
    buf = encode({"x": 1}, tensors)
    meta_len, reserved = struct.unpack_from("<II", buf, 0)
    assert reserved == 0
    raw = msgpack.unpackb(bytes(buf[8:8 + meta_len]), raw=False)
    rows = raw["_t"]
    assert [r[0] for r in rows] == ["a", "b", "c"]
    assert [r[1] for r in rows] == ["uint8", "int64", "bfloat16"]
    assert [r[2] for r in rows] == [[3], [5], []]
    assert [r[4] for r in rows] == [3, 40, 2]
    assert all(r[3] % ALIGN == 0 and r[3] >= 8 + meta_len for r in rows)
    assert rows[-1][3] + rows[-1][4] == len(buf)
    meta, out = decode(buf)
    out["b"][0] = 99                                       # a view into buf, not a copy
    assert struct.unpack_from("<q", buf, rows[1][3])[0] == 99
    assert meta == {"x": 1}


def test_encode_into_too_small_buffer_and_reserved_key():
    tensors = {"a": torch.ones(100)}
    n = encoded_size({}, tensors)
    with pytest.raises(ValueError):
        encode_into(memoryview(bytearray(n - 1)), {}, tensors)
    with pytest.raises(ValueError):
        encoded_size({"_t": 1}, {})
    with pytest.raises(TypeError):
        encoded_size({}, {"a": [1, 2]})


def test_readonly_buffer_decodes():
    buf = bytes(encode({"a": 1}, {"x": torch.arange(4)}))
    meta, out = decode(buf)
    assert meta == {"a": 1} and torch.equal(out["x"], torch.arange(4))


def _patched(rows_fn=None, meta_len=None, cut=0):
    buf = encode({"a": 1}, {"x": torch.arange(8, dtype=torch.int32)})
    ml = struct.unpack_from("<I", buf, 0)[0]
    if rows_fn is not None:
        meta = msgpack.unpackb(bytes(buf[8:8 + ml]), raw=False)
        rows_fn(meta)
        packed = msgpack.packb(meta, use_bin_type=True)
        buf = bytearray(struct.pack("<II", len(packed), 0)) + packed + buf[8 + ml:]
    if meta_len is not None:
        struct.pack_into("<I", buf, 0, meta_len)
    return buf[:len(buf) - cut]


def _set_row(i, v):
    def f(meta):
        meta["_t"][0][i] = v
    return f


@pytest.mark.parametrize("buf", [
    b"", b"\x01\x00", bytearray(8),                                     # short / empty meta
    _patched(meta_len=10**6),                                           # meta past the end
    bytearray(struct.pack("<II", 3, 0)) + b"\xc1\xc1\xc1",              # not msgpack
    bytearray(struct.pack("<II", 1, 0)) + b"\x05",                      # meta not a map
    bytearray(struct.pack("<II", 1, 0)) + b"\x80",                      # map without "_t"
    _patched(meta_len=1),                                               # truncated msgpack
    _patched(lambda m: m.update({"_t": 5})),
    _patched(lambda m: m["_t"].append(["y", "float32"])),               # short row
    _patched(_set_row(1, "float128")),                                  # unknown dtype
    _patched(_set_row(2, [-1, 8])),                                     # negative dim
    _patched(_set_row(2, "xx")),                                        # shape not a list of ints
    _patched(_set_row(3, 10**6)),                                       # offset past the end
    _patched(_set_row(3, 0)),                                           # offset inside header
    _patched(_set_row(4, 31)),                                          # nbytes != shape*itemsize
    _patched(cut=1),                                                    # truncated tensor data
], ids=lambda b: str(len(b)))
def test_malformed_buffers_raise_codec_error(buf):
    with pytest.raises(CodecError):
        decode(buf)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_source_tensor():
    t = torch.randn(64, 33, device="cuda").bfloat16()[:, 1:]
    _, out = _roundtrip({}, {"t": t})
    assert torch.equal(out["t"], t.cpu())
