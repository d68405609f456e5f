"""The stage process: one per GPU (or per CPU stage), running its shard of layers.

Loop: read a message from the ring before it, act on its op, write the result to the ring after
it. The input slot is released as soon as its tensors are copied out (to page-locked memory on
CUDA), so the previous stage can hand over the next micro-batch while this one computes. A step
is launched without any host sync; its outputs come back through an event and are written to
the ring after the next step is launched (``serve``), so the GPU never waits for the host to
read and prepare a message.

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

from pipemax.ipc import protocol as P
from pipemax.ipc.ring import PeerGone, Ring
from pipemax.model_config import ModelConfig
from pipemax.stages.attention import build_layout, decode_path
from pipemax.stages.timetable import Staging, staging_for, swap_runs
from pipemax.stages.kv_cache import KVCache, kv_budget_bytes
from pipemax.stages.decode_graph import DecodeGraphs
from pipemax.stages.measure import measure
from pipemax.stages.offload import HostPool, Offloader
from pipemax.stages.plan_inbox import PlanInbox
from pipemax.stages.kv_quant import KVQuant, kv_dtype
from pipemax.stages.loader import build_stage_model, load_kv_scales
from pipemax.stages.gpu_clock import GpuClock
from pipemax.stages.sampler import sample
from pipemax.stages.transfer import Outbound, take, take_while, to_device

POLL_S = 2e-4      # the slices in which a stage waits for the next step while one computes

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
    device_sharers: int = 1        # stages on this device (itself included): they split it
    kv_cache_dtype: str = "auto"   # "auto" (the model's dtype) | "fp8"
    kv_scales: str = "prompt"      # fp8 scales, resolved: "checkpoint" | "prompt" | "one"
    quantization: str = "none"     # "fp8": linear weights in e4m3 (stages/fp8.py)

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
        cuda = self.device.type == "cuda"
        # what the device had free before this stage's weights (its share: pipemax/devices.py)
        self.free_at_start = torch.cuda.mem_get_info(self.device)[0] if cuda else None
        m = spec.model
        self.kv_dtype = kv_dtype(spec.kv_cache_dtype, self.dtype)
        self.decode_kernel, self.decode_attention = decode_path(
            m.num_heads, m.num_kv_heads, m.head_dim, spec.block_size, self.dtype, self.device,
            self.kv_dtype)
        self.model = build_stage_model(
            spec.model, spec.layer_start, spec.layer_end, spec.is_first, spec.is_last,
            folder=Path(spec.folder) if spec.folder else None, dtype=self.dtype,
            device=self.device, seed=spec.seed, quantization=spec.quantization)
        self.quant: KVQuant | None = None      # an fp8 cache's scales (stages/kv_quant.py)
        if self.kv_dtype != self.dtype:
            values = (load_kv_scales(Path(spec.folder), m, spec.layer_start, spec.layer_end)
                      if spec.kv_scales == "checkpoint" else None)
            self.quant = KVQuant.make(spec.layer_end - spec.layer_start, m.num_kv_heads,
                                      self.device, values,
                                      calibrate=spec.kv_scales == "prompt")
        self.kv: KVCache | None = None
        self.host: HostPool | None = None
        self.host_kv: torch.Tensor | None = None    # the host pool as attention reads it
        self.offloader: Offloader | None = None
        self.graphs: DecodeGraphs | None = None
        self.resident = self.staging_blocks = self.peak_staging = 0
        self.busy_s = self.wait_s = 0.0       # time in steps / waiting for the ring before
        self.steps = 0
        # ring hand-offs that this stage waited for: from the writer's stamp to the copy out
        self.handoff_s = self.handoff_max_s = 0.0
        self.handoffs = 0
        self._staged: dict[int, Staging] = {}  # staging of steps prefetched, not yet offloaded
        self.plans: PlanInbox | None = None    # the driver's copy plans (stages 1..)
        self.prefetched_from_plans = 0         # prefetches issued ahead from a plan
        self.taken_early = 0                   # steps taken while the one before computed
        self.clock = GpuClock(self.device)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        emb = self.model.embed_tokens
        # what a step streams: all but the embedding (a lookup of a few rows)
        self.step_weight_bytes = self.weight_bytes - (
            emb.weight.numel() * emb.weight.element_size() if emb is not None else 0)

    def handed_off(self, meta: dict, wait_start: float) -> None:
        """A step message this stage was waiting for has been copied out of the ring: count
        the time since its writer stamped it (clocks are system-wide), if it was written
        after the wait began (else it only waited in the ring while this stage computed)."""
        sent = meta.get("sent")
        if meta.get("op") == P.OP_STEP and sent is not None and sent >= wait_start:
            dt = time.monotonic() - sent
            self.handoffs += 1
            self.handoff_s += dt
            self.handoff_max_s = max(self.handoff_max_s, dt)

    def report(self) -> dict:
        s = self.spec
        block_bytes = KVCache.block_bytes(s.model, s.layer_end - s.layer_start, s.block_size,
                                          self.kv_dtype)
        budget = kv_budget_bytes(s, self.device, self.weight_bytes, self.dtype,
                                 self.decode_kernel, self.free_at_start)
        figures = (measure(self.device, self.dtype, self.model.layers[0].linears(),
                           s.max_tokens_per_step, s.max_seqs_per_step, s.decode_graphs)
                   if self.device.type == "cuda" else None)
        return {"stage": s.index, "layers": [s.layer_start, s.layer_end],
                "weight_bytes": self.weight_bytes, "block_bytes": block_bytes,
                "step_weight_bytes": self.step_weight_bytes,
                "weights": "fp8" if s.quantization == "fp8" else s.dtype,
                "max_blocks": int(min(budget // block_bytes, s.max_blocks_useful)),
                "kv_budget_bytes": int(budget), "device": str(self.device),
                "decode_attention": self.decode_attention,
                "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
                "figures": figures}

    def final_report(self) -> dict:
        cuda = self.device.type == "cuda"
        peak = torch.cuda.max_memory_reserved(self.device) if cuda else 0
        retries = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0) if cuda else 0
        off = self.offloader
        return {"stage": self.spec.index, "peak_gpu_bytes": int(peak),
                "busy_s": self.busy_s, "wait_s": self.wait_s, "steps": self.steps,
                "bytes_prefetched": off.bytes_prefetched if off else 0,
                "bytes_offloaded": off.bytes_offloaded if off else 0,
                "bytes_swapped_out": off.bytes_swapped_out if off else 0,
                "bytes_swapped_in": off.bytes_swapped_in if off else 0,
                "transfer_hidden_share": off.hidden_share() if off else None,
                "prefetched_from_plans": self.prefetched_from_plans,
                "taken_early": self.taken_early,
                "prefetch_seconds": off.copy_s if off else 0.0,
                "compute_stall_seconds": off.stall_s if off else 0.0,
                "peak_staging_blocks": self.peak_staging, "resident_blocks": self.resident,
                "gpu_idle_share": self.clock.idle_share(), "step_kinds": self.clock.by_kind(),
                "handoffs": self.handoffs, "handoff_s": self.handoff_s,
                "handoff_max_s": self.handoff_max_s,
                "alloc_retries": int(retries)}

    def alloc(self, meta: dict, alive) -> None:
        """KV memory: R resident blocks, plus two staging buffers of S blocks when offloading;
        the host pool mapped when there is one (offloaded, streamed or swapped sequences); the
        copies of the timetable when offloading or swapping; the ring of the driver's copy
        plans when it sends them to this stage."""
        s = self.spec
        self.resident = int(meta["resident_blocks"])
        self.staging_blocks = int(meta["staging_blocks"])
        scratch = self.resident + 2 * self.staging_blocks     # a block no sequence owns
        self.kv = KVCache(s.model, s.layer_end - s.layer_start, scratch + 1, s.block_size,
                          self.kv_dtype, self.device)
        if s.decode_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv.data, scratch, s.block_size,
                                       -(-s.max_model_len // s.block_size), self.dtype,
                                       self.device, capture=True,
                                       decode_kernel=self.decode_kernel, quant=self.quant)
        if int(meta["host_blocks"]):
            shape = (int(meta["host_blocks"]), *self.kv.data.shape[1:])
            self.host = HostPool(meta["host_segments"][s.index], shape, self.kv_dtype,
                                 pin=self.device.type == "cuda")
            self.host_kv = self.host.device_view(self.device)
        # (streamed sequences alone need no copies, no timetable)
        if self.staging_blocks or int(meta.get("swap_blocks", 0)):
            self.offloader = Offloader(self.kv.data, self.host, bool(meta["overlap"]))
        rings = meta.get("plan_rings") or []
        if s.index < len(rings) and rings[s.index]:
            self.plans = PlanInbox(Ring.attach(rings[s.index]), alive)

    def close(self) -> None:
        if self.offloader is not None:
            self.offloader.synchronize()
        if self.plans is not None:
            self.plans.close()
        self.host_kv = None
        if self.host is not None:
            self.host.close()

    def takes_next_early(self) -> bool:
        """Whether to wait for the next step's message while a step computes (stages/
        transfer.py ``take_while``): with overlapped offload, so that its prefetch is issued
        under that compute. The first stage learns a step from its message alone. (Not with
        swap-only: its copies are few.)"""
        return self.offloader is not None and self.offloader.overlap and self.staging_blocks > 0

    def staging(self, meta: dict, t: dict) -> Staging | None:
        """How this step's offloaded sequences use the staging buffer, and its swap copies
        (None: no offload, and so no swaps)."""
        if self.offloader is None:
            if t["swap_out"].numel() or t["swap_in"].numel():
                raise RuntimeError("a step with swap copies on a stage without KV offload")
            return None
        k = int(meta["step"])
        st = self._staged.get(k)
        if st is None:
            st = staging_for(t["q_lens"].numpy(), t["ctx_lens"].numpy(),
                             t["block_tables"].numpy(), t["offloaded"].numpy(),
                             self.spec.block_size, self.resident, self.staging_blocks, k % 2,
                             t["gpu_prefix"].numpy() if "gpu_prefix" in t else None)
            st.swap_out = swap_runs(t["swap_out"].numpy())
            st.swap_in = swap_runs(t["swap_in"].numpy())
            self._staged[k] = st
            self.peak_staging = max(self.peak_staging, st.blocks_used)
        return st

    def prefetch_ahead(self, meta: dict, t: dict) -> None:
        """The next message is already here: start moving its KV before this step computes,
        if the timetable allows it now."""
        off = self.offloader
        if off is None or meta.get("op") not in (P.OP_STEP, P.OP_PLAN):
            return
        k, mb = int(meta["step"]), int(meta["mb"])
        if off.tt.prefetch_ready(k, mb):
            off.prefetch(k, mb, self.staging(meta, t))

    @torch.inference_mode()
    def step(self, meta: dict, t: dict, ahead: tuple[dict, dict] | None = None) -> Outbound:
        """Launch one step; ``ahead`` is the next message if already here, else the next
        step's plan may be (stages/plan_inbox.py): its prefetch goes first. Returns the
        outputs on their way to the host."""
        s = self.spec
        k, mb = int(meta["step"]), int(meta["mb"])
        off = self.offloader
        st = self.staging(meta, t)
        clock = self.clock.start()
        planned = self.plans.take(k + 1) if self.plans is not None else None  # drained each step
        if off is not None:
            off.prefetch(k, mb, st)
            if off.overlap and (ahead or planned) is not None:
                early = k + 1 in off.prefetched
                self.prefetch_ahead(*(ahead or planned))
                if ahead is None and not early and k + 1 in off.prefetched:
                    self.prefetched_from_plans += 1
            if not off.overlap:
                off.synchronize()
        streamed = t["streamed"].numpy()
        if off is not None:
            off.before_compute(k, bool(streamed.any()))
        table = st.table if st is not None else t["block_tables"].numpy()
        q_lens, ctx = t["q_lens"].numpy(), t["ctx_lens"].numpy()
        d = self.device
        x = to_device(t["tokens"] if s.is_first else t["hidden"], d)
        calibrating = self.quant is not None and self.quant.calibrate   # the first step
        if (self.graphs is not None and bool((q_lens == 1).all()) and not streamed.any()
                and self.graphs.fits(len(q_lens), table.shape[1]) and not calibrating):
            h = self.graphs.run(x, ctx, table)
        else:
            lay = build_layout(q_lens, ctx, table, s.block_size, d, streamed, self.host_kv,
                               decode_kernel=self.decode_kernel)
            h = self.model(x, lay, self.kv.data, self.quant)
            if calibrating:          # scales fixed from this step's K/V, for the whole run
                self.quant.calibrate = False
        if s.is_last:
            rows = to_device(t["sample_rows"], d)
            so = sample(self.model.logits(h[rows]), to_device(t["temperature"], d),
                        to_device(t["top_p"], d), to_device(t["top_k"], d),
                        to_device(t["u"], d), int(meta["num_top"]),
                        all_greedy=bool((t["temperature"] <= 0).all()))
        if off is not None:
            off.after_compute(k)
            off.offload(k, st)
            self._staged.pop(k, None)
            if not off.overlap:
                off.synchronize()
        if not s.is_last:
            out = {k_: t[k_] for k_ in P.STEP_META_TENSORS}
            out["hidden"] = h
            res = Outbound(meta, out)
        else:
            res = Outbound({"op": P.OP_STEP, "mb": meta["mb"], "step": meta["step"]},
                           {"token_ids": so.token_ids, "logprobs": so.logprobs,
                            "top_ids": so.top_ids, "top_logprobs": so.top_logprobs})
        n = int(q_lens.sum())
        kind = "decode" if n == len(q_lens) else "prompt" if (q_lens > 1).all() else "mixed"
        self.clock.end(clock, kind, n, len(q_lens))
        return res


def serve(spec: StageSpec) -> int:
    """Run the stage until STOP; returns the process exit code.

    One step of look-ahead: step k's outputs travel to the host while step k+1 is launched, and
    are written to the ring after it, so the GPU is not left idle while the host reads the
    next message and prepares it. When the next message is not there yet, the outputs are
    written first (the driver may be waiting for them to send more); with overlapped offload
    the stage first waits for the message until step k's outputs are ready, so that a step
    arriving while k computes has its prefetch issued under k's compute."""
    for sig in (signal.SIGINT, signal.SIGTERM):      # Ctrl-C, or a SIGTERM to the process
        signal.signal(sig, signal.SIG_IGN)           # group: the launcher drains or stops us
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(spec.device))
    parent_alive = lambda: os.getppid() == spec.parent_pid
    pin = spec.device.startswith("cuda")
    rin = Ring.attach(spec.ring_in)
    rout = Ring.attach(spec.ring_out)
    stage = None
    unsent: Outbound | None = None

    def send(o: Outbound | None) -> None:
        if o is not None:
            meta, tensors = o.ready()
            meta["sent"] = time.monotonic()       # the next stage times the hand-off from here
            rout.write(meta, tensors, timeout=None, alive=parent_alive)

    try:
        stage = Stage(spec)
        nxt = None
        while True:
            t0 = time.perf_counter()
            if nxt is None and unsent is not None:
                nxt = take(rin, parent_alive, 0, pin)
                if nxt is None and stage.takes_next_early():
                    computing = unsent
                    nxt = take_while(rin, parent_alive, pin, lambda: not computing.done(),
                                     POLL_S)
                    stage.taken_early += nxt is not None
            waited = 0.0
            if nxt is None:
                send(unsent)
                unsent = None
                w0, m0 = time.perf_counter(), time.monotonic()
                nxt = take(rin, parent_alive, None, pin)
                waited = time.perf_counter() - w0
                stage.handed_off(nxt[0], m0)
            (meta, tensors), nxt = nxt, None
            op = meta.get("op")
            if op == P.OP_STEP:
                if stage.offloader is not None and stage.offloader.overlap:
                    nxt = take(rin, parent_alive, 0, pin)
                out = stage.step(meta, tensors, ahead=nxt)
                send(unsent)
                unsent = out
                if stage.steps > 0:          # the first step's wait is the start-up
                    stage.wait_s += waited
                    stage.busy_s += time.perf_counter() - t0 - waited
                stage.steps += 1
                continue
            send(unsent)
            unsent = None
            if op == P.OP_HELLO:
                meta["reports"] = list(meta.get("reports", [])) + [stage.report()]
            elif op == P.OP_ALLOC:
                stage.alloc(meta, parent_alive)
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
        return P.EXIT_PEER_GONE
    except Exception as e:  # report to the driver, through the rest of the pipeline
        msg = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
        try:
            send(unsent)
        except Exception:
            pass
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
