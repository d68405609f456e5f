"""The ``pipemax`` console script. ``pipemax run-batch`` takes vLLM ``run-batch``'s own flags
where they apply, so a vLLM batch command works with one word changed:

    vllm run-batch -i IN.jsonl -o OUT.jsonl --model DIR --pipeline-parallel-size 2
    pipemax run-batch -i IN.jsonl -o OUT.jsonl --model DIR --pipeline-parallel-size 2

It becomes a ``python -m pipemax.launch`` command (pipemax/launch.py), whose flags it also takes
(``--gpus``, ``--device``, ``--kv-offload``, ...). vLLM flags with no pipemax counterpart are
refused with one line saying what to use instead (exit 2); a few that change nothing here
(``--trust-remote-code``, ``--disable-log-stats``, ``--disable-log-requests``) are accepted.
"""
from __future__ import annotations

import argparse
import sys

from pipemax.config import ConfigError

# vLLM dtype names -> pipemax's
DTYPES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16",
          "float": "float32", "float32": "float32"}
LOAD_FORMATS = {"auto": "auto", "safetensors": "auto", "dummy": "dummy"}
IGNORED = ("--trust-remote-code", "--disable-log-stats", "--disable-log-requests")
# vLLM KV cache dtypes -> pipemax's (fp8 is e4m3 here, as in vLLM)
KV_CACHE_DTYPES = {"auto": "auto", "fp8": "fp8", "fp8_e4m3": "fp8"}
# vLLM flags pipemax does not have: what to use instead
REFUSED = {
    "--tokenizer": "the tokenizer is read from the model folder (tokenizer.json)",
    "--data-parallel-size": "run one pipemax per node, or many through Ray Data: "
                            "python -m pipemax.ray_batch --replicas K",
    "--distributed-executor-backend": "stages are local processes; across nodes use "
                                      "python -m pipemax.ray_batch",
    "--cpu-offload-gb": "pipemax offloads the KV cache, not weights: --kv-offload on "
                        "--host-kv-gb G",
    "--swap-space": "the host KV pool is --host-kv-gb",
    "--enable-lora": "LoRA adapters are not supported",
    "--lora-modules": "LoRA adapters are not supported",
    "--served-model-name": "results name the model folder, or each request's own model field",
    "--speculative-config": "speculative decoding is not supported",
    "--url": "metrics come from the control socket: python -m pipemax.ctl metrics",
    "--port": "metrics come from the control socket: python -m pipemax.ctl metrics",
    "--enable-metrics": "metrics come from the control socket: python -m pipemax.ctl metrics",
}


class Refused(ConfigError):
    pass


def _vllm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipemax run-batch", add_help=False, allow_abbrev=False)
    p.add_argument("-i", "--input-file", dest="input")
    p.add_argument("-o", "--output-file", dest="output")
    p.add_argument("--dtype")
    p.add_argument("--load-format")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, dest="pp")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, dest="tp")
    p.add_argument("--gpu-memory-utilization", type=float, dest="util")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--kv-cache-dtype", dest="kv_cache_dtype")
    p.add_argument("--calculate-kv-scales", action="store_true")
    p.add_argument("--quantization", "-q")
    for flag in IGNORED:
        p.add_argument(flag, action="store_true")
    return p


def _refuse_unsupported(argv: list[str]) -> None:
    for a in argv:
        flag = a.split("=", 1)[0]
        if flag in REFUSED:
            raise Refused(f"{flag} is a vLLM flag pipemax does not have: {REFUSED[flag]}")


def _memory_gb(util: float, argv: list[str]) -> float | None:
    """--gpu-memory-utilization as a share of each card: --gpu-memory-gb of the smallest."""
    if not 0 < util <= 1:
        raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {util}")
    from pipemax.config import resolve_device
    device = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--device"), None)
    if resolve_device(device) != "cuda":
        return None                      # a CPU stage has no card to share
    import torch
    n = torch.cuda.device_count()
    if n == 0:
        return None
    return util * min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / 2**30


def translate(argv: list[str]) -> list[str]:
    """``pipemax run-batch`` arguments -> ``python -m pipemax.launch`` arguments. Raises
    ConfigError (one line) for a vLLM flag pipemax does not have."""
    _refuse_unsupported(argv)
    a, rest = _vllm_parser().parse_known_args(argv)
    out = []
    if a.tp is not None and a.tp != 1:
        raise Refused(f"--tensor-parallel-size {a.tp}: pipemax has no tensor parallelism; "
                      f"split the model into pipeline stages instead: "
                      f"--pipeline-parallel-size {a.tp}")
    if a.pp is not None:
        out += ["--gpus", str(a.pp)]
    if a.input is not None:
        out += ["--input", a.input]
    if a.output is not None:
        out += ["--output", a.output]
    if a.dtype is not None:
        if a.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {a.dtype!r}")
        out += ["--dtype", DTYPES[a.dtype]]
    if a.load_format is not None:
        if a.load_format not in LOAD_FORMATS:
            raise Refused(f"--load-format {a.load_format}: pipemax reads safetensors "
                          "(auto) or makes random weights (dummy)")
        out += ["--load-format", LOAD_FORMATS[a.load_format]]
    if a.kv_cache_dtype is not None:
        if a.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise Refused(f"--kv-cache-dtype {a.kv_cache_dtype}: pipemax keeps the KV cache in "
                          "the model's dtype (auto) or in fp8 e4m3 (fp8, fp8_e4m3)")
        out += ["--kv-cache-dtype", KV_CACHE_DTYPES[a.kv_cache_dtype]]
    if a.calculate_kv_scales:            # vLLM: scales from the first forward pass
        out += ["--kv-scales", "prompt"]
    if a.quantization is not None:
        q = a.quantization.lower()
        if q not in ("fp8", "none"):
            raise Refused(f"--quantization {a.quantization}: pipemax quantizes to fp8 only "
                          "(--quantization fp8: e4m3 weights, a scale per output channel); "
                          "otherwise choose the precision with --dtype")
        out += ["--quantization", q]
    if a.enforce_eager:
        out += ["--cuda-graphs", "off"]
    if a.util is not None:
        gb = _memory_gb(a.util, rest)
        if gb is not None:
            out += ["--gpu-memory-gb", f"{gb:.3f}"]
    return out + rest


USAGE = ("usage: pipemax run-batch -i IN.jsonl -o OUT.jsonl [--model DIR] "
         "[vLLM run-batch flags] [python -m pipemax.launch flags]")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\ncommands:\n  run-batch   run a batch file (vLLM run-batch's flags; "
              "see python -m pipemax.launch --help for the rest)")
        return 0 if argv else 2
    cmd, args = argv[0], argv[1:]
    if cmd != "run-batch":
        print(f"pipemax: error: unknown command {cmd!r} (the command is run-batch)",
              file=sys.stderr)
        return 2
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        from pipemax.config import build_parser
        build_parser().print_help()
        return 0
    try:
        launch_args = translate(args)
    except ConfigError as e:
        print(f"pipemax: error: {e}", file=sys.stderr)
        return 2
    from pipemax import launch
    return launch.main(launch_args)


if __name__ == "__main__":
    sys.exit(main())
