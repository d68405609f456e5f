"""pipemax.stages.triton_decode: paged decode attention against a float64 torch reference.

Runs on the GPU when there is one, else on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set only while the kernel module is imported). Skipped only when
neither is possible.
"""
import pytest
import torch

from triton_env import load


td, DEV, WHY = load("pipemax.stages.triton_decode")
if WHY:
    print(f"test_triton_decode skipped: {WHY}")
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")
ON_GPU = DEV is not None and DEV.type == "cuda"


def _case(B, H, KVH, D, bs, ctx_lens, dtype, seed, layer=1, L=3, spare=5):
    """Random q and cache; each sequence's blocks are a random (shuffled) set of cache blocks;
    every slot not inside some sequence's context is NaN."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-c // bs) for c in ctx_lens]
    max_blocks = max(nblk) + 2                                # padded rows
    nb = sum(nblk) + spare
    kv = torch.full((nb, L, 2, bs, KVH, D), float("nan"), dtype=torch.float64)
    perm = torch.randperm(nb, generator=g)
    bt = torch.full((B, max_blocks), -1, dtype=torch.int64)   # padding: never to be read
    ks, vs = [], []
    used = 0
    for b, c in enumerate(ctx_lens):
        blocks = perm[used:used + nblk[b]]
        used += nblk[b]
        bt[b, :nblk[b]] = blocks
        k = torch.randn(c, KVH, D, generator=g, dtype=torch.float64)
        v = torch.randn(c, KVH, D, generator=g, dtype=torch.float64)
        pos = torch.arange(c)
        kv[blocks[pos // bs], layer, 0, pos % bs] = k
        kv[blocks[pos // bs], layer, 1, pos % bs] = v
        ks.append(k.to(dtype).double())                      # what the kernel sees
        vs.append(v.to(dtype).double())
    # other layers of the same blocks hold finite garbage (they must not be read either,
    # but NaN there would not tell them apart from the layer's own data being wrong)
    for l in range(L):
        if l != layer:
            kv[:, l] = torch.randn(kv[:, l].shape, generator=g, dtype=torch.float64) * 100
    q = torch.randn(B, H, D, generator=g, dtype=torch.float64).to(dtype)
    return q, kv.to(dtype), bt, torch.tensor(ctx_lens, dtype=torch.int32), ks, vs


def _reference(q, ks, vs, scale):
    B, H, D = q.shape
    out = []
    for b in range(B):
        k, v = ks[b], vs[b]                                   # [c, KVH, D]
        G = H // k.shape[1]
        kk = k.repeat_interleave(G, dim=1).transpose(0, 1)    # [H, c, D]
        vv = v.repeat_interleave(G, dim=1).transpose(0, 1)
        s = torch.einsum("hd,hcd->hc", q[b].double(), kk) * scale
        out.append(torch.einsum("hc,hcd->hd", torch.softmax(s, -1), vv).reshape(H * D))
    return torch.stack(out)


def _fp8(kv, ks, vs, layer, seed):
    """The case's cache in fp8, with per-(layer, k|v, head) power-of-two scales: (cache,
    scales, what the kernel must see of each sequence's k and v)."""
    from pipemax.stages.kv_quant import dequantize, quantize
    L, KVH = kv.shape[1], kv.shape[4]
    g = torch.Generator().manual_seed(seed + 1000)
    scale = 2.0 ** torch.randint(-6, -1, (L, 2, KVH), generator=g).float()
    # quantize wants [..., KVH, D]: the cache is [nb, L, 2, bs, KVH, D]
    kv8 = torch.stack([torch.stack([quantize(kv[:, l, j].float().nan_to_num(0.0),
                                             1 / scale[l, j]) for j in range(2)], 1)
                       for l in range(L)], 1)
    back = lambda x, j: dequantize(quantize(x.float(), 1 / scale[layer, j]), scale[layer, j],
                                   torch.float64)
    return kv8, scale, [back(k, 0) for k in ks], [back(v, 1) for v in vs]


def _check(B, H, KVH, D, bs, ctx_lens, dtype, seed=0, splits=None, bt_dtype=torch.int32,
           max_ctx="exact", layer=1, fp8=False):
    q, kv, bt, cl, ks, vs = _case(B, H, KVH, D, bs, ctx_lens, dtype, seed, layer=layer)
    kv_scale = None
    if fp8:
        kv, kv_scale, ks, vs = _fp8(kv.double() * 8, [k * 8 for k in ks], [v * 8 for v in vs],
                                    layer, seed)
        kv_scale = kv_scale.to(DEV)
    scale = D ** -0.5
    ref = _reference(q, ks, vs, scale)
    mc = max(ctx_lens) if max_ctx == "exact" else max_ctx
    out = td.paged_decode(q.to(DEV), kv.to(DEV), layer, bt.to(bt_dtype).to(DEV), cl.to(DEV), scale,
                          mc, splits=splits, kv_scale=kv_scale)
    assert out.shape == (B, H * D) and out.dtype == dtype
    out = out.cpu().double()
    assert torch.isfinite(out).all(), "NaN/inf: read outside the context?"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = (out - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.3g}"
    # per sequence as well: a wrong short sequence must not hide behind long ones
    for b in range(B):
        if ctx_lens[b] == 0:
            assert (out[b] == 0).all(), "a padding row (ctx 0) must come out as zeros"
            continue
        e = (out[b] - ref[b]).norm() / ref[b].norm()
        assert e < 2 * tol, f"sequence {b} (ctx {ctx_lens[b]}): relative error {e:.3g}"


# (B, H, KVH, D, bs, ctx_lens)
CASES = [
    (3, 4, 4, 64, 16, [1, 17, 40]),            # MHA (G=1), ctx 1, non-multiples of bs
    (2, 8, 2, 64, 8, [23, 5]),                 # G=4, block_size 8
    (2, 8, 1, 128, 32, [70, 33]),              # G=8, head_dim 128, block_size 32
    (4, 16, 2, 64, 16, [1, 16, 31, 64]),       # G=8, several lengths incl. exact multiples
    (1, 2, 1, 64, 16, [9]),                    # G=2
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}KV{c[2]}D{c[3]}bs{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_matches_reference(case, dtype):
    _check(*case, dtype=dtype, seed=CASES.index(case))


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_split_context(splits, dtype):
    """Chunks merged by the combine kernel, incl. chunks past a short sequence's end."""
    _check(3, 8, 2, 64, 16, [1, 150, 333], dtype, seed=splits, splits=splits)


@pytest.mark.parametrize("splits", [1, 4])
def test_int64_block_table_and_default_max_ctx(splits):
    _check(2, 8, 2, 64, 16, [37, 100], torch.float32, seed=7, splits=splits,
           bt_dtype=torch.int64, max_ctx=None)


@pytest.mark.parametrize("seed", range(4))
def test_random_batches(seed):
    """Random head layout, block size, layer and lengths; split or not."""
    g = torch.Generator().manual_seed(100 + seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]
    KVH, G, D, bs = pick([1, 2]), pick([1, 4, 8]), pick([64, 128]), pick([8, 16, 32])
    B = int(torch.randint(1, 5, (1,), generator=g))
    lens = torch.randint(1, 200, (B,), generator=g).tolist()
    _check(B, KVH * G, KVH, D, bs, lens, pick([torch.float32, torch.bfloat16]), seed=seed,
           splits=pick([None, 1, 2, 4]), layer=pick([0, 1, 2]))


@pytest.mark.parametrize("splits", [1, 3])
def test_padding_rows(splits):
    """ctx_len 0 (e.g. the padding rows of a CUDA-graph batch): zeros, and nothing read."""
    _check(4, 8, 2, 64, 16, [0, 70, 0, 1], torch.bfloat16, seed=splits, splits=splits)


def test_out_argument():
    q, kv, bt, cl, ks, vs = _case(2, 8, 2, 64, 16, [40, 9], torch.float32, 9)
    ref = _reference(q, ks, vs, 0.2)
    buf = torch.full((3, 8 * 64), float("nan"), device=DEV)
    r = td.paged_decode(q.to(DEV), kv.to(DEV), 1, bt.to(DEV), cl.to(DEV), 0.2, 48, out=buf[1:])
    assert r.data_ptr() == buf[1].data_ptr()
    assert torch.isnan(buf[0]).all()
    assert (buf[1:].cpu().double() - ref).norm() / ref.norm() < 1e-4


def test_fp16():
    _check(2, 8, 2, 128, 16, [77, 130], torch.float16, seed=3, splits=2)


def test_planner():
    for B in (1, 8, 128, 256):
        for ctx in (1, 100, 640, 2048, 32768, 131072):
            sp, chunk = td.plan_splits(B, 8, ctx, 132)
            assert 1 <= sp <= td.MAX_SPLITS and chunk % td.BLOCK_N == 0
            assert sp * chunk >= ctx and (sp - 1) * chunk < ctx      # no empty split
            if sp > 1:
                assert chunk >= td.MIN_CHUNK - td.BLOCK_N


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_large_gpu():
    """Realistic sizes and the default split plan (GPU only)."""
    g = torch.Generator().manual_seed(11)
    lens = torch.randint(1, 3000, (48,), generator=g).tolist()
    _check(48, 32, 8, 128, 16, lens, torch.bfloat16, seed=11, splits=None)
    _check(6, 32, 8, 128, 16, [5000, 1, 4097, 300, 2048, 17], torch.float32, seed=12)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_cuda_graph_capture():
    q, kv, bt, cl, ks, vs = _case(4, 16, 4, 128, 16, [100, 1, 700, 333], torch.bfloat16, 5)
    q, kv, bt, cl = q.cuda(), kv.cuda(), bt.to(torch.int32).cuda(), cl.cuda()
    ref = _reference(q.cpu(), ks, vs, 0.1)
    f = lambda: td.paged_decode(q, kv, 1, bt, cl, 0.1, 1024)
    f()                                                      # compile outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    graph.replay()
    torch.cuda.synchronize()
    assert (out.cpu().double() - ref).norm() / ref.norm() < 2e-2


HEAD_SIZES = [8, 16, 64, 80, 96, 128, 256]


@pytest.mark.parametrize("D", HEAD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_head_sizes(D, dtype):
    """Every head size a checkpoint may have: under 16 padded to 16 (tl.dot's least K), others
    to a power of two; direct and split contexts."""
    _check(2, 4, 2, D, 16, [13, 90], dtype, seed=D, splits=1)
    _check(2, 4, 2, D, 16, [13, 300], dtype, seed=D + 1, splits=3)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("D", HEAD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_decode_path_takes_the_kernel_on_gpu(D, dtype):
    """At start a stage runs the kernel once at its shape against the torch path; every head
    size above passes that check on the GPU, so the kernel is chosen."""
    from pipemax.stages.attention import decode_path
    kernel, why = decode_path(8, 2, D, 16, dtype, DEV)
    assert kernel, why


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("D", HEAD_SIZES)
def test_kernel_equals_torch_path_on_gpu(D):
    """The stage's two decode paths agree at every head size (bf16, real GQA layout)."""
    from pipemax.stages.attention import paged_decode
    q, kv, bt, cl, ks, vs = _case(6, 12, 3, D, 16, [1, 40, 333, 17, 700, 64], torch.bfloat16, D)
    kv = kv.nan_to_num(0.0)      # a stage's cache starts zeroed; the torch path reads whole blocks
    args = (q.to(DEV), kv.to(DEV), 1, bt.clamp(min=0).to(torch.int32).to(DEV), cl.to(DEV),
            D ** -0.5, 700)
    a = paged_decode(*args, kernel=True).double()
    b = paged_decode(*args, kernel=False).double()
    assert (a - b).norm() / b.norm() < 2e-2


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"B{c[0]}H{c[1]}KV{c[2]}D{c[3]}bs{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("splits", [1, 3])
def test_fp8_cache(case, dtype, splits):
    """An fp8 cache with per-(layer, head) scales: the kernel converts in registers and
    applies the scales; the reference attends over the dequantized values."""
    B, H, KVH, D, bs, ctx = case
    _check(B, H, KVH, D, bs, [c * 4 for c in ctx], dtype, seed=7, splits=splits, fp8=True)


def _fp8_case(D, seed):
    q, kv, bt, cl, ks, vs = _case(6, 12, 3, D, 16, [1, 40, 333, 17, 700, 64], torch.bfloat16,
                                  seed)
    kv8, scale, _, _ = _fp8(kv.double() * 8, ks, vs, 1, seed)
    return (q.to(DEV), kv8.to(DEV), 1, bt.clamp(min=0).to(torch.int32).to(DEV), cl.to(DEV),
            D ** -0.5, 700), scale.to(DEV)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
def test_fp8_kernel_equals_torch_fp8_path_on_gpu(D):
    """The stage's two decode paths over an fp8 cache agree (bf16 queries, GQA); the start-up
    probe takes the kernel for fp8; a CUDA graph replays it with the scales read in place."""
    from pipemax.stages.attention import decode_path, paged_decode
    from pipemax.stages.kv_quant import FP8, KVQuant
    assert decode_path(12, 3, D, 16, torch.bfloat16, DEV, FP8) == (True, "triton kernel")
    args, scale = _fp8_case(D, D)
    quant = KVQuant(scale, 1 / scale)
    a = paged_decode(*args, kernel=True, quant=quant).double()
    b = paged_decode(*args, kernel=False, quant=quant).double()
    assert (a - b).norm() / b.norm() < 1e-2
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        paged_decode(*args, kernel=True, quant=quant)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode(*args, kernel=True, quant=quant)
    scale.mul_(2.0)                              # new scales, in place: the replay reads them
    graph.replay()
    torch.cuda.synchronize()
    want = paged_decode(*args, kernel=False, quant=quant).double()
    assert (out.double() - want).norm() / want.norm() < 1e-2
    assert (out.double() - a).norm() / a.norm() > 1e-3     # and they did change the result
