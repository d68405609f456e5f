"""The run's configuration: one frozen, validated object, built from the command line.

Everything a run needs is here and passed explicitly; the model's own shape lives in
``ModelConfig`` (pipemax/model_config.py). Each field is declared once, with its flag of
``python -m pipemax.launch`` (``flag``: help, choices, type, and the conversion from the parsed
flag); ``build_parser`` and ``from_args`` are generated from those declarations, and
``RunConfig.__post_init__`` checks the values however they were given.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from pipemax import devices
from pipemax.model_config import (BUILTIN_MODELS, ModelConfig, ModelConfigError, apply_overrides,
                                  builtin_config)

DTYPES = ("auto", "bfloat16", "float16", "float32")
KV_OFFLOAD = ("auto", "on", "off", "swap")
KV_CACHE_DTYPES = ("auto", "fp8")          # auto: the model's --dtype; fp8: e4m3 with scales
KV_SCALES = ("auto", "checkpoint", "prompt", "one")   # see stages/kv_quant.py
QUANTIZATIONS = ("none", "fp8")
OFFLOAD_POLICIES = ("first-come", "selection")
SCHEDULING_POLICIES = ("longest", "fcfs")


class ConfigError(ValueError):
    """A bad flag or model folder: one line for the user, exit code 2."""


@dataclass(frozen=True)
class Flag:
    """How a RunConfig field is given on the command line: ``argparse`` keywords (help,
    type, choices, metavar, action; ``default``: the flag's own, when it differs from the
    field's), its option name when not the field's, its help group, and ``convert(value,
    device)`` from the parsed flag to the field's value (``device``: the resolved one)."""
    argparse: dict
    name: str | None = None
    group: str | None = None
    convert: Callable[[Any, str], Any] | None = None

    def option(self, field_name: str) -> str:
        return self.name or "--" + field_name.replace("_", "-")

    def dest(self, field_name: str) -> str:
        """The attribute argparse parses the flag into."""
        return self.option(field_name)[2:].replace("-", "_")


def flag(value=None, help=None, *, name=None, group=None, convert=None, **argparse_kw):
    """A RunConfig field (default ``value``) that is one flag of ``python -m pipemax.launch``."""
    kw = {"help": help, **argparse_kw} if help is not None else dict(argparse_kw)
    if "action" not in kw:
        kw.setdefault("default", value)
    return field(default=value,
                 metadata={"flag": Flag(kw, name=name, group=group, convert=convert)})


def _on(value: str, device: str) -> bool:
    return value == "on"


def _stage_devices(text: str | None, device: str) -> tuple[int, ...] | None:
    try:
        return devices.parse_stage_devices(text) if text is not None else None
    except devices.DeviceListError as e:
        raise ConfigError(str(e)) from None


def _figures(text: str | None, device: str) -> tuple[tuple[str, float], ...]:
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


@dataclass(frozen=True)
class RunConfig:
    gpus: int = flag(1, "pipeline stages, one per GPU", type=int)
    device: str = flag("cpu", "cuda if a GPU is present, else cpu",   # "cuda" | "cpu"
                       choices=("cuda", "cpu"), default=None, convert=lambda v, device: device)
    # CUDA device of each stage (None: 0..N-1)
    stage_devices: tuple[int, ...] | None = flag(
        None, "CUDA device of each stage, one per stage (default 0..N-1); an id may repeat, so "
              "several stages share a GPU and its memory", metavar="0,0,1,...",
        convert=_stage_devices)
    # folder, or a built-in name with load_format="dummy"
    model: str | None = flag(None, "HF model folder, or a built-in name with --load-format dummy "
                                   f"({', '.join(sorted(BUILTIN_MODELS))}); default: the "
                                   "built-in tiny model")
    load_format: str = flag("auto", choices=("auto", "dummy"))
    dtype: str = flag(                  # resolved (never "auto")
        "float32", "auto: bfloat16 on cuda (float16 if the checkpoint is), float32 on cpu",
        choices=DTYPES, default="auto",
        convert=lambda v, device: ("bfloat16" if device == "cuda" else "float32")
        if v == "auto" else v)
    input: str | None = flag(None, "requests, OpenAI batch JSONL")
    output: str | None = flag(None, "results JSONL (appended)")
    errors: str | None = flag(None, "write error lines here instead of --output")
    gpu_memory_gb: float | None = flag(None, "most memory a stage may use on its device",
                                       type=float)
    kv_cache_gb: float | None = flag(None, "cap on a stage's KV cache", type=float)
    block_size: int = flag(16, type=int)
    max_num_seqs: int = flag(1024, "most sequences in flight in all (the planner may choose "
                                   "fewer)", type=int)
    micro_batches: int | None = flag(None, "default: stages + 1", type=int)
    # None: 2048 on one stage; over several, 512 (pipemax/planner.py pipeline_step_tokens)
    max_num_batched_tokens: int | None = flag(
        None, "tokens per micro-batch step, at most (prompts longer than this are chunked; "
              "default: 2048 on one stage; over several, 512, and each step's tokens are kept "
              "near where the GPU turns compute-bound, so that no micro-batch's step holds "
              "up the pipeline)", type=int)
    max_model_len: int | None = flag(None, type=int)
    seed: int = flag(0, type=int)
    # torch threads per stage (None: pipeline.stage_threads)
    threads: int | None = flag(None, "torch threads per stage (default: the cores shared among "
                                     "the stages; at most 4 per GPU stage)", type=int)
    overrides: tuple[str, ...] = flag((), "change a model field, e.g. num_layers=4",
                                      name="--override", action="append", default=[],
                                      metavar="KEY=VALUE", convert=lambda v, device: tuple(v))
    quiet: bool = flag(False, action="store_true")
    # write the run's figures here (for tools/bench.py)
    stats_json: str | None = flag(None, "write the run's figures to this file")
    kv_offload: str = flag("auto", "keep waiting micro-batches' KV in host memory (auto: when "
                                   "it wins); swap: offload off, but preempted sequences "
                                   "wait in host memory instead of being recomputed (auto "
                                   "when memory bounds the batch)",
                           choices=KV_OFFLOAD)
    # the order waiting requests are admitted in (pipemax/lookahead.py)
    scheduling_policy: str = flag("longest", "longest: the requests with the most tokens to "
                                             "sample first, from many read ahead (the batch's "
                                             "end drains faster); fcfs: the input's order",
                                  choices=SCHEDULING_POLICIES)
    # which running sequences keep their KV in the host pool (pipemax/selection.py)
    offload_policy: str = flag("selection", "with KV offload: selection (the paper's: the "
                                            "cheapest within the prefetch budget, re-chosen as "
                                            "contexts grow, micro-batches balanced) or "
                                            "first-come (a sequence goes to the host when the "
                                            "GPU cannot hold it)",
                               choices=OFFLOAD_POLICIES)
    # host KV pool size (default: a safe share of the host)
    host_kv_gb: float | None = flag(None, "host KV pool, all stages together (default: half "
                                          "the free memory)", type=float)
    # False: the plain, non-overlapped reference schedule
    offload_overlap: bool = flag(True, "off: the plain schedule (copy, then compute), the "
                                       "reference", choices=("on", "off"), default="on",
                                 convert=_on)
    # the driver sends each step's copies to stages 1.. as it sends the step (ipc/protocol.py)
    prefetch_plans: bool = flag(True, "with KV offload over 2+ stages: every stage learns a "
                                      "step's copies when the driver sends the step, and "
                                      "prefetches them while its previous step computes "
                                      "(off: only once the step's activations arrive)",
                                choices=("on", "off"), default="on", convert=_on)
    # decode steps replayed from CUDA graphs
    cuda_graphs: bool = flag(False, "replay decode steps from CUDA graphs (auto: on CUDA; on "
                                    "the CPU 'on' runs the same padded path eagerly, for tests)",
                             choices=("auto", "on", "off"), default="auto",
                             convert=lambda v, device: v == "on" or (v == "auto"
                                                                     and device == "cuda"))
    # shared prompt prefixes computed once (GPU blocks)
    prefix_caching: bool = flag(True, "share the KV blocks of common prompt prefixes, computed "
                                      "once", choices=("on", "off"), default="on", convert=_on)
    # the host pool as the prefix cache's second tier (with KV offload on)
    prefix_cache_host: bool = flag(False, "with KV offload on, keep cached blocks evicted from "
                                          "the GPU in the host pool and copy them back instead "
                                          "of recomputing them (off by default: it has not "
                                          "paid in a measured case yet)", choices=("on", "off"),
                                   default="off", convert=_on)
    kv_cache_dtype: str = flag(         # "auto" (the model's dtype) | "fp8" (e4m3)
        "auto", "auto: the model's --dtype; fp8: e4m3 with a scale per layer and KV head, half "
                "the bytes on the GPU, in the host pool and over PCIe (CUDA: compute "
                "capability 8.9 or later)", choices=KV_CACHE_DTYPES)
    kv_scales: str = flag(              # fp8 scales: see stages/kv_quant.py
        "auto", "fp8 KV scales: checkpoint (its k_scale/v_scale tensors), prompt (fixed from "
                "the first step each stage computes), one (1.0); auto: checkpoint when it "
                "ships them, else prompt", choices=KV_SCALES)
    quantization: str = flag(           # "fp8": linear weights in e4m3, per-channel scales
        "none", "fp8: linear weights in e4m3 with a scale per output channel, activations "
                "quantized per token (CUDA: compute capability 8.9+); default: as the checkpoint "
                "(fp8 if it ships fp8 weights, else none)", choices=QUANTIZATIONS, default=None,
        convert=lambda v, device: v or "none")
    # planner figure overrides
    device_figures: tuple[tuple[str, float], ...] = flag(
        (), "planner figures instead of the ones measured at start (tflops: the GEMM rate of "
            "prompt chunks, decode_tflops: of decode steps)",
        metavar="hbm_gbs=X,h2d_gbs=Y,tflops=Z", default=None, convert=_figures)
    # operations (pipemax/ops/: control socket, progress, service)
    socket: str | None = flag(          # control socket; None: the default path
        None, "control socket (python -m pipemax.ctl); default: pipemax-<pid>.sock in "
              "$RUNTIME_DIRECTORY or $XDG_RUNTIME_DIR", metavar="PATH", group="operations")
    no_socket: bool = flag(False, "no control socket", action="store_true", group="operations")
    # socket mode 0660, this group may connect
    socket_group: str | None = flag(None, "let this group use the socket (mode 0660; default "
                                          "0600, owner only)", metavar="GROUP",
                                    group="operations")
    # service mode: jobs come through the socket
    serve: bool = flag(False, "service mode: keep the model loaded, take jobs through the "
                              "socket", action="store_true", group="operations")
    progress: str = flag("auto", "auto: a bar on a terminal, log lines otherwise",
                         choices=("auto", "bar", "log", "off"), group="operations")
    # seconds between progress log lines (not a tty)
    progress_interval: float = flag(10.0, "seconds between progress log lines", type=float,
                                    metavar="SECONDS", group="operations")

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
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.micro_batches is not None and not 1 <= self.micro_batches <= 512:
            raise ConfigError("--micro-batches must be between 1 and 512")
        for name in ("gpu_memory_gb", "kv_cache_gb"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.kv_offload not in KV_OFFLOAD:
            raise ConfigError(f"--kv-offload must be auto, on, off or swap, got "
                              f"{self.kv_offload!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"--scheduling-policy must be longest or fcfs, got "
                              f"{self.scheduling_policy!r}")
        if self.offload_policy not in OFFLOAD_POLICIES:
            raise ConfigError(f"--offload-policy must be first-come or selection, got "
                              f"{self.offload_policy!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.kv_scales not in KV_SCALES:
            raise ConfigError(f"--kv-scales must be one of {', '.join(KV_SCALES)}, got "
                              f"{self.kv_scales!r}")
        if self.kv_scales != "auto" and self.kv_cache_dtype != "fp8":
            raise ConfigError(f"--kv-scales {self.kv_scales} scales an fp8 KV cache: it needs "
                              "--kv-cache-dtype fp8")
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
    def kv_dtype_name(self) -> str:
        """The KV cache's element type, for the plan line and the summary."""
        return "fp8 (e4m3)" if self.kv_cache_dtype == "fp8" else self.dtype

    @property
    def kv_esize(self) -> int:
        """Bytes of one K or V element in the cache (and the host pool, and over PCIe)."""
        return 1 if self.kv_cache_dtype == "fp8" else 4 if self.dtype == "float32" else 2

    @property
    def step_tokens(self) -> int:
        """The most tokens one step computes (``--max-num-batched-tokens``, or its default):
        what each stage's workspace and the rings are sized for."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 2048 if self.gpus == 1 else 512

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
    """The flags of ``python -m pipemax.launch``, one per RunConfig field (``Flag``)."""
    p = _Parser(
        prog="python -m pipemax.launch",
        description="Offline batch LLM inference: pipeline stages on shared-memory rings.")
    groups: dict[str | None, Any] = {None: p}
    for f in fields(RunConfig):
        spec: Flag = f.metadata["flag"]
        if spec.group not in groups:
            groups[spec.group] = p.add_argument_group(spec.group)
        groups[spec.group].add_argument(spec.option(f.name), **spec.argparse)
    return p


def resolve_device(requested: str | None) -> str:
    if requested:
        return requested
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def from_args(argv: list[str] | None = None) -> RunConfig:
    a = build_parser().parse_args(argv)
    device = resolve_device(a.device)
    values = {}
    for f in fields(RunConfig):
        spec: Flag = f.metadata["flag"]
        v = getattr(a, spec.dest(f.name))
        values[f.name] = spec.convert(v, device) if spec.convert else v
    cfg = RunConfig(**values)
    if a.dtype == "auto" and device == "cuda" and cfg.model_folder:
        if cfg.model_config().torch_dtype == "float16":
            cfg = RunConfig(**{**cfg.__dict__, "dtype": "float16"})
    if a.quantization is None and cfg.model_folder and cfg.model_config().quantization:
        cfg = RunConfig(**{**cfg.__dict__, "quantization": cfg.model_config().quantization})
    return cfg
