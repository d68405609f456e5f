"""Where a decoder layer's GEMM time goes, bf16 against fp8 weights (one CUDA GPU with fp8).

    python -m tools.fp8_gemm_bench --model llama3-8b --tokens 256,2048

For each token count, one layer's four GEMMs (q/k/v, o, gate/up, down) one after another, as a
step runs them, each variant timed eagerly and replayed from a CUDA graph (as decode steps
run): TFLOP/s and microseconds per layer.

    bf16          nn.Linear (cuBLAS)
    fp8-torch     Fp8Linear with the activation quantization in torch ops (pad, abs, amax,
                  div, clamp, cast: the code before the fused kernel)
    fp8           Fp8Linear as it runs (the Triton quantization kernel, then _scaled_mm)
    quant-torch   the activation quantization alone, torch ops
    quant-triton  the activation quantization alone, the Triton kernel
    mm-rowwise    torch._scaled_mm alone, rowwise scales (inputs quantized beforehand)
    mm-tensor     torch._scaled_mm alone, one scale per tensor
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pipemax.model_config import BUILTIN_MODELS
from pipemax.stages import fp8, triton_fp8
from pipemax.stages.measure import _graphed, _time, gemm_flops
from pipemax.stages.model import DecoderLayer


def variants(cfg, tokens: int, dev):
    dt = torch.bfloat16
    with torch.device(dev):
        plain = DecoderLayer(cfg, dt).linears()
        quant = DecoderLayer(cfg, dt, "fp8").linears()
    for m in plain:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
    for m, p in zip(quant, plain):
        m.set_weight(p.weight)
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(tokens, m.in_features, generator=gen, device=dev, dtype=dt) for m in plain]
    pre = [fp8.quantize_padded(x, m.weight.shape[1]) for m, x in zip(quant, xs)]
    one = torch.ones((), dtype=torch.float32, device=dev)

    def torch_quant(x, Kp):
        M, K = x.shape
        Mp = -(-M // 16) * 16
        if Mp != M or Kp != K:
            x = F.pad(x, (0, Kp - K, 0, Mp - M))
        return fp8.quantize_rows(x)

    def fp8_torch():
        saved = triton_fp8.available
        triton_fp8.available = lambda x: False
        try:
            for m, x in zip(quant, xs):
                m(x)
        finally:
            triton_fp8.available = saved

    yield "bf16", lambda: [m(x) for m, x in zip(plain, xs)]
    yield "fp8-torch", fp8_torch
    yield "fp8", lambda: [m(x) for m, x in zip(quant, xs)]
    yield "quant-torch", lambda: [torch_quant(x, m.weight.shape[1]) for m, x in zip(quant, xs)]
    if triton_fp8.available(xs[0]):
        yield "quant-triton", lambda: [triton_fp8.quantize_rows_padded(
            x, m.weight.shape[1], -(-tokens // 16) * 16, fp8._TINY) for m, x in zip(quant, xs)]
    yield "mm-rowwise", lambda: [torch._scaled_mm(q, m.weight.t(), scale_a=s,
                                                  scale_b=m.weight_scale.view(1, -1),
                                                  out_dtype=dt)
                                 for m, (q, s) in zip(quant, pre)]
    yield "mm-tensor", lambda: [torch._scaled_mm(q, m.weight.t(), scale_a=one, scale_b=one,
                                                 out_dtype=dt) for m, (q, s) in zip(quant, pre)]
    yield "_flops", gemm_flops(plain, tokens)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b", choices=sorted(BUILTIN_MODELS))
    ap.add_argument("--tokens", default="256,2048")
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = BUILTIN_MODELS[a.model]
    print(f"fp8_gemm_bench {a.model} on {torch.cuda.get_device_name(dev)}, torch "
          f"{torch.__version__}: one layer's 4 GEMMs, us per layer (TFLOP/s of the GEMM "
          f"FLOPs)")
    for tokens in (int(t) for t in a.tokens.split(",")):
        found = list(variants(cfg, tokens, dev))
        flops = dict(found)["_flops"]
        base = {}
        for name, fn in found:
            if name == "_flops":
                continue
            with torch.inference_mode():
                eager = _time(fn, a.iters, dev)
                graph = _time(_graphed(fn, dev), a.iters, dev)
            base[name] = graph
            print(f"  M={tokens:5d} {name:13s} eager {eager * 1e6:8.1f} us "
                  f"{flops / eager / 1e12:6.0f} TFLOP/s | graph {graph * 1e6:8.1f} us "
                  f"{flops / graph / 1e12:6.0f} TFLOP/s")
        print(f"  M={tokens:5d} graphed fp8 over bf16 time: {base['fp8'] / base['bf16']:.2f} "
              f"(fp8-torch {base['fp8-torch'] / base['bf16']:.2f})")
        del found
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
