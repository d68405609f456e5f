"""``python -m pipemax.ray_batch``: one batch file over many machines through Ray Data.

    python -m pipemax.ray_batch --input IN.jsonl --output OUT_DIR [--replicas K]
        [--gpus-per-replica N] [--address ADDR] [engine flags of python -m pipemax.launch]

Ray Data reads the input file; K actors (replicas), each a pipemax ``LLM`` over N GPUs of one
node as one pipeline (pipemax/ray_data.py), serve it batch by batch; each batch's results are
written as a shard of OUT_DIR as soon as it is done (pipemax/shards.py). A rerun with the same
input and OUT_DIR skips every input line already answered there; a replica that dies mid-batch
is restarted by Ray and its batch retried, and a retried batch rewrites its own shard, so
OUT_DIR ends with one result line per input line. ``--address`` joins a running cluster;
without it a local Ray instance is started (and stopped at the end).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pipemax.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipemax.ray_batch", allow_abbrev=False,
        description="Serve a batch file with pipemax replicas through Ray Data; other flags "
                    "are those of python -m pipemax.launch (the engine of each replica).")
    p.add_argument("--input", required=True, help="requests, OpenAI batch JSONL")
    p.add_argument("--output", required=True, help="folder of result shards")
    p.add_argument("--replicas", type=int, default=1, help="pipemax replicas (actors)")
    p.add_argument("--gpus-per-replica", type=int, default=1,
                   help="GPUs of each replica: its pipeline stages (on one node)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="input lines per batch (and per shard)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="CPUs Ray reserves for each replica's actor")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (e.g. auto or ray://HEAD:10001); default: "
                        "start a local instance")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray instance (without --address)")
    return p


class SplitLines:
    """The input file (one row of bytes) into ``{"index", "line"}`` rows, numbered as
    pipemax/requests.py:read_requests numbers them, without the lines already answered."""

    def __init__(self, done: set[int]):
        self.done = done

    def __call__(self, row: dict) -> list[dict]:
        out = []
        for index, line in enumerate(row["bytes"].splitlines(keepends=True)):
            line = line.rstrip(b"\r\n")
            if line.strip() and index not in self.done:
                out.append({"index": index, "line": line})
        return out


def main(argv: list[str] | None = None) -> int:
    a, flags = build_parser().parse_known_args(argv)
    from pipemax.api import config_from_flags
    from pipemax.resume import count_requests
    try:
        if a.replicas < 1 or a.gpus_per_replica < 1 or a.batch_size < 1:
            raise ConfigError("--replicas, --gpus-per-replica and --batch-size must be at "
                              "least 1")
        if "--gpus" in flags:
            raise ConfigError("give the stages of a replica with --gpus-per-replica")
        flags = [*flags, "--gpus", str(a.gpus_per_replica)]
        cfg = config_from_flags(flags)           # the replicas' engine flags, checked here
        if cfg.input is not None or cfg.serve:
            raise ConfigError("--input and --output are the job's; leave out --serve")
        total = count_requests(a.input)
    except ConfigError as e:
        print(f"pipemax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pipemax: error: cannot read input file {a.input}: {e.strerror}",
              file=sys.stderr)
        return 2
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)

    import ray
    import ray.data
    from pipemax.ray_data import PipemaxLLM
    from pipemax.shards import done, read_lines
    started = not ray.is_initialized()
    if started:
        ray.init(address=a.address, num_cpus=a.num_cpus if a.address is None else None,
                 include_dashboard=False, logging_level="WARNING")
    try:
        answered = done(out)
        todo = total - len(answered)
        log = lambda m: print(f"pipemax: {m}", file=sys.stderr, flush=True)
        log(f"{total} requests in {a.input}; {len(answered)} already answered in {out}; "
            f"{todo} to serve on {a.replicas} replica(s) of {a.gpus_per_replica} stage(s)")
        if todo > 0:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = sys.stderr.isatty()
            ds = ray.data.read_binary_files(a.input)
            ds = ds.flat_map(SplitLines(set(answered)))
            ds = ds.repartition(max(a.replicas, math.ceil(todo / a.batch_size)))
            ds = ds.map_batches(
                PipemaxLLM, fn_constructor_kwargs={"flags": flags, "output_dir": str(out)},
                compute=ray.data.ActorPoolStrategy(size=a.replicas),
                batch_size=a.batch_size, batch_format="pyarrow",
                num_gpus=a.gpus_per_replica if cfg.device == "cuda" else 0,
                num_cpus=a.cpus_per_replica)
            n = errors = 0
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for text in batch.column("result").to_pylist():
                    n += 1
                    errors += json.loads(text)["error"] is not None
            log(f"served {n} requests ({errors} error lines)")
        answered = done(out)
        lines = sum(1 for _ in read_lines(out))
        if len(answered) != total or lines != total:
            log(f"{out} answers {len(answered)} of {total} requests in {lines} lines: run "
                "again to serve the rest")
            return 1
        log(f"{out}: every one of the {total} requests answered once")
        return 0
    finally:
        if started:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
