"""pipemax installs one import name: stages/ and ipc/ are pipemax.stages and pipemax.ipc."""
import importlib
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_only_pipemax_is_installed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "pipemax" or p.startswith("pipemax.") for p in cfg["packages"])
    assert cfg["package-dir"] == {"pipemax.stages": "stages", "pipemax.ipc": "ipc"}
    on_disk = {p.parent.name for p in (ROOT / "pipemax").glob("*/__init__.py")}
    assert {p.split(".")[1] for p in cfg["packages"] if p.count(".") == 1} \
        == on_disk | {"stages", "ipc"}


def test_stages_and_ipc_import_under_pipemax_from_the_source_tree():
    worker = importlib.import_module("pipemax.stages.worker")
    ring = importlib.import_module("pipemax.ipc.ring")
    assert Path(worker.__file__).resolve() == ROOT / "stages" / "worker.py"
    assert Path(ring.__file__).resolve() == ROOT / "ipc" / "ring.py"
    assert "stages" not in sys.modules and "ipc" not in sys.modules


def test_no_module_imports_the_bare_names():
    bad = [f"{p.relative_to(ROOT)}: {line.strip()}"
           for folder in ("pipemax", "stages", "ipc", "tools", "tests")
           for p in (ROOT / folder).rglob("*.py")
           for line in p.read_text().splitlines()
           if line.lstrip().startswith(("from stages", "import stages", "from ipc ",
                                        "from ipc.", "import ipc"))]
    assert bad == []
