"""``python -m pipemax.launch``: check the inputs, start the stages, run the batch, clean up.

Everything that can be wrong with the flags, the model folder or the input file is found
before any process starts, and reported in one line with exit code 2. Every exit path
(normal, error, Ctrl-C, SIGTERM, a stage killed) runs ``Pipeline.close()``, which removes
every shared-memory object of the run, and removes the control socket; finished results are
already on disk, line by line, and a run started again with the same --output skips them
(pipemax/resume.py). The first SIGTERM drains (exit 0); a second one, or Ctrl-C, stops at once
(exit 130). Control commands, progress and systemd notifications: pipemax/supervisor.py.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from pipemax.config import ConfigError, RunConfig, from_args
from pipemax import devices, supervisor
from pipemax.control import ControlError
from pipemax.job import Job, JobError, JobFailed
from pipemax.service import serve
from pipemax.kv_pool import HostMemoryError
from pipemax.planner import PlanError
from pipemax.model_config import ModelConfig
from pipemax.pipeline import StageFailed
from pipemax.runtime import Runtime
from pipemax.scheduler import Scheduler
from pipemax.tiny import DEFAULT_PROMPTS, ensure_tiny_model
from pipemax.tokenizer import Tokenizer, TokenizerError
from stages.loader import CheckpointError, check_checkpoint


class Terminated(BaseException):
    """A second SIGTERM, or SIGINT: unwind so that every ``finally`` runs."""


class Interrupts:
    """SIGTERM / SIGINT handler. The first SIGTERM only sets ``drain_requested`` (the engine
    loop then takes nothing new, finishes what is running and exits 0; see
    pipemax/supervisor.py). SIGTERMs within ``REPEAT_WINDOW_S`` of the first count as that one
    (``timeout``, a container stop or a batch scheduler signal both the launcher and its
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


def handoff_summary(finals: list[dict]) -> str:
    """The ring hand-offs the stages waited for (writer's stamp to the copy out)."""
    n = sum(f.get("handoffs", 0) for f in finals)
    if not n:
        return ""
    mean = sum(f["handoff_s"] for f in finals) / n
    worst = max(f["handoff_max_s"] for f in finals)
    return f"; ring hand-offs {mean * 1e3:.2f} ms mean, {worst * 1e3:.1f} ms max ({n})"


def check_cuda_devices(cfg: RunConfig) -> None:
    """The stages' devices are present, and the memory caps of stages sharing one fit it."""
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


def offload_summary(finals: list[dict], sched: Scheduler) -> str:
    streamed = (f"; {sched.num_streamed_admitted} sequences streamed from the host pool"
                if sched.num_streamed_admitted else "")
    if not sched.offload:
        return streamed
    gib = lambda x: x / 2**30
    pre = sum(f.get("bytes_prefetched", 0) for f in finals)
    off = sum(f.get("bytes_offloaded", 0) for f in finals)
    peak = max((f.get("peak_staging_blocks", 0) for f in finals), default=0)
    return (f"; KV offload: {sched.num_offloaded_admitted} sequences offloaded, "
            f"{gib(pre):.2f} GiB prefetched, {gib(off):.2f} GiB offloaded, peak staging "
            f"{peak} blocks per buffer" + streamed)


def preemption_summary(finals: list[dict], sched: Scheduler) -> str:
    """What preemptions cost: the sequences swapped to the host pool and back (no
    recomputation), and the tokens recomputed for the others."""
    if not sched.num_preemptions:
        return ""
    mib = lambda key: sum(f.get(key, 0) for f in finals) / 2**20
    swapped = (f"{sched.num_swapped_out} swapped to the host pool ({mib('bytes_swapped_out'):.1f} "
               f"MiB out, {mib('bytes_swapped_in'):.1f} MiB back in), "
               if sched.num_swapped_out else "")
    return (f"; {sched.num_preemptions} preemptions: {swapped}{sched.tokens_recomputed} "
            "tokens recomputed")


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


def run(cfg: RunConfig, model: ModelConfig, tokenizer, max_len: int,
        interrupts: Interrupts) -> int:
    rt = Runtime(cfg, model, tokenizer, max_len, check=interrupts.check,
                 log=lambda m: info(cfg, m))
    try:   # control socket, progress, systemd, --serve job queue (pipemax/supervisor.py)
        sup = supervisor.build(cfg, interrupts, lambda m: info(cfg, m))
    except ControlError as e:
        err(str(e))
        return 2
    job = None
    if cfg.serve:
        writer, lines = None, iter(())        # jobs come through the control socket
    elif cfg.input is not None:
        job = Job(cfg.input, cfg.output, cfg.errors, log=sup.log)
        try:
            job.open()                        # resume: skip what an earlier run answered
        except JobError as e:
            err(str(e))
            return 2
        writer, lines = job, job.lines()
    else:
        writer = PrintWriter(DEFAULT_PROMPTS)
        lines = default_lines(DEFAULT_PROMPTS)
    try:
        sup.start()
        reports = rt.start()
        engine = rt.plan(job.requests() if job is not None else default_lines(DEFAULT_PROMPTS),
                         hooks=sup, engine_log=None if cfg.quiet else lambda m: info(cfg, m))
        kv_plan, sched, sched_cfg = rt.kv_plan, rt.sched, rt.sched_cfg
        engine.start_job(lines, writer.write if writer is not None else (lambda line: None))
        if job is not None:
            job.bind(engine.parser)
        sup.loaded(engine)                    # READY=1
        load_s = rt.load_s
        if sup.service is not None:
            outcome = serve(engine, sup, sup.service)
            t = sup.totals
            info(cfg, f"service {outcome}: {t['requests_ok']} requests ok, "
                      f"{t['requests_error']} failed, {t['output_tokens']} output tokens")
            return 0
        sup.begin_job(job)
        stats = engine.run()
        sup.end_job()
        finals = rt.stop()
        if cfg.stats_json:
            figures = {**stats.as_dict(), "load_seconds": load_s,
                       "num_blocks": sched_cfg.num_blocks,
                       "peak_gpu_gb": [f["peak_gpu_bytes"] / 2**30 for f in finals],
                       "block_size": cfg.block_size, "stages": reports,
                       "preemptions": sched.num_preemptions,
                       "swapped_out": sched.num_swapped_out,
                       "blocks_swapped_out": sched.blocks_swapped_out,
                       "blocks_swapped_in": sched.blocks_swapped_in,
                       "tokens_recomputed": sched.tokens_recomputed,
                       "bytes_swapped_out": sum(f.get("bytes_swapped_out", 0) for f in finals),
                       "bytes_swapped_in": sum(f.get("bytes_swapped_in", 0) for f in finals),
                       "micro_batches": sched_cfg.num_micro_batches,
                       "max_seqs_per_mb": sched_cfg.max_seqs_per_mb,
                       "plan": json.loads(kv_plan.to_json()),
                       "offloaded_admitted": sched.num_offloaded_admitted,
                       "streamed_admitted": sched.num_streamed_admitted,
                       "bytes_prefetched": sum(f.get("bytes_prefetched", 0) for f in finals),
                       "bytes_offloaded": sum(f.get("bytes_offloaded", 0) for f in finals),
                       "finals": finals}
            Path(cfg.stats_json).write_text(json.dumps(figures, indent=1) + "\n")
        print(f"pipemax: {stats.summary()}", file=sys.stderr if cfg.input is None else sys.stdout,
              flush=True)
        info(cfg, f"plan predicted {kv_plan.predicted_tok_s:.0f} output tok/s "
                  f"({kv_plan.decode_tok_s:.0f} in steady decode)"
                  f"{' (from nominal CPU figures)' if cfg.device == 'cpu' else ''}; "
                  f"measured {stats.as_dict()['output_tok_s']:.0f} over the whole run"
                  + offload_summary(finals, sched) + preemption_summary(finals, sched)
                  + handoff_summary(finals))
        if sup.outcome != "done" and (job is None or job.done < job.total):
            info(cfg, f"{sup.outcome}: stopped before the end of the input; run again with the "
                      "same --output to serve the rest")
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
    finally:
        try:
            rt.close()                        # stages, host pool, shared memory
        finally:
            try:
                if writer is not None:
                    writer.close()
            finally:
                sup.close()                   # STOPPING=1; the socket file removed


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
