"""pipemax as a stage of a Ray Data pipeline: one pipemax ``LLM`` per actor (replica).

    import ray
    from pipemax.ray_data import PipemaxLLM

    ds = ray.data.read_json("requests.jsonl")          # rows in the OpenAI batch line format
    ds = ds.map_batches(PipemaxLLM, fn_constructor_kwargs={"flags": ["--model", DIR,
                        "--gpus", "8"]}, compute=ray.data.ActorPoolStrategy(size=4),
                        num_gpus=8, batch_size=256, batch_format="pyarrow")
    ds.write_json("results/")      # rows: index, custom_id, result (one result line as text)

Each actor owns a pipemax ``LLM`` over the GPUs Ray gave it, as one pipeline (the stages are
processes on the actor's node, with the rings between them in its shared memory). A row is an
input line: either a ``line`` column holding the line's JSON text, or the line's own columns
(``custom_id``, ``method``, ``url``, ``body``, or a plain ``prompt``/``messages`` line); an
``index`` column gives its line number (for the ``request-<n>`` id of a line without one).
Each output row holds the command's result line for it (``json.loads(row["result"])``), so a
bad row gets its error line and the batch goes on. With ``output_dir`` each batch is also
written as a shard of that folder (pipemax/shards.py): what ``python -m pipemax.ray_batch``
uses to write results exactly once.
"""
from __future__ import annotations

import json

from pipemax.api import LLM
from pipemax.results import encode_line

LINE_FIELDS = ("custom_id", "method", "url", "body", "prompt", "messages")


def _plain(x):
    """numpy and Arrow values -> plain Python (lists, dicts, ints, floats, str)."""
    import numpy as np
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def rows_of(batch) -> list[dict]:
    """A Ray Data batch (pyarrow Table, pandas DataFrame or dict of columns) as row dicts."""
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):
        return [_plain(r) for r in batch.to_dict("records")]
    cols = {k: list(v) for k, v in batch.items()}
    n = len(next(iter(cols.values()), []))
    return [{k: _plain(v[i]) for k, v in cols.items()} for i in range(n)]


def raw_line(row: dict) -> bytes:
    """The input line a row stands for."""
    if row.get("line") is not None:
        line = row["line"]
        return line.encode() if isinstance(line, str) else bytes(line)
    return json.dumps({k: row[k] for k in LINE_FIELDS if k in row}).encode()


class PipemaxLLM:
    """A callable class for ``Dataset.map_batches``: input line rows -> result line rows."""

    def __init__(self, flags: list[str] | None = None, *, output_dir: str | None = None,
                 **options):
        """``flags``: the command's flags (``["--model", DIR, "--gpus", "2"]``), or the
        ``LLM`` keywords as ``options``; ``--quiet`` unless ``quiet=False``."""
        if flags is not None:
            self.llm = LLM.from_flags([*flags, "--quiet"] if options.get("quiet", True)
                                      and "--quiet" not in flags else flags)
        else:
            self.llm = LLM(**{"quiet": True, **options})
        self.output_dir = output_dir

    def __call__(self, batch) -> dict[str, list]:
        rows = rows_of(batch)
        lines = [(int(r["index"]) if r.get("index") is not None else i, raw_line(r))
                 for i, r in enumerate(rows)]
        results = self.llm.run_batch(lines)
        if self.output_dir is not None:
            from pipemax.shards import write_shard
            write_shard(self.output_dir, results)
        return {"index": [i for i, _ in results],
                "custom_id": [line["custom_id"] for _, line in results],
                "result": [encode_line(line).decode("utf-8").rstrip("\n")
                           for _, line in results]}
