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

import numpy as np
import torch

from ipc import protocol as P
from ipc.ring import PeerGone, Ring
from pipemax.model_config import ModelConfig
from stages.attention import build_layout
from stages.kv_cache import KVCache, kv_budget_bytes
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
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def report(self) -> dict:
        s = self.spec
        block_bytes = KVCache.block_bytes(s.model, s.layer_end - s.layer_start, s.block_size,
                                          self.dtype)
        budget = kv_budget_bytes(s, self.device, self.weight_bytes, self.dtype)
        return {"stage": s.index, "layers": [s.layer_start, s.layer_end],
                "weight_bytes": self.weight_bytes, "block_bytes": block_bytes,
                "max_blocks": int(min(budget // block_bytes, s.max_blocks_useful)),
                "kv_budget_bytes": int(budget), "device": str(self.device)}

    def final_report(self) -> dict:
        peak = (torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda"
                else 0)
        return {"stage": self.spec.index, "peak_gpu_bytes": int(peak)}

    def alloc(self, num_blocks: int) -> None:
        s = self.spec
        self.kv = KVCache(s.model, s.layer_end - s.layer_start, num_blocks, s.block_size,
                          self.dtype, self.device)

    @torch.inference_mode()
    def step(self, meta: dict, t: dict) -> tuple[dict, dict]:
        s = self.spec
        lay = build_layout(t["q_lens"].numpy(), t["ctx_lens"].numpy(),
                           t["block_tables"].numpy(), s.block_size, self.device)
        x = t["tokens"] if s.is_first else t["hidden"]
        h = self.model(x.to(self.device), lay, self.kv.data)
        if not s.is_last:
            out = {k: t[k] for k in P.STEP_META_TENSORS}
            out["hidden"] = h
            return meta, out
        rows = t["sample_rows"].to(self.device)
        logits = self.model.logits(h[rows])
        d = self.device
        so = sample(logits, t["temperature"].to(d), t["top_p"].to(d), t["top_k"].to(d),
                    t["u"].to(d), int(meta["num_top"]))
        return ({"op": P.OP_STEP, "mb": meta["mb"], "step": meta["step"]},
                {"token_ids": so.token_ids, "logprobs": so.logprobs, "top_ids": so.top_ids,
                 "top_logprobs": so.top_logprobs})


def _copy_in(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy a message's tensors out of the ring so its slot can be released."""
    return {k: v.clone() for k, v in t.items()}


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
        while True:
            with rin.read(timeout=None, alive=parent_alive) as msg:
                meta, tensors = dict(msg.meta), _copy_in(msg.tensors)
            op = meta.get("op")
            if op == P.OP_STEP:
                meta, tensors = stage.step(meta, tensors)
            elif op == P.OP_HELLO:
                meta["reports"] = list(meta.get("reports", [])) + [stage.report()]
            elif op == P.OP_ALLOC:
                stage.alloc(int(meta["num_blocks"]))
                meta["acks"] = list(meta.get("acks", [])) + [spec.index]
            elif op == P.OP_STOP:
                meta["finals"] = list(meta.get("finals", [])) + [stage.final_report()]
            elif op == P.OP_ERROR:
                pass
            else:
                raise RuntimeError(f"unknown op {op!r}")
            rout.write(meta, tensors, timeout=None, alive=parent_alive)
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
        rin.close()
        rout.close()


def main(spec: StageSpec) -> None:
    """multiprocessing target."""
    code = serve(spec)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
