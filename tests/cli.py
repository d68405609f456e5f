"""Run the CLI as a user would, in a subprocess, and read its result file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "pipemax.launch", "--device", "cpu",
                           "--threads", "1", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    """The run stopped with exit 2 and one line on stderr holding every needle."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("pipemax: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def read_results(path: Path) -> dict[str, dict]:
    out = {}
    for line in Path(path).read_text().split("\n")[:-1]:   # JSONL: lines end in "\n" only
        d = json.loads(line)
        assert d["custom_id"] not in out, f"duplicate result for {d['custom_id']}"
        out[d["custom_id"]] = d
    return out


def spawned_children(launcher: int, n: int, timeout: float = 60) -> list[int]:
    """The launcher's spawned processes (stages, then the KV pool), once there are ``n``,
    in pid order (start order); the multiprocessing resource tracker is not one of them."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = []
        for task in Path(f"/proc/{launcher}/task").iterdir():
            for c in (task / "children").read_text().split():
                try:
                    cmd = Path(f"/proc/{c}/cmdline").read_bytes()
                    if b"spawn_main" in cmd or b"pipemax.kv_pool" in cmd:
                        pids.append(int(c))
                except OSError:
                    pass
        if len(pids) == n:
            return sorted(pids)
        time.sleep(0.05)
    raise AssertionError(f"{n} spawned processes did not appear")


def wait_first_result(proc: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    """Until the run has written its first result line (it must still be running)."""
    import time
    deadline = time.monotonic() + timeout
    while not out.exists() or not out.read_text():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no result within the timeout"
        time.sleep(0.02)


def output_of(proc: subprocess.Popen, timeout: float = 30) -> tuple:
    """A failed assertion's message: the run's (stdout, stderr), killing it first if it is
    still running (waiting on a live service for its output would never return)."""
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=timeout)


def reap(proc: subprocess.Popen) -> None:
    """Kill a run a test left running (call from ``finally``)."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
