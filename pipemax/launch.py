"""``python -m pipemax.launch``: check the inputs, start the stages, run the batch, clean up.

Everything that can be wrong with the flags, the model folder or the input file is found
before any process starts, and reported in one line with exit code 2. Every exit path
(normal, error, Ctrl-C, SIGTERM, a stage killed) runs ``Pipeline.close()``, which removes
every shared-memory object of the run, and removes the control socket; finished results are
already on disk, line by line, and a run started again with the same --output skips them
(pipemax/resume.py). The first SIGTERM drains (exit 0); a second one, or Ctrl-C, stops at once
(exit 130). Control commands, progress and systemd notifications: pipemax/ops/supervisor.py;
what a finished run reports: pipemax/report.py.

``run`` builds the run (the runtime, its operations and its input), executes it, and leaves
the cleanup of every exit path to one ``ExitStack``.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from pipemax.config import ConfigError, RunConfig, from_args
from pipemax import devices
from pipemax.job import Job, JobError, JobFailed
from pipemax.kv_pool import HostMemoryError
from pipemax.model_config import ModelConfig
from pipemax.ops import supervisor
from pipemax.ops.server import ControlError
from pipemax.ops.service import serve
from pipemax.pipeline import StageFailed
from pipemax.planner import PlanError
from pipemax.report import report, service_line
from pipemax.requests import Request, RequestError
from pipemax.runtime import Runtime
from pipemax.tiny import DEFAULT_PROMPTS, ensure_tiny_model
from pipemax.tokenizer import Tokenizer, TokenizerError
from pipemax.stages.fp8 import capability_refusal
from pipemax.stages.kv_quant import fp8_unsupported
from pipemax.stages.loader import CheckpointError, check_checkpoint, kv_scale_mode


class Terminated(BaseException):
    """A second SIGTERM, or SIGINT: unwind so that every ``finally`` runs."""


class Interrupts:
    """SIGTERM / SIGINT handler. The first SIGTERM only sets ``drain_requested`` (the engine
    loop then takes nothing new, finishes what is running and exits 0; see
    pipemax/ops/supervisor.py). SIGTERMs within ``REPEAT_WINDOW_S`` of the first count as that
    one (``timeout``, a container stop or a batch scheduler signal both the launcher and its
    process group; the stage processes ignore both signals and leave shutdown to the driver).
    A later SIGTERM, or any SIGINT, raises ``Terminated``; since a C call may swallow that
    exception (a semaphore wait returns EINTR), the signal is also remembered and ``check()``
    (called from every ring wait slice) raises it again. Later signals are ignored so that
    nothing interrupts the cleanup, which is bounded in time."""

    REPEAT_WINDOW_S = 0.1

    def __init__(self):
        self.signum = None
        self.drain_requested = False
        self.drain_at = 0.0      # time.monotonic() of the first SIGTERM
        self.handled = False     # set once the launcher has caught Terminated
        self.prev = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            self.prev[s] = signal.signal(s, self._handle)

    def uninstall(self) -> None:
        for s, h in self.prev.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if signum == signal.SIGTERM and self.signum is None:
            now = time.monotonic()
            if not self.drain_requested:
                self.drain_requested, self.drain_at = True, now
                return
            if now - self.drain_at < self.REPEAT_WINDOW_S:
                return           # the same stop, delivered twice
        if self.signum is None:
            self.signum = signum
            self.check()

    def check(self) -> bool:
        if self.signum is not None and not self.handled:
            raise Terminated()
        return True


def err(msg: str) -> None:
    print(f"pipemax: error: {msg}", file=sys.stderr, flush=True)


def info(cfg: RunConfig, msg: str) -> None:
    if not cfg.quiet:
        print(f"pipemax: {msg}", file=sys.stderr, flush=True)


def prepare(cfg: RunConfig) -> tuple[RunConfig, ModelConfig, Tokenizer | None, int]:
    """All checks that need no stage process. Raises ConfigError with one line."""
    if cfg.model is None:
        cfg = RunConfig(**{**cfg.__dict__, "model": str(ensure_tiny_model())})
    model = cfg.model_config()
    tokenizer = None
    if cfg.model_folder:
        try:
            if cfg.load_format == "auto":
                check_checkpoint(Path(cfg.model_folder), model)
            tokenizer = Tokenizer.from_dir(cfg.model_folder)
        except (CheckpointError, TokenizerError) as e:
            raise ConfigError(str(e)) from None
    if cfg.gpus > model.num_layers:
        raise ConfigError(f"--gpus {cfg.gpus} is more stages than the model's "
                          f"{model.num_layers} layers")
    if cfg.device == "cuda":
        check_cuda_devices(cfg)
    if cfg.kv_cache_dtype == "fp8":
        try:
            folder = cfg.model_folder if cfg.load_format == "auto" else None
            cfg = RunConfig(**{**cfg.__dict__, "kv_scales": kv_scale_mode(
                Path(folder) if folder else None, model, cfg.kv_scales)})
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
    max_len = model.max_position_embeddings
    if cfg.max_model_len:
        if cfg.max_model_len > max_len:
            raise ConfigError(f"--max-model-len {cfg.max_model_len} exceeds the model's "
                              f"{max_len} positions")
        max_len = cfg.max_model_len
    if cfg.input is not None:
        try:
            with open(cfg.input, "rb") as f:
                f.read(1)
        except OSError as e:
            raise ConfigError(f"cannot read input file {cfg.input}: {e.strerror}") from None
        out_dir = Path(cfg.output).resolve().parent
        if not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
            raise ConfigError(f"cannot write output file {cfg.output}: folder {out_dir} "
                              "is missing or not writable")
    return cfg, model, tokenizer, max_len


def check_cuda_devices(cfg: RunConfig) -> None:
    """The stages' devices are present, the memory caps of stages sharing one fit it, and
    they have fp8 tensor cores if the weights are fp8."""
    import torch
    n = torch.cuda.device_count()
    if cfg.stage_devices is None and cfg.gpus > n:
        raise ConfigError(f"--gpus {cfg.gpus} but only {n} CUDA device(s) are present "
                          "(--stage-devices puts several stages on one)")
    try:
        devices.check_present(cfg.stage_device_ids, n)
        devices.check_caps(cfg.stage_device_ids, cfg.gpu_memory_gb, {
            d: torch.cuda.get_device_properties(d).total_memory for d in set(cfg.stage_device_ids)})
    except devices.DeviceListError as e:
        raise ConfigError(str(e)) from None
    if cfg.kv_cache_dtype == "fp8":
        for d in sorted(set(cfg.stage_device_ids)):
            why = fp8_unsupported(d, torch.cuda.get_device_capability(d),
                                  torch.cuda.get_device_name(d))
            if why:
                raise ConfigError(why)
    if cfg.quantization == "fp8":
        for d in sorted(set(cfg.stage_device_ids)):
            why = capability_refusal(f"cuda:{d} ({torch.cuda.get_device_name(d)})",
                                     torch.cuda.get_device_capability(d))
            if why:
                raise ConfigError(why)


class PrintWriter:
    """The built-in default run: show each completion on the terminal."""

    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def write(self, line: dict) -> None:
        i = int(line["custom_id"].split("-")[-1]) - 1
        if line["error"]:
            print(f"[{i}] error: {line['error']['message']}")
            return
        text = line["response"]["body"]["choices"][0]["text"]
        print(f"[{i}] {self.prompts[i]!r} -> {text!r}")

    def close(self) -> None:
        pass


def default_lines(prompts: list[str]):
    for i, p in enumerate(prompts):
        body = {"prompt": p, "max_tokens": 24, "temperature": 0}
        yield i, json.dumps({"custom_id": f"request-{i + 1}", **body}).encode()


class Input(NamedTuple):
    """What a run serves: its job (None: the built-in prompts, or --serve), where its lines
    go, its requests (parsed) and the lines the KV plan is estimated from."""
    job: Job | None
    writer: Job | PrintWriter | None
    requests: Iterator[Request | RequestError]
    sample: Iterable[tuple[int, bytes]]


def open_input(cfg: RunConfig, rt: Runtime, log) -> Input:
    """The run's input; with --input its job opened (resume: what an earlier run answered is
    skipped). Raises JobError."""
    if cfg.input is not None:
        job = Job(cfg.input, cfg.output, cfg.errors, parser=rt.parser(), log=log)
        job.open()
        return Input(job, job, job.requests(), job.sample())
    sample = default_lines(DEFAULT_PROMPTS)
    if cfg.serve:                             # jobs come through the control socket
        return Input(None, None, iter(()), sample)
    return Input(None, PrintWriter(DEFAULT_PROMPTS),
                 rt.parser().parse_all(default_lines(DEFAULT_PROMPTS)), sample)


def execute(cfg: RunConfig, rt: Runtime, sup: supervisor.Supervisor, inp: Input, log) -> None:
    """Start the stages, plan, and serve the input (or the jobs of --serve); then report."""
    sup.start()
    rt.start()
    engine = rt.plan(inp.sample, hooks=sup, engine_log=None if cfg.quiet else log)
    engine.start_job(inp.requests, inp.writer.write if inp.writer is not None
                     else (lambda line: None))
    sup.loaded(engine)                        # READY=1
    if sup.service is not None:
        log(service_line(serve(engine, sup, sup.service), sup.totals))
        return
    sup.begin_job(inp.job)
    stats = engine.run()
    sup.end_job()
    report(rt, stats, rt.stop(), log=log, summary=lambda line: print(
        f"pipemax: {line}", file=sys.stderr if cfg.input is None else sys.stdout, flush=True))
    job = inp.job
    if sup.outcome != "done" and (job is None or job.done < job.total):
        log(f"{sup.outcome}: stopped before the end of the input; run again with the same "
            "--output to serve the rest")


def run(cfg: RunConfig, model: ModelConfig, tokenizer, max_len: int,
        interrupts: Interrupts) -> int:
    log = lambda m: info(cfg, m)
    rt = Runtime(cfg, model, tokenizer, max_len, check=interrupts.check, log=log)
    try:   # control socket, progress, systemd, --serve job queue (pipemax/ops/)
        sup = supervisor.build(cfg, interrupts, log, rt.parser)
        inp = open_input(cfg, rt, sup.log)
    except (ControlError, JobError) as e:
        err(str(e))
        return 2
    with contextlib.ExitStack() as cleanup:   # every exit path, last registered first:
        cleanup.callback(sup.close)           # STOPPING=1; the socket file removed
        if inp.writer is not None:
            cleanup.callback(inp.writer.close)
        cleanup.callback(rt.close)            # stages, host pool, shared memory
        try:
            execute(cfg, rt, sup, inp, log)
            return 0
        except (PlanError, HostMemoryError, ControlError) as e:
            err(str(e))
            return 2
        except (StageFailed, JobFailed) as e:
            err(str(e))
            return 1
        except (KeyboardInterrupt, Terminated):
            interrupts.handled = True
            err("interrupted; results finished so far are kept"
                + (f" in {cfg.output}" if cfg.output else ""))
            return 130


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = from_args(argv)
        cfg, model, tokenizer, max_len = prepare(cfg)
    except ConfigError as e:
        err(str(e))
        return 2
    interrupts = Interrupts()
    interrupts.install()
    try:
        return run(cfg, model, tokenizer, max_len, interrupts)
    finally:
        interrupts.uninstall()


if __name__ == "__main__":
    sys.exit(main())
