"""The stage processes and the rings between them, seen from the driver.

    driver ─ring0─► stage 0 ─ring1─► stage 1 ─► … ─► stage S-1 ─ringS─► driver
       └──plan1──────────────────► stage 1       (with KV offload over 2+ stages: each
       └──plan2─────────────────────────────► …   step's copies, sent with the step)

Every shared-memory object is named ``/pipemax-<run id>-ring<i>`` or ``-plan<i>`` (see
ipc/names.py), so
``close()`` (called from the launcher's ``finally``) and the next start's stale-run sweep can
remove all of them. A stage that dies is noticed within one ring wait slice: the driver's
waits check every stage process and raise ``StageFailed`` naming it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Callable

import numpy as np
import torch

from pipemax.ipc import protocol as P
from pipemax.ipc.names import cleanup_run, shm_name
from pipemax.ipc.ring import PeerGone, Ring
from pipemax import devices
from pipemax.config import RunConfig
from pipemax.model_config import ModelConfig
from pipemax.partition import split_layers
from pipemax.scheduler import StepPlan
from pipemax.stages.worker import StageSpec, main as stage_main


# how long the driver waits for the process whose death made a stage leave (PeerGone) to be
# reaped, so that the error names the first to die and not the one that followed it
PEER_GRACE_S = 2.0


class StageFailed(RuntimeError):
    """A stage process died or reported an error; the message names it."""


def ring_capacity(cfg: RunConfig, model: ModelConfig, max_model_len: int) -> int:
    esize = 4 if cfg.dtype == "float32" else 2
    hidden = cfg.step_tokens * model.hidden_size * esize
    tokens = cfg.step_tokens * 8
    per_seq = cfg.max_seqs_per_mb * (5 * 4 + 8 * 3 + 2 * 20 * 8)
    one = hidden + tokens + _copy_bytes(cfg, max_model_len) + per_seq + (64 << 10)
    return 2 * one + (1 << 20)


def _copy_bytes(cfg: RunConfig, max_model_len: int) -> int:
    """A step's block tables (int32) and its swap copies: int32 (from, to) pairs out and in,
    each at most a micro-batch's block tables (SchedulerConfig.swap_blocks_per_step)."""
    tables = cfg.max_seqs_per_mb * (-(-max_model_len // cfg.block_size)) * 4
    return tables + 4 * tables


def plan_ring_capacity(cfg: RunConfig, max_model_len: int, micro_batches: int) -> int:
    """Room for the copy plans of every step in flight and two more (a stage drains its
    ring each step: what it holds is the steps sent that it has not handled yet)."""
    one = _copy_bytes(cfg, max_model_len) + cfg.max_seqs_per_mb * 4 * 8 + (16 << 10)
    return (micro_batches + 2) * one + (1 << 20)


def stage_threads(device: str, threads: int | None, stages: int, cpus: int) -> int:
    """Torch threads of each stage process. A CPU stage computes: the cores are shared among
    the stages. A CUDA stage only copies messages in and out of the rings; more threads than a
    few buy nothing there and cost much: idle OpenMP threads spin before they sleep, and with
    every process owning all the cores a stage woken by its ring waited for a scheduler tick
    (4 ms, against a 15 ms decode step; see tools/ring_latency.py)."""
    if threads:
        return threads
    if device == "cpu":
        return max(1, cpus // stages)
    return max(1, min(4, cpus // (stages + 1)))


class Pipeline:
    def __init__(self, cfg: RunConfig, model: ModelConfig, run_id: str, max_model_len: int,
                 interrupted: Callable[[], bool] = lambda: True):
        self.cfg = cfg
        self.model = model
        self.run_id = run_id
        self.max_model_len = max_model_len
        self.interrupted = interrupted   # raises if the user asked the run to stop
        self.extra_checks: list[Callable[[], bool]] = []   # e.g. the KV pool's liveness
        self.ranges = split_layers(model, cfg.gpus)
        self.rings: list[Ring] = []
        self.plan_rings: list[Ring] = []   # driver -> stage 1.., the copy plans (may be none)
        self.procs: list[mp.Process] = []
        self.to_first: Ring | None = None
        self.from_last: Ring | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        cap = ring_capacity(cfg, self.model, self.max_model_len)
        names = [shm_name(self.run_id, f"ring{i}") for i in range(cfg.gpus + 1)]
        for n in names:
            self.rings.append(Ring.create(n, cap))
        self.to_first, self.from_last = self.rings[0], self.rings[-1]
        ctx = mp.get_context("spawn")
        threads = stage_threads(cfg.device, cfg.threads, cfg.gpus, os.cpu_count() or 1)
        max_blocks_useful = cfg.max_num_seqs * (-(-self.max_model_len // cfg.block_size))
        ids = cfg.stage_device_ids
        shares = devices.sharers(ids)
        for i, (a, b) in enumerate(self.ranges):
            spec = StageSpec(
                index=i, num_stages=cfg.gpus, layer_start=a, layer_end=b, model=self.model,
                folder=cfg.model_folder if cfg.load_format == "auto" else None,
                dtype=cfg.dtype, device="cpu" if cfg.device == "cpu" else f"cuda:{ids[i]}",
                device_sharers=shares[i],
                ring_in=names[i], ring_out=names[i + 1], block_size=cfg.block_size,
                max_blocks_useful=max_blocks_useful, memory_gb=cfg.gpu_memory_gb,
                kv_cache_gb=cfg.kv_cache_gb, max_tokens_per_step=cfg.step_tokens,
                max_seqs_per_step=cfg.max_seqs_per_mb, max_model_len=self.max_model_len,
                parent_pid=os.getpid(), threads=threads, seed=cfg.seed,
                decode_graphs=cfg.cuda_graphs, kv_cache_dtype=cfg.kv_cache_dtype,
                kv_scales=cfg.kv_scales, quantization=cfg.quantization)
            p = ctx.Process(target=stage_main, args=(spec,), name=f"pipemax-stage{i}")
            p.start()
            self.procs.append(p)

    def hello(self) -> list[dict]:
        """Stages load their weights and report what they can hold (and their measured figures)."""
        self.to_first.write({"op": P.OP_HELLO, "reports": []}, timeout=30.0, alive=self.check)
        meta, _ = self.recv(expect=P.OP_HELLO)
        return meta["reports"]

    def alloc(self, resident: int, staging: int, host_blocks: int, host_segments: list[str],
              overlap: bool, micro_batches: int, swap_blocks: int = 0) -> None:
        """Stages allocate their KV caches (and map their host KV segments, and the rings of
        copy plans when offloaded KV is prefetched ahead over several stages). ``swap_blocks``:
        of the host blocks, those kept for preempted sequences with offload off (swap-only:
        the stages copy them out and back)."""
        cfg = self.cfg
        names: list[str | None] = [None] * cfg.gpus
        if staging and overlap and cfg.prefetch_plans and cfg.gpus > 1:
            cap = plan_ring_capacity(cfg, self.max_model_len, micro_batches)
            for i in range(1, cfg.gpus):
                names[i] = shm_name(self.run_id, f"plan{i}")
                self.plan_rings.append(Ring.create(names[i], cap))
        self.to_first.write({"op": P.OP_ALLOC, "resident_blocks": resident,
                             "staging_blocks": staging, "host_blocks": host_blocks,
                             "host_segments": host_segments, "overlap": overlap,
                             "swap_blocks": swap_blocks,
                             "plan_rings": names, "acks": []},
                            timeout=30.0, alive=self.check)
        self.recv(expect=P.OP_ALLOC)

    def check(self) -> bool:
        """Liveness callback for ring waits: raises StageFailed if a stage process died."""
        self.interrupted()
        for extra in self.extra_checks:
            extra()
        dead = self._dead()
        if dead and all(code == P.EXIT_PEER_GONE for _, code in dead):
            # a stage that left because its neighbour went away: the neighbour may not be
            # reaped yet (a killed process's threads take a moment to exit), so wait for it
            deadline = time.monotonic() + PEER_GRACE_S
            while time.monotonic() < deadline and all(c == P.EXIT_PEER_GONE for _, c in dead):
                time.sleep(0.02)
                dead = self._dead()
        if dead:
            i, code = next(((i, c) for i, c in dead if c != P.EXIT_PEER_GONE), dead[0])
            pid = self.procs[i].pid
            raise StageFailed(f"stage {i} (pid {pid}) exited with code {code}"
                              + (" (killed by a signal)" if code < 0 else ""))
        return True

    def _dead(self) -> list[tuple[int, int]]:
        """(stage, exit code) of every stage process that has exited."""
        return [(i, p.exitcode) for i, p in enumerate(self.procs) if p.exitcode is not None]

    def stop(self, timeout: float = 10.0) -> list[dict]:
        """Ask every stage to exit, then make sure they are gone. Returns the stages' final
        reports (peak memory) when they all got to give one."""
        finals = []
        alive = [p for p in self.procs if p.exitcode is None]
        if alive and self.to_first is not None:
            try:
                self.to_first.write({"op": P.OP_STOP}, timeout=2.0, alive=lambda: all(
                    p.exitcode is None for p in self.procs))
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    try:
                        with self.from_last.read(timeout=0.5, alive=lambda: True) as m:
                            if m.meta.get("op") == P.OP_STOP:
                                finals = list(m.meta.get("finals", []))
                                break
                    except TimeoutError:
                        if any(p.exitcode is not None for p in self.procs):
                            break
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=max(0.1, timeout / 4))
        for p in self.procs:
            if p.exitcode is None:   # (stages ignore SIGTERM: the driver alone stops them)
                p.kill()
                p.join(timeout=3.0)
        return finals

    def close(self) -> None:
        """Stop the stages and remove every shared-memory object of the run."""
        try:
            self.stop()
        finally:
            for r in self.rings + self.plan_rings:
                r.close()
                r.unlink()
            self.rings.clear()
            self.plan_rings.clear()
            cleanup_run(self.run_id)

    # ---- steps ----------------------------------------------------------------------------
    def send_step(self, plan: StepPlan, step: int, sampling: dict[str, np.ndarray],
                  num_top: int) -> None:
        tensors = {
            "q_lens": torch.from_numpy(plan.q_lens),
            "ctx_lens": torch.from_numpy(plan.ctx_lens),
            "block_tables": torch.from_numpy(plan.block_tables),
            "offloaded": torch.from_numpy(plan.offloaded),
            "streamed": torch.from_numpy(plan.streamed),
            "swap_out": torch.from_numpy(plan.swap_out),
            "swap_in": torch.from_numpy(plan.swap_in),
            "gpu_prefix": torch.from_numpy(plan.gpu_prefix),
            "sample_rows": torch.from_numpy(plan.sample_rows),
            **{k: torch.from_numpy(v) for k, v in sampling.items()},
            "tokens": torch.from_numpy(plan.tokens),
        }
        self.to_first.write({"op": P.OP_STEP, "mb": plan.mb, "step": step, "num_top": num_top,
                             "sent": time.monotonic()}, tensors, timeout=None, alive=self.check)
        if self.plan_rings and (plan.offloaded.any() or len(plan.swap_out) or len(plan.swap_in)):
            copies = {k: tensors[k] for k in P.PLAN_TENSORS}
            for r in self.plan_rings:
                r.write({"op": P.OP_PLAN, "mb": plan.mb, "step": step}, copies, timeout=None,
                        alive=self.check)

    def recv(self, expect: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        self.check()    # also between messages: a dead helper process (the pool) stops the run
        try:
            with self.from_last.read(timeout=None, alive=self.check) as m:
                meta = dict(m.meta)
                tensors = {k: v.clone() for k, v in m.tensors.items()}
        except PeerGone:
            # a stage that went away usually follows another that died: name the first one
            # (a killed process can take a moment to be reaped)
            deadline = time.monotonic() + PEER_GRACE_S
            while time.monotonic() < deadline:
                self.check()
                time.sleep(0.02)
            raise StageFailed("the last stage went away") from None
        op = meta.get("op")
        if op == P.OP_ERROR:
            raise StageFailed(f"stage {meta.get('stage')} failed: {meta.get('message')}")
        if expect is not None and op != expect:
            raise StageFailed(f"pipeline protocol error: expected op {expect}, got {op}")
        return meta, tensors
