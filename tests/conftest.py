import fcntl
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)   # tiny models: more threads only fight the stage processes for cores

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

_OWNER = re.compile(r"^(?:sem\.)?pipemax-(\d+)-")


def _ours() -> set[str]:
    """pipemax objects in /dev/shm owned by this process or by a process that is gone
    (objects of other live processes, e.g. a concurrent test run, are not ours to judge)."""
    from pipemax.ipc.names import pid_alive
    out = set()
    for n in os.listdir("/dev/shm"):
        m = _OWNER.match(n)
        if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            out.add(n)
    return out


def _locked(path: Path, mode: int):
    f = open(path, "a+")
    fcntl.flock(f, mode)
    return f


@pytest.fixture(autouse=True)
def side_by_side(request):
    """Under pytest-xdist tests run side by side, but a test marked ``alone`` runs with no
    other: it kills a driver, whose shared memory stays in /dev/shm until the next start
    removes it as a dead run's, and any other test's check below, or any other pipemax start,
    would take it for its own. Every test holds a shared lock, an ``alone`` test the
    exclusive one, taken through a turnstile so that it does not wait behind a stream of
    shared holders. One process alone (no xdist) takes no locks."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        yield
        return
    base = Path(tempfile.gettempdir()) / f"pipemax-tests-{run}"
    alone = request.node.get_closest_marker("alone") is not None
    gate = _locked(base.with_suffix(".gate"), fcntl.LOCK_EX)
    try:
        held = _locked(base.with_suffix(".lock"), fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
    finally:
        if not alone:
            gate.close()
    try:
        yield
    finally:
        held.close()
        if alone:
            gate.close()


@pytest.fixture(autouse=True)
def no_shm_left_behind(side_by_side):
    """Every test must leave /dev/shm as it found it."""
    before = _ours()
    yield
    left = _ours() - before
    assert not left, f"shared-memory objects left behind: {sorted(left)}"


@pytest.fixture
def run_id():
    """A unique run id; the test must remove all of its objects itself."""
    from pipemax.ipc import names
    rid = names.new_run_id()
    yield rid
    left = names.run_objects(rid)
    names.cleanup_run(rid)
    assert left == [], f"test left shared-memory objects behind: {left}"
    assert names.run_objects(rid) == []


@pytest.fixture
def ring_pair(run_id):
    """``ring_pair(name, capacity)``: a ring of the test's run created (the writer) and
    attached (the reader); both closed and the ring removed after the test."""
    from pipemax.ipc import names
    from pipemax.ipc.ring import Ring
    made = []

    def make(name: str, capacity: int):
        w = Ring.create(names.shm_name(run_id, name), capacity)
        r = Ring.attach(w.name)
        made.append((w, r))
        return w, r
    yield make
    for w, r in made:
        r.close()
        w.close()
        w.unlink()


from pipemax.tiny import default_cache_dir  # noqa: E402  (after the path is set)

_USER_CACHE = default_cache_dir()


@pytest.fixture(scope="session")
def user_cache() -> Path:
    """The user's pipemax cache, as it was before ``tiny_cache``: for what is slow to make and
    the same on every run (the real model's conversion)."""
    return _USER_CACHE


@pytest.fixture(autouse=True, scope="session")
def tiny_cache(tmp_path_factory):
    """Keep the built-in tiny model out of the user's cache."""
    d = tmp_path_factory.mktemp("pipemax-cache")
    old = os.environ.get("PIPEMAX_CACHE")
    os.environ["PIPEMAX_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("PIPEMAX_CACHE", None)
    else:
        os.environ["PIPEMAX_CACHE"] = old
