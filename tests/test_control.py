"""The control socket: frames, bad input, access control, commands; and a real run driven
through it (pause, status, cancel, resume, drain), unharmed by garbage, then completed by a
restart with every custom_id exactly once."""
from __future__ import annotations

import os
import pwd
import grp
import re
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import pytest

from cli import ROOT, read_results, reap, run_cli, wait_first_result, write_jsonl
from pipemax.ops import server as control
from pipemax.ops.framing import encode_frame, request
from pipemax.ops.server import ControlError, ControlServer
from pipemax.ops.status import prometheus

IS_ROOT = os.geteuid() == 0


# ---- helpers --------------------------------------------------------------------------------
def connect(path: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def read_reply(s: socket.socket) -> dict | None:
    """The next reply frame, None if the server closed the connection."""
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        assert chunk, "reply cut short"
        body += chunk
    return msgpack.unpackb(body, raw=False)


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def abuse(path: str) -> None:
    """Every kind of bad frame; each is answered or refused; the server goes on."""
    # garbage bytes: "GET " read as a length is over the limit
    s = connect(path)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    r = read_reply(s)
    assert r["ok"] is False and "over the limit" in r["error"], r
    assert closed(s)
    # a 1 GB length prefix: refused at once, nothing read
    s = connect(path)
    t = time.monotonic()
    s.sendall(struct.pack(">I", 1 << 30) + b"\x81")
    r = read_reply(s)
    assert r["ok"] is False and "1073741824 bytes is over the limit" in r["error"], r
    assert time.monotonic() - t < 2.0
    # a truncated frame: the header promises 100 bytes, 10 come, then the writer closes
    s = connect(path)
    s.sendall(struct.pack(">I", 100) + b"x" * 10)
    s.shutdown(socket.SHUT_WR)
    r = read_reply(s)
    assert r["ok"] is False and "truncated frame" in r["error"], r
    # a header cut short
    s = connect(path)
    s.sendall(b"\x00\x00")
    s.shutdown(socket.SHUT_WR)
    r = read_reply(s)
    assert r["ok"] is False and "truncated" in r["error"], r
    # bytes that are not msgpack
    s = connect(path)
    s.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    r = read_reply(s)
    assert r["ok"] is False and "not valid msgpack" in r["error"], r
    # well-formed frames with bad commands: answered, and the connection goes on
    s = connect(path)
    for bad, needle in ((["status"], "a command is a map"), ({"cmd": 7}, "a string"),
                        ({"nocmd": 1}, "a string"), ({"cmd": "rm -rf /"}, "unknown command"),
                        ({"cmd": "cancel"}, "cancel needs"),
                        ({"cmd": "cancel", "custom_ids": [1, 2]}, "custom_id must be"),
                        ({"cmd": "submit", "input": 5}, "submit needs input")):
        s.sendall(encode_frame(bad))
        r = read_reply(s)
        assert r["ok"] is False and needle in r["error"], (bad, r)
    s.sendall(encode_frame({"cmd": "ping"}))
    assert read_reply(s) == {"ok": True}
    s.close()
    # a map with integer keys (msgpack allows them; strict_map_key refuses)
    s = connect(path)
    s.sendall(struct.pack(">I", 3) + b"\x81\x01\x01")
    r = read_reply(s)
    assert r["ok"] is False, r
    s.close()


def as_other_user(fn, *, gid: int | None = None) -> object:
    """Run ``fn()`` in a forked child as the user nobody (optionally with group ``gid``);
    returns what it returned (a repr-able value) or the repr of the exception it raised."""
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid if gid is not None else nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                out = repr(fn())
            except BaseException as e:  # noqa: BLE001
                out = f"raised {type(e).__name__}: {e}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return data.decode()


@pytest.fixture
def shared_dir():
    """A folder other users can reach (pytest's tmp_path is 0700)."""
    d = tempfile.mkdtemp(prefix="pipemax-ctl-")
    os.chmod(d, 0o755)
    yield Path(d)
    for p in Path(d).iterdir():
        p.unlink()
    os.rmdir(d)


class FakeEngine(threading.Thread):
    """Applies commands the way the supervisor does (answers them), publishes snapshots."""

    def __init__(self, server: ControlServer):
        super().__init__(daemon=True)
        self.server, self.stop, self.applied = server, threading.Event(), []

    def run(self):
        n = 0
        while not self.stop.is_set():
            c = self.server.wait(0.05)
            n += 1
            self.server.publish({"phase": "running", "requests": {"done": n, "total": 10**6}})
            if c is not None:
                self.applied.append(c.msg)
                c.answer(True, applied=c.cmd)


@pytest.fixture
def server(tmp_path):
    srv = ControlServer(str(tmp_path / "c.sock"), render_metrics=prometheus)
    srv.start()
    eng = FakeEngine(srv)
    eng.start()
    yield srv, eng
    eng.stop.set()
    eng.join()
    srv.close()


# ---- the server, in process -----------------------------------------------------------------
def test_socket_file_is_private_and_removed_on_close(tmp_path):
    path = tmp_path / "c.sock"
    srv = ControlServer(str(path))
    srv.start()
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    srv.close()
    assert not path.exists()


def test_socket_group_makes_it_0660(tmp_path):
    gid = pwd.getpwnam("nobody").pw_gid
    if not IS_ROOT:
        pytest.skip("changing a file's group to another group needs root")
    path = tmp_path / "c.sock"
    srv = ControlServer(str(path), group=gid)
    srv.start()
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    finally:
        srv.close()


def test_start_refuses_a_live_socket_and_a_plain_file_and_replaces_a_stale_one(tmp_path):
    path = tmp_path / "c.sock"
    first = ControlServer(str(path))
    first.start()
    try:
        second = ControlServer(str(path))
        with pytest.raises(ControlError, match="in use"):
            second.start()
        second.close()                    # the launcher's finally: must not remove first's
        assert request(str(path), {"cmd": "ping"}) == {"ok": True}
    finally:
        first.close()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))                 # bound, never listening: a dead run's file
    stale.close()
    srv = ControlServer(str(path))
    srv.start()
    srv.close()
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(str(path)).start()
    assert path.read_text() == "not a socket"
    with pytest.raises(ControlError, match="longer than"):
        ControlServer(str(tmp_path / ("x" * 120))).start()


def test_status_metrics_and_engine_commands(server):
    srv, eng = server
    time.sleep(0.2)
    r = request(srv.path, {"cmd": "status"})
    assert r["ok"] and r["phase"] == "running" and r["requests"]["total"] == 10**6
    r = request(srv.path, {"cmd": "pause"})
    assert r == {"ok": True, "applied": "pause"}
    r = request(srv.path, {"cmd": "cancel", "custom_ids": ["a", "b"]})
    assert r["ok"] and eng.applied[-1] == {"cmd": "cancel", "custom_ids": ["a", "b"]}
    text = request(srv.path, {"cmd": "metrics"})["text"]
    check_prometheus(text)
    assert 'pipemax_phase{phase="running"} 1' in text


def check_prometheus(text: str) -> None:
    """The text exposition format: HELP and TYPE before each family's samples; every sample
    line is ``name{labels} value`` with a float value."""
    assert text.endswith("\n")
    declared = {}
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*"'
                        r'(,[a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*")*)\})? (?P<value>\S+)$')
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge"), line
            declared[name] = kind
            continue
        m = sample.match(line)
        assert m, line
        assert m.group(1) in declared, line
        float(m.group("value").replace("Inf", "inf"))
    assert "pipemax_output_tokens_total" in declared


def test_bad_frames_are_answered_and_the_server_goes_on(server, monkeypatch):
    srv, eng = server
    abuse(srv.path)
    assert request(srv.path, {"cmd": "status"})["ok"]
    assert srv.bad_frames >= 5


def test_a_silent_truncated_frame_times_out(server, monkeypatch):
    srv, _ = server
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.5)
    s = connect(srv.path)
    s.sendall(struct.pack(">I", 50) + b"abc")      # and then nothing
    r = read_reply(s)
    assert r["ok"] is False and "timed out" in r["error"], r
    s = connect(srv.path)                          # an idle connection is closed quietly
    assert read_reply(s) is None
    assert request(srv.path, {"cmd": "ping"}) == {"ok": True}


def test_too_many_connections_are_refused_then_served_again(server):
    srv, _ = server
    held = [connect(srv.path) for _ in range(control.MAX_CONNECTIONS)]
    time.sleep(0.3)
    extra = connect(srv.path)
    r = read_reply(extra)
    assert r == {"ok": False, "error": "too many connections"}
    for s in held:
        s.close()
    time.sleep(0.3)
    assert request(srv.path, {"cmd": "ping"}) == {"ok": True}


def test_an_engine_that_does_not_answer_gets_queued(tmp_path, monkeypatch):
    monkeypatch.setattr(control, "REPLY_TIMEOUT", 0.3)
    srv = ControlServer(str(tmp_path / "c.sock"))
    srv.start()
    try:
        r = request(srv.path, {"cmd": "drain"})
        assert r["ok"] and r["queued"], r
        assert [c.cmd for c in srv.pending()] == ["drain"]
    finally:
        srv.close()


def test_a_submit_answered_queued_keeps_its_job_when_the_input_goes(tmp_path, monkeypatch):
    """The engine still loading: a submit is checked when it arrives (a missing input is
    refused at once) and answered "queued"; its input removed before the engine applies it,
    the job is still listed and fails alone at its start (it was lost without a word)."""
    from pipemax.job import JobError
    from pipemax.ops.service import Service
    from pipemax.ops.supervisor import Supervisor
    monkeypatch.setattr(control, "REPLY_TIMEOUT", 0.3)
    srv = ControlServer(str(tmp_path / "c.sock"))
    srv.start()
    inp = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "x"}])
    sub = {"cmd": "submit", "input": str(inp), "output": str(tmp_path / "out.jsonl")}
    try:
        missing = request(srv.path, {**sub, "input": str(tmp_path / "nothing.jsonl")})
        assert not missing["ok"] and "cannot read input file" in missing["error"], missing
        r = request(srv.path, sub)
        assert r["ok"] and r["queued"], r
        inp.unlink()
        logged = []
        sup = Supervisor(interrupts=None, service=Service(lambda: None), log=logged.append)
        (c,) = srv.pending()
        sup.apply(c)
        # refused only when the engine applies it: nobody hears that reply, so it is logged
        other = write_jsonl(tmp_path / "other.jsonl", [{"custom_id": "b", "prompt": "y"}])
        r = request(srv.path, {**sub, "input": str(other), "output": str(tmp_path / "o.jsonl")})
        assert r["ok"] and r["queued"], r
        sup.draining = True
        (c,) = srv.pending()
        sup.apply(c)
    finally:
        srv.close()
    (job,) = sup.service.jobs
    assert job.state == "queued" and job.input == str(inp)
    assert logged == [f"job 1 queued: {inp} -> {tmp_path / 'out.jsonl'}",
                      "control command submit (answered as queued) was refused: the service "
                      "is draining; it takes no new jobs"]
    with pytest.raises(JobError, match="No such file"):
        job.open()


def test_peer_of_another_uid_is_refused(shared_dir):
    if not IS_ROOT:
        pytest.skip("needs root to run a client as another user (os.setuid)")
    path = str(shared_dir / "c.sock")
    srv = ControlServer(path)
    srv.start()
    try:
        # the file's mode keeps others out ...
        out = as_other_user(lambda: request(path, {"cmd": "status"}, timeout=5))
        assert "PermissionError" in out, out
        # ... and with the mode opened up, the peer credentials still do
        os.chmod(path, 0o666)
        out = as_other_user(lambda: request(path, {"cmd": "status"}, timeout=5))
        assert "permission denied: uid 65534 is not the owner" in out, out
        assert srv.refused >= 1
        assert request(path, {"cmd": "ping"}) == {"ok": True}
    finally:
        srv.close()


def test_socket_group_members_are_let_in(shared_dir):
    if not IS_ROOT:
        pytest.skip("needs root to run a client as another user (os.setuid)")
    nobody = pwd.getpwnam("nobody")
    path = str(shared_dir / "c.sock")
    srv = ControlServer(path, group=nobody.pw_gid)
    srv.start()
    try:
        out = as_other_user(lambda: request(path, {"cmd": "ping"}, timeout=5))
        assert out == repr({"ok": True}), out
        other_gid = grp.getgrnam("daemon").gr_gid
        os.chmod(path, 0o666)                       # a stranger gets past the mode only
        out = as_other_user(lambda: request(path, {"cmd": "ping"}, timeout=5), gid=other_gid)
        assert "permission denied" in out, out
    finally:
        srv.close()


# ---- a real run -----------------------------------------------------------------------------
def ctl(*args, sock: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipemax.ctl", *args, "--socket", sock],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_a_run_driven_through_the_socket(tmp_path):
    n = 120
    rows = [{"custom_id": f"r{i}", "prompt": [3 + i % 50, 4, 5], "max_tokens": 40,
             "ignore_eos": True, "temperature": 0} for i in range(n)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.jsonl"
    sock = str(tmp_path / "run.sock")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipemax.launch", "--device", "cpu",
                             "--threads", "1", "--gpus", "2", "--input", str(inp), "--output",
                             str(out), "--max-num-seqs", "8", "--socket", sock],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_first_result(proc, out)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        abuse(sock)                                       # while it runs
        if IS_ROOT:
            assert "PermissionError" in as_other_user(
                lambda: request(sock, {"cmd": "status"}, timeout=5))
        p = ctl("pause", sock=sock)
        assert p.returncode == 0 and '"phase": "paused"' in p.stdout, p.stderr
        time.sleep(0.5)                                   # the micro-batches in flight land
        done = len(out.read_text().splitlines())
        st = request(sock, {"cmd": "status"})
        assert st["phase"] == "paused" and st["paused"] and st["requests"]["total"] == n
        assert st["kv"]["gpu_total"] > 0 and len(st["stages"]) == 2
        time.sleep(1.0)
        assert len(out.read_text().splitlines()) == done  # paused: nothing finishes
        # (half: the run reads far ahead, so every line would be found and cancelled)
        p = ctl("cancel", *[f"r{i}" for i in range(n // 2)], "nope", sock=sock)
        assert p.returncode == 0, p.stderr
        results = dict(l.split(": ", 1) for l in p.stdout.splitlines())
        assert results["nope"] == "not found"
        cancelled = {k for k, v in results.items() if v.startswith("cancelled")}
        assert any(v == "cancelled (running)" for v in results.values()), results
        assert any(v == "cancelled (waiting)" for v in results.values()), results
        p = ctl("status", sock=sock)
        assert p.returncode == 0 and "paused" in p.stdout, p.stdout
        p = ctl("metrics", sock=sock)
        check_prometheus(p.stdout)
        assert ctl("resume", sock=sock).returncode == 0
        deadline = time.monotonic() + 30
        while len(out.read_text().splitlines()) <= done + len(cancelled) + 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert ctl("drain", sock=sock).returncode == 0
        _, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert "draining (drain command)" in err and "drained" in err
    assert not os.path.exists(sock)
    first = read_results(out)
    assert len(first) < n                                # the drain left work for later
    for cid in cancelled:
        assert first[cid]["error"]["code"] == "cancelled"
    p = run_cli(["--gpus", "2", "--input", str(inp), "--output", str(out), "--no-socket"])
    assert p.returncode == 0, p.stderr
    final = read_results(out)                            # asserts no custom_id twice
    assert set(final) == {f"r{i}" for i in range(n)}
    for cid, line in final.items():
        if cid in cancelled:
            assert line["error"]["code"] == "cancelled"
        else:
            assert line["error"] is None
            assert line["response"]["body"]["usage"]["completion_tokens"] == 40


def test_ctl_client_exit_codes_and_socket_discovery(server, tmp_path, capsys, monkeypatch):
    from pipemax.ops import ctl
    from pipemax.ops.sockets import live_sockets
    srv, eng = server
    time.sleep(0.1)
    assert ctl.main(["status", "--socket", srv.path]) == 0
    assert "phase      running" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "x"}])
    assert ctl.main(["--socket", srv.path, "submit", "in.jsonl", "out.jsonl"]) == 0
    assert eng.applied[-1]["input"] == os.path.abspath("in.jsonl")        # made absolute
    with pytest.raises(SystemExit):
        ctl.main(["cancel", "--socket", srv.path])                          # nothing to cancel
    assert ctl.main(["status", "--socket", str(tmp_path / "none.sock")]) == 2
    bare = ControlServer(str(tmp_path / "bare.sock"))                       # no metrics
    bare.start()
    try:
        assert ctl.main(["metrics", "--socket", bare.path]) == 1
        assert "metrics are not available" in capsys.readouterr().err
    finally:
        bare.close()
    d = tmp_path / "run"
    d.mkdir()
    mine = ControlServer(str(d / f"pipemax-{os.getpid()}.sock"))
    mine.start()
    try:
        assert mine.path in live_sockets({"XDG_RUNTIME_DIR": str(d)})
        monkeypatch.setenv("PIPEMAX_SOCKET", mine.path)
        assert ctl.find_socket(None) == mine.path
    finally:
        mine.close()
    assert mine.path not in live_sockets({"XDG_RUNTIME_DIR": str(d)})
