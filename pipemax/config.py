"""The run's configuration: one frozen, validated object, built from the command line.

Everything a run needs is here and passed explicitly; the model's own shape lives in
``ModelConfig`` (pipemax/model_config.py).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipemax import devices
from pipemax.model_config import (BUILTIN_MODELS, ModelConfig, ModelConfigError, apply_overrides,
                                  builtin_config)

DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = ("none", "fp8")


class ConfigError(ValueError):
    """A bad flag or model folder: one line for the user, exit code 2."""


@dataclass(frozen=True)
class RunConfig:
    gpus: int = 1
    device: str = "cpu"                 # "cuda" | "cpu"
    stage_devices: tuple[int, ...] | None = None   # CUDA device of each stage (None: 0..N-1)
    model: str | None = None            # folder, or a built-in name with load_format="dummy"
    load_format: str = "auto"           # "auto" | "dummy"
    dtype: str = "float32"              # resolved (never "auto")
    input: str | None = None
    output: str | None = None
    errors: str | None = None
    gpu_memory_gb: float | None = None
    kv_cache_gb: float | None = None
    block_size: int = 16
    max_num_seqs: int = 1024
    micro_batches: int | None = None    # None: stages + 1
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    seed: int = 0
    threads: int | None = None          # torch threads per stage (None: pipeline.stage_threads)
    overrides: tuple[str, ...] = ()
    quiet: bool = False
    stats_json: str | None = None       # write the run's figures here (for tools/bench.py)
    kv_offload: str = "auto"            # "auto" | "on" | "off"
    host_kv_gb: float | None = None     # host KV pool size (default: a safe share of the host)
    offload_overlap: bool = True        # False: the plain, non-overlapped reference schedule
    device_figures: tuple[tuple[str, float], ...] = ()   # planner figure overrides
    cuda_graphs: bool = False           # decode steps replayed from CUDA graphs
    prefix_caching: bool = True         # shared prompt prefixes computed once (GPU blocks)
    quantization: str = "none"          # "fp8": linear weights in e4m3, per-channel scales
    # operations (pipemax/control.py, progress.py, service.py)
    socket: str | None = None           # control socket; None: the default path
    no_socket: bool = False             # no control socket at all
    socket_group: str | None = None     # socket mode 0660, this group may connect
    serve: bool = False                 # service mode: jobs come through the socket
    progress: str = "auto"              # "auto" | "bar" | "log" | "off"
    progress_interval: float = 10.0     # seconds between progress log lines (not a tty)

    def __post_init__(self):
        if self.gpus < 1:
            raise ConfigError(f"--gpus must be at least 1, got {self.gpus}")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"--device must be cuda or cpu, got {self.device!r}")
        if self.stage_devices is not None:
            if self.device != "cuda":
                raise ConfigError("--stage-devices places stages on CUDA devices: it needs "
                                  "--device cuda")
            try:
                devices.resolve(self.gpus, self.stage_devices)
            except devices.DeviceListError as e:
                raise ConfigError(str(e)) from None
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"--load-format must be auto or dummy, got {self.load_format!r}")
        if self.dtype not in DTYPES[1:]:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.micro_batches is not None and not 1 <= self.micro_batches <= 512:
            raise ConfigError("--micro-batches must be between 1 and 512")
        for name in ("gpu_memory_gb", "kv_cache_gb"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.kv_offload not in ("auto", "on", "off"):
            raise ConfigError(f"--kv-offload must be auto, on or off, got {self.kv_offload!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got "
                              f"{self.quantization!r}")
        if self.host_kv_gb is not None and self.host_kv_gb <= 0:
            raise ConfigError("--host-kv-gb must be positive")
        for k, v in self.device_figures:
            if k not in ("hbm_gbs", "h2d_gbs", "tflops", "decode_tflops") or v <= 0:
                raise ConfigError(f"--device-figures: {k}={v} is not one of hbm_gbs, h2d_gbs, "
                                  "tflops, decode_tflops with a positive value")
        if (self.input is None) != (self.output is None):
            raise ConfigError("--input and --output go together")
        self._check_operations()

    def _check_operations(self) -> None:
        if self.no_socket and (self.socket is not None or self.socket_group is not None):
            raise ConfigError("--no-socket cannot go with --socket or --socket-group")
        if self.socket is not None and (not self.socket or "\0" in self.socket):
            raise ConfigError("--socket must be a path")
        if self.socket_group is not None:
            import grp
            try:
                grp.getgrnam(self.socket_group)
            except KeyError:
                raise ConfigError(f"--socket-group: no group {self.socket_group!r}") from None
        if self.serve:
            if self.input is not None or self.errors is not None:
                raise ConfigError("--serve takes its jobs through the control socket "
                                  "(python -m pipemax.ctl submit IN OUT): leave out --input, "
                                  "--output and --errors")
            if self.no_socket:
                raise ConfigError("--serve needs the control socket (leave out --no-socket)")
        if self.progress not in ("auto", "bar", "log", "off"):
            raise ConfigError(f"--progress must be auto, bar, log or off, got {self.progress!r}")
        if not self.progress_interval > 0:
            raise ConfigError("--progress-interval must be positive")

    @property
    def stage_device_ids(self) -> tuple[int, ...]:
        """The CUDA device id of every stage."""
        return devices.resolve(self.gpus, self.stage_devices)

    @property
    def num_micro_batches(self) -> int:
        return self.micro_batches or (self.gpus + 1)

    @property
    def max_seqs_per_mb(self) -> int:
        return max(1, -(-self.max_num_seqs // self.num_micro_batches))

    def model_config(self) -> ModelConfig:
        """The model's shape (from the folder or the built-in name), with overrides applied."""
        try:
            if self.model and self.load_format == "dummy" and self.model in BUILTIN_MODELS:
                cfg = builtin_config(self.model)
            elif self.model and Path(self.model).is_dir():
                cfg = ModelConfig.from_dir(self.model)
            elif self.load_format == "dummy":
                cfg = builtin_config(self.model)  # raises with the list of names
            elif self.model in BUILTIN_MODELS:
                raise ConfigError(f"{self.model!r} is a built-in shape without weights: "
                                  "add --load-format dummy, or give a model folder")
            else:
                raise ConfigError(f"model folder {self.model} does not exist")
            return apply_overrides(cfg, list(self.overrides))
        except ModelConfigError as e:
            raise ConfigError(str(e)) from None

    @property
    def model_folder(self) -> str | None:
        """Where weights and tokenizer come from (None for built-in shapes)."""
        if self.model and Path(self.model).is_dir():
            return self.model
        return None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage)
        self.exit(2, f"pipemax: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m pipemax.launch",
        description="Offline batch LLM inference: pipeline stages on shared-memory rings.")
    p.add_argument("--gpus", type=int, default=1, help="pipeline stages, one per GPU")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda if a GPU is present, else cpu")
    p.add_argument("--stage-devices", default=None, metavar="0,0,1,...",
                   help="CUDA device of each stage, one per stage (default 0..N-1); an id may "
                        "repeat, so several stages share a GPU and its memory")
    p.add_argument("--model", default=None,
                   help="HF model folder, or a built-in name with --load-format dummy "
                        f"({', '.join(sorted(BUILTIN_MODELS))}); default: the built-in tiny model")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bfloat16 on cuda (float16 if the checkpoint is), float32 on cpu")
    p.add_argument("--input", default=None, help="requests, OpenAI batch JSONL")
    p.add_argument("--output", default=None, help="results JSONL (appended)")
    p.add_argument("--errors", default=None, help="write error lines here instead of --output")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="most memory a stage may use on its device")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="cap on a stage's KV cache")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=1024,
                   help="most sequences in flight in all (the planner may choose fewer)")
    p.add_argument("--micro-batches", type=int, default=None, help="default: stages + 1")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per micro-batch step (prompts longer than this are chunked)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per stage (default: the cores shared among the stages; at most 4 per GPU stage)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change a model field, e.g. num_layers=4")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--stats-json", default=None, help="write the run's figures to this file")
    p.add_argument("--kv-offload", choices=("auto", "on", "off"), default="auto",
                   help="keep waiting micro-batches' KV in host memory (auto: when it wins)")
    p.add_argument("--host-kv-gb", type=float, default=None,
                   help="host KV pool, all stages together (default: half the free memory)")
    p.add_argument("--offload-overlap", choices=("on", "off"), default="on",
                   help="off: the plain schedule (copy, then compute), the reference")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="replay decode steps from CUDA graphs (auto: on CUDA; on the CPU 'on' "
                        "runs the same padded path eagerly, for tests)")
    p.add_argument("--prefix-caching", choices=("on", "off"), default="on",
                   help="share the KV blocks of common prompt prefixes, computed once")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help="fp8: linear weights in e4m3 with a scale per output channel, "
                        "activations quantized per token (CUDA: compute capability 8.9+); "
                        "default: as the checkpoint (fp8 if it ships fp8 weights, else none)")
    p.add_argument("--device-figures", default=None, metavar="hbm_gbs=X,h2d_gbs=Y,tflops=Z",
                   help="planner figures instead of the ones measured at start (tflops: the "
                        "GEMM rate of prompt chunks, decode_tflops: of decode steps)")
    ops = p.add_argument_group("operations")
    ops.add_argument("--socket", default=None, metavar="PATH",
                     help="control socket (python -m pipemax.ctl); default: "
                          "pipemax-<pid>.sock in $RUNTIME_DIRECTORY or $XDG_RUNTIME_DIR")
    ops.add_argument("--no-socket", action="store_true", help="no control socket")
    ops.add_argument("--socket-group", default=None, metavar="GROUP",
                     help="let this group use the socket (mode 0660; default 0600, owner only)")
    ops.add_argument("--serve", action="store_true",
                     help="service mode: keep the model loaded, take jobs through the socket")
    ops.add_argument("--progress", choices=("auto", "bar", "log", "off"), default="auto",
                     help="auto: a bar on a terminal, log lines otherwise")
    ops.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                     help="seconds between progress log lines")
    return p


def _figures(text: str | None) -> tuple[tuple[str, float], ...]:
    if not text:
        return ()
    out = []
    for item in text.split(","):
        k, _, v = item.partition("=")
        try:
            out.append((k.strip(), float(v)))
        except ValueError:
            raise ConfigError(f"--device-figures: {item!r} is not key=number") from None
    return tuple(out)


def resolve_device(requested: str | None) -> str:
    if requested:
        return requested
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def from_args(argv: list[str] | None = None) -> RunConfig:
    a = build_parser().parse_args(argv)
    device = resolve_device(a.device)
    try:
        stage_devices = (devices.parse_stage_devices(a.stage_devices)
                         if a.stage_devices is not None else None)
    except devices.DeviceListError as e:
        raise ConfigError(str(e)) from None
    dtype = a.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    cfg = RunConfig(gpus=a.gpus, device=device, stage_devices=stage_devices, model=a.model,
                    load_format=a.load_format,
                    dtype=dtype, input=a.input, output=a.output, errors=a.errors,
                    gpu_memory_gb=a.gpu_memory_gb, kv_cache_gb=a.kv_cache_gb,
                    block_size=a.block_size, max_num_seqs=a.max_num_seqs,
                    micro_batches=a.micro_batches,
                    max_num_batched_tokens=a.max_num_batched_tokens,
                    max_model_len=a.max_model_len, seed=a.seed, threads=a.threads,
                    overrides=tuple(a.override), quiet=a.quiet, stats_json=a.stats_json,
                    kv_offload=a.kv_offload, host_kv_gb=a.host_kv_gb,
                    offload_overlap=a.offload_overlap == "on",
                    device_figures=_figures(a.device_figures),
                    cuda_graphs=a.cuda_graphs == "on" or (a.cuda_graphs == "auto"
                                                          and device == "cuda"),
                    prefix_caching=a.prefix_caching == "on",
                    quantization=a.quantization or "none",
                    socket=a.socket, no_socket=a.no_socket, socket_group=a.socket_group,
                    serve=a.serve, progress=a.progress, progress_interval=a.progress_interval)
    if a.dtype == "auto" and device == "cuda" and cfg.model_folder:
        if cfg.model_config().torch_dtype == "float16":
            cfg = RunConfig(**{**cfg.__dict__, "dtype": "float16"})
    if a.quantization is None and cfg.model_folder and cfg.model_config().quantization:
        cfg = RunConfig(**{**cfg.__dict__, "quantization": cfg.model_config().quantization})
    return cfg
