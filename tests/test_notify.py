"""systemd: sd_notify datagrams (path and abstract sockets), the watchdog, the unit file."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid

import pytest

from cli import ROOT, run_cli, write_jsonl
from pipemax.ops.notify import Notifier

UNIT = ROOT / "tools" / "pipemax.service"


def _listener(address):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5.0)
    return s


def _drain(s) -> list[str]:
    out = []
    s.settimeout(0.2)
    while True:
        try:
            out.append(s.recv(4096).decode())
        except socket.timeout:
            return out


def test_notify_to_a_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with _listener(path) as s:
        n = Notifier(path)
        assert n.enabled
        assert n.ready("loaded")
        msg = s.recv(4096).decode().split("\n")
        assert msg[0] == "READY=1" and f"MAINPID={os.getpid()}" in msg and "STATUS=loaded" in msg
        assert n.status("a\nb") and s.recv(4096) == b"STATUS=a b"
        assert not n.status("a\nb")           # unchanged status: not sent again
        assert n.stopping() and s.recv(4096) == b"STOPPING=1"


def test_notify_to_an_abstract_socket():
    name = f"pipemax-test-{uuid.uuid4().hex}"
    with _listener("\0" + name) as s:
        n = Notifier("@" + name)
        assert n.send("X=1")
        assert s.recv(4096) == b"X=1"


def test_watchdog_only_when_asked_and_at_half_the_interval(tmp_path):
    path = str(tmp_path / "n.sock")
    with _listener(path) as s:
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
        n = Notifier.from_env(env)
        assert n.watchdog_interval == 1.0
        assert n.watchdog(now=100.0) and not n.watchdog(now=100.5) and n.watchdog(now=101.1)
        assert _drain(s) == ["WATCHDOG=1", "WATCHDOG=1"]
        other = Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
        assert other.watchdog_interval is None and not other.watchdog()
        assert Notifier.from_env({"NOTIFY_SOCKET": path}).watchdog_interval is None


def test_without_notify_socket_nothing_is_sent_and_failures_do_not_raise(tmp_path):
    n = Notifier.from_env({})
    assert not n.enabled and not n.ready() and not n.watchdog()
    gone = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert not gone.ready() and gone.errors == 1


def test_a_run_notifies_ready_status_watchdog_and_stopping(tmp_path, monkeypatch):
    path = str(tmp_path / "n.sock")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": [3 + i, 4], "max_tokens": 3,
                                               "custom_id": f"x{i}"} for i in range(30)])
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    with _listener(path) as s:
        p = run_cli(["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--no-socket"])
        msgs = _drain(s)
    assert p.returncode == 0, p.stderr
    assert msgs, "no notification received"
    assert msgs[0].startswith("READY=1"), msgs
    assert any("WATCHDOG=1" in m for m in msgs), msgs
    assert any(m.startswith("STATUS=running: job 1, ") for m in msgs), msgs
    assert msgs[-1].startswith("STOPPING=1"), msgs


def test_unit_file_has_what_the_service_needs():
    text = UNIT.read_text()
    for line in ("Type=notify", "RuntimeDirectory=pipemax", "LimitMEMLOCK=infinity",
                 "KillMode=mixed", "Restart=on-failure", "WatchdogSec=", "TimeoutStopSec=",
                 "--serve", "--socket %t/pipemax/pipemax.sock"):
        assert line in text, line


def test_systemd_analyze_verify_passes_on_the_unit(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = tmp_path / "pipemax.service"
    shutil.copy(UNIT, unit)
    p = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on directives it could not parse; it names the file in its warnings
    ours = [l for l in (p.stdout + p.stderr).splitlines() if "pipemax.service" in l]
    assert p.returncode == 0 and not ours, p.stdout + p.stderr
