"""pipemax: offline batch LLM inference (pipeline stages on shared-memory rings, host KV offload).

``from pipemax import LLM, SamplingParams``: the Python API (pipemax/api.py); the command is
``python -m pipemax.launch`` (or ``pipemax run-batch``, pipemax/cli.py).
"""
import importlib.util as _util
import os as _os
import sys as _sys


def _beside(name: str) -> None:
    """In a source tree, stages/ and ipc/ sit beside this folder (installed, pyproject.toml's
    package-dir puts them inside it); either way they import as pipemax.stages, pipemax.ipc."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    folder = _os.path.join(_os.path.dirname(here), name)
    init = _os.path.join(folder, "__init__.py")
    if f"{__name__}.{name}" in _sys.modules or _os.path.isdir(_os.path.join(here, name)) \
            or not _os.path.isfile(init):
        return
    spec = _util.spec_from_file_location(f"{__name__}.{name}", init,
                                         submodule_search_locations=[folder])
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()[name] = module


_beside("stages")
_beside("ipc")

from pipemax.api import LLM, CompletionOutput, Logprob, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
