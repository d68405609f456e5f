"""Time the hand-off of a stage's message through the shared-memory rings (ipc/ring.py).

    python -m tools.ring_latency --sizes 8K,2M,16M --iters 200

A second process echoes every message from ring A back through ring B, as a stage passes a
micro-batch on: the parent writes a message (metadata and one tensor of the given size, the
shape of a step's hidden states), the echo reads it, copies the tensor out of the slot (as a
stage does), and writes it on. Half the round trip is one hand-off: what a stage boundary
adds to a step. Sizes: a decode step's hidden states are batch x hidden x 2 bytes (llama3-8b,
batch 256: 2 MiB); a 2,048-token prompt step's 16 MiB. Prints one JSON line per size.

Both processes run with ``--threads`` torch threads (default: what a stage of a 1-GPU CUDA
run gets, pipeline.stage_threads). ``--threads 0`` leaves torch's default (every core): the
idle threads of both processes then spin on the cores the woken reader needs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import torch

from pipemax.ipc import names
from pipemax.ipc.ring import Ring
from pipemax.pipeline import stage_threads

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(s: str) -> int:
    s = s.strip().upper()
    return int(float(s[:-1]) * UNITS[s[-1]]) if s[-1] in UNITS else int(s)


def _echo(a_name: str, b_name: str, n: int, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    a, b = Ring.attach(a_name), Ring.attach(b_name)
    try:
        for _ in range(n):
            with a.read(timeout=60) as m:
                meta, t = dict(m.meta), {k: v.clone() for k, v in m.tensors.items()}
            b.write(meta, t, timeout=60)
    finally:
        a.close()
        b.close()


def hand_off(size: int, iters: int, warmup: int = 10, run_id: str | None = None,
             threads: int = 0) -> dict:
    """Median and mean seconds of one hand-off of a ``size``-byte message (``threads``: torch
    threads of both processes; 0 leaves the default)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _time(size, iters, warmup, run_id, threads)
    finally:
        torch.set_num_threads(before)


def _time(size: int, iters: int, warmup: int, run_id: str | None, threads: int) -> dict:
    rid = run_id or names.new_run_id()
    cap = 4 * size + (1 << 20)
    a = Ring.create(names.shm_name(rid, "a"), cap)
    b = Ring.create(names.shm_name(rid, "b"), cap)
    p = mp.get_context("spawn").Process(target=_echo, args=(a.name, b.name, iters + warmup,
                                                                      threads))
    p.start()
    hidden = torch.zeros(size // 2, dtype=torch.bfloat16)
    times = []
    try:
        for i in range(iters + warmup):
            t0 = time.perf_counter()
            a.write({"op": 2, "step": i}, {"hidden": hidden}, timeout=60)
            with b.read(timeout=60) as m:
                assert m.meta["step"] == i
            if i >= warmup:
                times.append((time.perf_counter() - t0) / 2)
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
        for r in (a, b):
            r.close()
            r.unlink()
        names.cleanup_run(rid)
    times.sort()
    med = times[len(times) // 2]
    return {"bytes": size, "iters": iters, "threads": torch.get_num_threads(), "median_us": round(med * 1e6, 1),
            "mean_us": round(sum(times) / len(times) * 1e6, 1),
            "gb_s": round(size / med / 1e9, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="8K,2M,16M")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--threads", type=int,
                   default=stage_threads("cuda", None, 1, os.cpu_count() or 1))
    a = p.parse_args(argv)
    for s in a.sizes.split(","):
        print(json.dumps(hand_off(parse_size(s), a.iters, threads=a.threads)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
