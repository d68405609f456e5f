"""A folder of result shards, written by many replicas (pipemax/ray_data.py) exactly once.

A shard is the result lines of one batch of input lines, ``part-<hash>.jsonl``, beside
``part-<hash>.lines``: the input line numbers it answers, one per line. The hash is of those
line numbers, so a batch that is run again (its replica died after writing, and the batch was
retried) writes the same shard again rather than a second one. Both files are written under a
temporary name and renamed, the ``.lines`` first: a shard is there whole or not at all, and
``done()`` (what a rerun skips) counts only shards whose ``.jsonl`` is there.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Iterable, Iterator

from pipemax.results import encode_line

PREFIX = "part-"


def shard_name(indices: Iterable[int]) -> str:
    key = ",".join(str(i) for i in sorted(indices)).encode()
    return PREFIX + hashlib.sha256(key).hexdigest()[:20]


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(folder, results: list[tuple[int, dict]]) -> Path:
    """Write one batch's ``(input line number, result line)`` pairs; returns the shard."""
    folder = Path(folder)
    name = shard_name(i for i, _ in results)
    _write(folder / f"{name}.lines", "".join(f"{i}\n" for i, _ in results).encode())
    out = folder / f"{name}.jsonl"
    _write(out, b"".join(encode_line(line) for _, line in results))
    return out


def _shards(folder: Path) -> Iterator[tuple[Path, Path]]:
    for p in sorted(folder.glob(PREFIX + "*.jsonl")):
        yield p, p.with_suffix(".lines")


def done(folder) -> dict[int, str]:
    """Input line number -> the shard that answers it. Also removes what a writer killed in
    the middle left (temporary files, a ``.lines`` without its ``.jsonl``)."""
    folder = Path(folder)
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    for p in folder.glob(PREFIX + "*.lines"):
        if not p.with_suffix(".jsonl").exists():
            p.unlink(missing_ok=True)
    out: dict[int, str] = {}
    for jsonl, lines in _shards(folder):
        for tok in lines.read_text().split():
            out.setdefault(int(tok), jsonl.name)
    return out


def read_lines(folder) -> Iterator[bytes]:
    """Every result line in the folder."""
    for jsonl, _ in _shards(Path(folder)):
        with open(jsonl, "rb") as f:
            yield from f
