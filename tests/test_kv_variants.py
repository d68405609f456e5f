"""tools/kv_variants.py: its roundings are what the caches they stand for would give back."""
from __future__ import annotations

import torch

from pipemax.stages.kv_quant import KVQuant
from tools.kv_variants import Rounding


def _kv(seed, n=40, KVH=3, D=16):
    g = torch.Generator().manual_seed(seed)
    off = torch.linspace(-20, 20, D)                      # large channel offsets, as K's
    return torch.randn(n, KVH, D, generator=g) * 2 + off, torch.randn(n, KVH, D, generator=g)


def test_fp8_is_the_stage_caches_round_trip():
    """``fp8`` calibrates on its first call as a stage's prompt scales do, and then gives
    back exactly what the fp8 cache's round trip gives, for later values too."""
    k, v = _kv(0)
    r = Rounding("fp8")
    q = KVQuant.make(2, 3, torch.device("cpu"), calibrate=True)
    q.observe(1, k, v)
    k2, v2 = _kv(1)
    r(1, k, v)
    got_k, got_v = r(1, k2, v2)
    assert torch.equal(got_k, q.roundtrip(k2, 1, 0)) and torch.equal(got_v, q.roundtrip(v2, 1, 1))
    assert not torch.equal(got_k, k2)                     # a rounding, not a copy
    same_k, same_v = Rounding("f32")(0, k, v)               # the reference: untouched
    assert same_k is k and same_v is v


def test_smoothing_and_int8_round_closer():
    """K smoothing leaves out K's mean (a shift softmax does not see) and rounds the rest,
    V smoothing adds V's mean back; int8 per channel rounds K several times closer than e4m3."""
    k, v = _kv(2)
    r = Rounding("fp8-ks-vs")
    got_k, got_v = r(0, k, v)
    mk, mv = k.mean(0), v.mean(0)
    assert torch.equal(r.cal[0][0], mk) and torch.equal(r.cal[0][1], mv)
    err = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert err(got_k, k - mk) < 2.0 ** -4 and err(got_v, v) < 2.0 ** -4
    plain = err(Rounding("fp8")(0, k, v)[0], k)
    assert err(got_k + mk, k) < plain / 2                  # less to round: closer
    assert err(Rounding("int8-ks-chan")(0, k, v)[0] + mk, k) < plain / 4
