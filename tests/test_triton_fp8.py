"""pipemax.stages.triton_fp8 (the fused per-token fp8 quantization of a GEMM's input) against
the torch code it replaces (stages/fp8.py: zero padding, then quantize_rows), byte for byte:
compiled on a GPU, else on CPU tensors under Triton's interpreter."""
import pytest
import torch
import torch.nn.functional as F

from pipemax.stages.fp8 import E4M3_MAX, FP8, _TINY, quantize_rows
from triton_env import load

tq, DEV, WHY = load("pipemax.stages.triton_fp8")
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")


def reference(x, Kp, Mp):
    """The torch code on the CPU (on CUDA torch divides by the scalar 448 as a multiplication
    by its inverse: a scale one unit apart now and then; the kernel divides, as the CPU)."""
    M, K = x.shape
    return quantize_rows(F.pad(x.cpu(), (0, Kp - K, 0, Mp - M)))


def _x(M, K, dtype, seed):
    """Rows of very different magnitudes (subnormal e4m3 values after scaling), a zero row,
    an outlier, and a row of exact rounding ties (its amax 448: scale 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, M)[:, None]
    x[:, ::7] *= 1e-3
    if M > 2:
        x[1] = 0
        x[2, K // 2] = -5e3
    if M > 3 and K >= 8:
        ties = torch.tensor([448.0, 1.0625, -1.1875, 17.0, 2 ** -9 * 1.5, -(2 ** -9) * 2.5,
                             2 ** -7 * 1.0625, 2 ** -6 * 0.9999])   # e4m3 ties and edges
        x[3] = 0.25
        x[3, :8] = ties
    return x.to(dtype).to(DEV)


def _equal(got, want):
    q, s = (t.cpu() for t in got)
    rq, rs = want
    assert q.dtype == FP8 and s.dtype == torch.float32 and q.shape == rq.shape
    assert s.shape == rs.shape
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32))
    diff = (q.view(torch.uint8) != rq.view(torch.uint8)).nonzero()
    assert diff.numel() == 0, (diff[:5].tolist(), q.view(torch.uint8)[tuple(diff[0])],
                               rq.view(torch.uint8)[tuple(diff[0])])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,K,max_block", [(1, 40, 16384), (5, 100, 16384), (16, 64, 16384),
                                           (33, 1100, 16384),       # each row in one block
                                           (5, 100, 64), (9, 400, 128)])   # rows in blocks
def test_quantize_equals_torch_bit_for_bit(M, K, max_block, dtype):
    x = _x(M, K, dtype, seed=M + K)
    Mp, Kp = -(-M // 16) * 16, -(-K // 16) * 16
    got = tq.quantize_rows_padded(x, Kp, Mp, _TINY, max_block)
    _equal(got, reference(x, Kp, Mp))
    q, s = got
    assert torch.all(q.view(torch.uint8)[M:] == 0) and torch.all(q.view(torch.uint8)[:, K:] == 0)
    assert float(q[:M].float().abs().max()) == E4M3_MAX


def test_quantize_every_e4m3_rounding_case():
    """Every float32 grid point between e4m3 values (the values, the midpoints and a hair
    either side of them, both signs), scaled by 1 (the row's amax is 448)."""
    vals = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()       # 0 .. 448
    mid = (vals[1:] + vals[:-1]) / 2
    eps = mid * 2 ** -20 + 2 ** -30
    row = torch.cat([vals, mid, mid - eps, mid + eps])
    x = torch.cat([row, -row]).reshape(1, -1)
    _equal(tq.quantize_rows_padded(x.to(DEV), x.shape[1], 16, _TINY),
           reference(x.to(DEV), x.shape[1], 16))


def test_strided_rows_and_no_rows():
    x = _x(9, 96, torch.bfloat16, seed=4)
    wide = torch.zeros(9, 128, dtype=torch.bfloat16, device=DEV)
    wide[:, :96] = x
    _equal(tq.quantize_rows_padded(wide[:, :96], 96, 16, _TINY), reference(x, 96, 16))
    q, s = tq.quantize_rows_padded(x[:0], 96, 0, _TINY)
    assert q.shape == (0, 96) and s.shape == (0, 1)
