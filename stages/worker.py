"""The stage process: one per GPU (or per CPU stage), running its shard of layers.

Loop: read a message from the ring before it, act on its op, write the result to the ring after
it. The input slot is released as soon as its tensors are copied to the device, so the previous
stage can hand over the next micro-batch while this one computes.

    HELLO  -> load nothing new; append this stage's report (layers, KV block bytes, max blocks)
    ALLOC  -> allocate the KV cache with the driver's block count (the minimum over stages)
    STEP   -> forward the micro-batch; the last stage samples and sends token ids to the driver
    STOP   -> forward it and exit 0
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from ipc import protocol as P
from ipc.ring import PeerGone, Ring, RingTimeout
from pipemax.model_config import ModelConfig
from stages.attention import build_layout
from pipemax.timetable import Staging, staging_for
from stages.kv_cache import KVCache, kv_budget_bytes
from stages.decode_graph import DecodeGraphs
from stages.measure import measure
from stages.offload import HostPool, Offloader
from stages.loader import build_stage_model
from stages.sampler import sample

GiB = 1 << 30


@dataclass(frozen=True)
class StageSpec:
    index: int
    num_stages: int
    layer_start: int
    layer_end: int
    model: ModelConfig
    folder: str | None            # None: dummy weights
    dtype: str
    device: str                   # "cpu" or "cuda:<i>"
    ring_in: str
    ring_out: str
    block_size: int
    max_blocks_useful: int        # more blocks than this can never be used
    memory_gb: float | None       # cap on what this stage may use on its device
    kv_cache_gb: float | None     # cap on the KV cache alone
    max_tokens_per_step: int
    max_seqs_per_step: int
    max_model_len: int
    parent_pid: int
    threads: int | None
    seed: int
    decode_graphs: bool = True     # decode steps through per-bucket static buffers (CUDA graphs)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


class Stage:
    def __init__(self, spec: StageSpec):
        self.spec = spec
        self.device = torch.device(spec.device)
        self.dtype = getattr(torch, spec.dtype)
        self.model = build_stage_model(
            spec.model, spec.layer_start, spec.layer_end, spec.is_first, spec.is_last,
            folder=Path(spec.folder) if spec.folder else None, dtype=self.dtype,
            device=self.device, seed=spec.seed)
        self.kv: KVCache | None = None
        self.host: HostPool | None = None
        self.offloader: Offloader | None = None
        self.graphs: DecodeGraphs | None = None
        self.resident = self.staging_blocks = self.peak_staging = 0
        self.busy_s = self.wait_s = 0.0       # time in steps / waiting for the ring before
        self.steps = 0
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def report(self) -> dict:
        s = self.spec
        block_bytes = KVCache.block_bytes(s.model, s.layer_end - s.layer_start, s.block_size,
                                          self.dtype)
        budget = kv_budget_bytes(s, self.device, self.weight_bytes, self.dtype)
        figures = measure(self.device, self.dtype) if self.device.type == "cuda" else None
        return {"stage": s.index, "layers": [s.layer_start, s.layer_end],
                "weight_bytes": self.weight_bytes, "block_bytes": block_bytes,
                "max_blocks": int(min(budget // block_bytes, s.max_blocks_useful)),
                "kv_budget_bytes": int(budget), "device": str(self.device),
                "figures": figures}

    def final_report(self) -> dict:
        peak = (torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda"
                else 0)
        off = self.offloader
        return {"stage": self.spec.index, "peak_gpu_bytes": int(peak),
                "busy_s": self.busy_s, "wait_s": self.wait_s, "steps": self.steps,
                "bytes_prefetched": off.bytes_prefetched if off else 0,
                "bytes_offloaded": off.bytes_offloaded if off else 0,
                "transfer_hidden_share": off.hidden_share() if off else None,
                "prefetch_seconds": off.copy_s if off else 0.0,
                "compute_stall_seconds": off.stall_s if off else 0.0,
                "peak_staging_blocks": self.peak_staging, "resident_blocks": self.resident}

    def alloc(self, meta: dict) -> None:
        """KV memory: R resident blocks, plus two staging buffers of S blocks when offloading."""
        s = self.spec
        self.resident = int(meta["resident_blocks"])
        self.staging_blocks = int(meta["staging_blocks"])
        scratch = self.resident + 2 * self.staging_blocks     # a block no sequence owns
        self.kv = KVCache(s.model, s.layer_end - s.layer_start, scratch + 1, s.block_size,
                          self.dtype, self.device)
        if s.decode_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv.data, scratch, s.block_size,
                                       -(-s.max_model_len // s.block_size), self.dtype,
                                       self.device, capture=True)
        if self.staging_blocks:
            shape = (int(meta["host_blocks"]), *self.kv.data.shape[1:])
            self.host = HostPool(meta["host_segments"][s.index], shape, self.dtype,
                                 pin=self.device.type == "cuda")
            self.offloader = Offloader(self.kv.data, self.host, bool(meta["overlap"]))

    def close(self) -> None:
        if self.offloader is not None:
            self.offloader.synchronize()
        if self.host is not None:
            self.host.close()

    def staging(self, meta: dict, t: dict) -> Staging | None:
        """How this step's offloaded sequences use the staging buffer (None: no offload)."""
        if self.offloader is None:
            return None
        st = staging_for(t["q_lens"].numpy(), t["ctx_lens"].numpy(), t["block_tables"].numpy(),
                         t["offloaded"].numpy(), self.spec.block_size, self.resident,
                         self.staging_blocks, int(meta["step"]) % 2)
        self.peak_staging = max(self.peak_staging, st.blocks_used)
        return st

    def prefetch_early(self, meta: dict, t: dict) -> None:
        """The next message is already here: start moving its KV while this step computes."""
        if self.offloader is not None and meta.get("op") == P.OP_STEP:
            self.offloader.prefetch(int(meta["step"]), int(meta["mb"]), self.staging(meta, t))

    @torch.inference_mode()
    def step(self, meta: dict, t: dict) -> tuple[dict, dict]:
        s = self.spec
        k, mb = int(meta["step"]), int(meta["mb"])
        off = self.offloader
        st = self.staging(meta, t)
        if off is not None:
            off.prefetch(k, mb, st)
            if not off.overlap:
                off.synchronize()
            off.before_compute(k)
        table = st.table if st is not None else t["block_tables"].numpy()
        q_lens, ctx = t["q_lens"].numpy(), t["ctx_lens"].numpy()
        x = (t["tokens"] if s.is_first else t["hidden"]).to(self.device, non_blocking=True)
        if (self.graphs is not None and bool((q_lens == 1).all())
                and self.graphs.fits(len(q_lens), table.shape[1])):
            h = self.graphs.run(x, ctx, table)
        else:
            lay = build_layout(q_lens, ctx, table, s.block_size, self.device)
            h = self.model(x, lay, self.kv.data)
        if s.is_last:
            rows = t["sample_rows"].to(self.device)
            d = self.device
            so = sample(self.model.logits(h[rows]), t["temperature"].to(d), t["top_p"].to(d),
                        t["top_k"].to(d), t["u"].to(d), int(meta["num_top"]),
                        all_greedy=bool((t["temperature"] <= 0).all()))
        if off is not None:
            off.after_compute(k)
            off.offload(k, st)
            if not off.overlap:
                off.synchronize()
        if not s.is_last:
            out = {k_: t[k_] for k_ in P.STEP_META_TENSORS}
            out["hidden"] = h
            return meta, out
        return ({"op": P.OP_STEP, "mb": meta["mb"], "step": meta["step"]},
                {"token_ids": so.token_ids, "logprobs": so.logprobs, "top_ids": so.top_ids,
                 "top_logprobs": so.top_logprobs})


def _copy_in(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy a message's tensors out of the ring so its slot can be released."""
    return {k: v.clone() for k, v in t.items()}


def _peek(ring: Ring, alive) -> tuple[dict, dict] | None:
    """The next message if it is already in the ring (no waiting)."""
    try:
        with ring.read(timeout=0, alive=alive) as msg:
            return dict(msg.meta), _copy_in(msg.tensors)
    except RingTimeout:
        return None


def serve(spec: StageSpec) -> int:
    """Run the stage until STOP; returns the process exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the launcher handles Ctrl-C and stops us
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(spec.device))
    parent_alive = lambda: os.getppid() == spec.parent_pid
    rin = Ring.attach(spec.ring_in)
    rout = Ring.attach(spec.ring_out)
    stage = None
    try:
        stage = Stage(spec)
        pending = None
        while True:
            t0 = time.perf_counter()
            if pending is None:
                with rin.read(timeout=None, alive=parent_alive) as msg:
                    meta, tensors = dict(msg.meta), _copy_in(msg.tensors)
            else:
                (meta, tensors), pending = pending, None
            t1 = time.perf_counter()
            op = meta.get("op")
            if op == P.OP_STEP:
                meta, tensors = stage.step(meta, tensors)
                if stage.offloader is not None and stage.offloader.overlap:
                    pending = _peek(rin, parent_alive)
                    if pending is not None:
                        stage.prefetch_early(*pending)
            elif op == P.OP_HELLO:
                meta["reports"] = list(meta.get("reports", [])) + [stage.report()]
            elif op == P.OP_ALLOC:
                stage.alloc(meta)
                meta["acks"] = list(meta.get("acks", [])) + [spec.index]
            elif op == P.OP_STOP:
                meta["finals"] = list(meta.get("finals", [])) + [stage.final_report()]
            elif op == P.OP_ERROR:
                pass
            else:
                raise RuntimeError(f"unknown op {op!r}")
            rout.write(meta, tensors, timeout=None, alive=parent_alive)
            if op == P.OP_STEP and stage.steps > 0:   # the first step's wait is the start-up
                stage.wait_s += t1 - t0
                stage.busy_s += time.perf_counter() - t1
            stage.steps += op == P.OP_STEP
            if op == P.OP_STOP:
                return 0
            if op == P.OP_ERROR:
                return 1
    except PeerGone:
        return 3
    except Exception as e:  # report to the driver, through the rest of the pipeline
        msg = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
        try:
            rout.write({"op": P.OP_ERROR, "stage": spec.index, "message": msg}, None,
                       timeout=5.0, alive=parent_alive)
        except Exception:
            pass
        return 1
    finally:
        if stage is not None:
            stage.close()
        rin.close()
        rout.close()


def main(spec: StageSpec) -> None:
    """multiprocessing target."""
    code = serve(spec)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
