"""pipemax.stages.triton_fused against the torch code it replaces (stages/model.py), in bfloat16.

On the GPU compiled, where the results must equal the torch ops' (same rounding points; the
norm's float32 sum, added up in another order, may move a result by one bf16 ulp). Else on
CPU tensors under Triton's interpreter, whose float32 -> bfloat16 conversion truncates instead
of rounding: there a few ulp per rounding point are allowed."""
import pytest
import torch
import torch.nn.functional as F

from pipemax.stages.model import RMSNorm
from triton_env import load

tf, DEV, WHY = load("pipemax.stages.triton_fused")
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")
BF = torch.bfloat16
GPU = DEV is not None and DEV.type == "cuda"


def close(got, want, gpu_ulps, cpu_ulps, cpu_atol=1e-6):
    """Equal within ``*_ulps`` bf16 units in the last place (relative, 2**-7 each); on the CPU
    also within ``cpu_atol``."""
    ulps = gpu_ulps if GPU else cpu_ulps
    if ulps == 0:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=ulps * 2 ** -7,
                                   atol=1e-6 if GPU else cpu_atol)


def rnd(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(BF).to(DEV)


@pytest.mark.parametrize("with_d", [False, True])
@pytest.mark.parametrize("N,H", [(1, 64), (5, 96), (3, 256)])
def test_add_rmsnorm_matches_torch(N, H, with_d):
    x, d = rnd(N, H, seed=1), rnd(N, H, seed=2, scale=3.0)
    norm = RMSNorm(H, 1e-5).to(DEV, BF)
    with torch.no_grad():
        norm.weight.copy_(rnd(H, seed=3))
    r, y = tf.add_rmsnorm(x, norm.weight, norm.eps, d if with_d else None)
    ref_r = x + d if with_d else x
    close(r, ref_r, 0, 1)
    close(y, norm(ref_r), 1, 4)


@pytest.mark.parametrize("N,I", [(1, 64), (3, 1500)])
def test_silu_mul_matches_torch(N, I):
    gu = rnd(N, 2 * I, seed=5, scale=4.0)
    gate, up = gu.chunk(2, dim=-1)
    close(tf.silu_mul(gu), F.silu(gate) * up, 0, 3)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("n", [1, 37])
def test_write_kv_matches_indexed_writes(n, layer):
    """The k/v cache write: the same slots as the two indexed writes of the torch path, and
    nothing else touched (exact: it is a copy)."""
    nb, L, bs, KVH, D = 12, 3, 4, 2, 24
    kv = rnd(nb, L, 2, bs, KVH, D, seed=7)
    g = torch.Generator().manual_seed(n + layer)
    slots = torch.randperm(nb * bs, generator=g)[:n]
    blocks, offsets = (slots // bs).to(DEV), (slots % bs).to(DEV)
    k, v = rnd(n, KVH, D, seed=8), rnd(n, KVH, D, seed=9)
    want = kv.clone()
    want[:, layer, 0][blocks, offsets] = k
    want[:, layer, 1][blocks, offsets] = v
    tf.write_kv(kv, layer, blocks, offsets, k, v)
    assert torch.equal(kv, want)


@pytest.mark.parametrize("n", [1, 37])
def test_write_kv_into_an_fp8_cache_quantizes_as_torch_does(n):
    """Into an fp8 cache the write quantizes per head (x * inv_scale, clamped, rounded to
    nearest even): the same bytes as stages/kv_quant.py's torch code, saturated values and
    a non-power-of-two scale included."""
    from pipemax.stages.kv_quant import FP8, quantize
    nb, L, bs, KVH, D, layer = 12, 3, 4, 2, 24, 1
    kv = torch.zeros(nb, L, 2, bs, KVH, D, dtype=FP8, device=DEV)
    g = torch.Generator().manual_seed(n)
    slots = torch.randperm(nb * bs, generator=g)[:n]
    blocks, offsets = (slots // bs).to(DEV), (slots % bs).to(DEV)
    k, v = rnd(n, KVH, D, seed=8, scale=30.0), rnd(n, KVH, D, seed=9, scale=3.0)
    inv = torch.tensor([[0.25, 1.7], [4.0, 0.5]], device=DEV)        # [k|v, KVH]
    want = kv.clone()
    want[:, layer, 0][blocks, offsets] = quantize(k, inv[0])
    want[:, layer, 1][blocks, offsets] = quantize(v, inv[1])
    tf.write_kv(kv, layer, blocks, offsets, k, v, inv)
    if GPU:
        assert torch.equal(kv.view(torch.uint8), want.view(torch.uint8))
        return
    # the interpreter's fp32 -> fp8 conversion is not the hardware's (ties go away from zero,
    # a rounding up into the next binade loses its carry): most bytes equal, the rest within
    # a factor of two, and the right slots written
    for j in range(2):
        got = kv[:, layer, j][blocks, offsets].float()
        ref = want[:, layer, j][blocks, offsets].float()
        differ = got != ref
        assert differ.float().mean() < 0.1
        assert bool(((got[differ] / ref[differ] >= 0.5) & (got[differ] / ref[differ] <= 2)).all())
    others = torch.ones(nb, L, 2, bs, dtype=torch.bool)
    others[blocks, layer, :, offsets] = False
    assert torch.equal(kv.view(torch.uint8)[others], want.view(torch.uint8)[others])
