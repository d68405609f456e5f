"""Import a Triton kernel module for the tests: compiled on a GPU, else on CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1, set only while the module is imported)."""
import importlib
import os
import sys

import torch


def _interpreter_patches():
    """Triton 3.6's interpreter turns a scalar tensor into an int with int(ndarray of shape
    (1,)), which numpy >= 2.? refuses (a kernel loop with run-time bounds needs it)."""
    from triton.runtime import interpreter as ti
    orig = ti._patch_lang_tensor
    if getattr(orig, "_pipemax", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    patched._pipemax = True
    ti._patch_lang_tensor = patched


def load(name: str):
    """(module, device, why-skipped) for the kernel module ``name``."""
    if torch.cuda.is_available():
        try:
            td = importlib.import_module(name)
        except Exception as e:                               # pragma: no cover
            return None, None, f"CUDA but {name} fails to import ({e!r})"
        if not td._HAVE_TRITON:
            return None, None, "CUDA but triton is not importable"
        return td, torch.device("cuda"), None
    # No GPU: Triton's interpreter on CPU tensors. TRITON_INTERPRET must be set when triton
    # itself is imported (its own library functions are @jit too), so a triton imported
    # earlier in compiled mode is imported again. The variable is put back afterwards (the
    # knob keeps the interpreter on in this process), so processes that later tests start
    # do not inherit it.
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if "triton" in sys.modules:
            from triton.runtime.interpreter import InterpretedFunction
            import triton.language as tl
            if not isinstance(tl.sum, InterpretedFunction):
                for mod in [m for m in sys.modules if (m == "triton" or m.startswith("triton."))
                            and not m.startswith("triton._C")]:
                    del sys.modules[mod]
        import triton
        triton.knobs.runtime.interpret = True     # stays on in this process after the env goes
        _interpreter_patches()
        if "pipemax.stages.triton_import" in sys.modules:      # bound to the triton imported before
            importlib.reload(sys.modules["pipemax.stages.triton_import"])
        if name in sys.modules:
            td = importlib.reload(sys.modules[name])
        else:
            td = importlib.import_module(name)
    except Exception as e:                                   # pragma: no cover
        return None, None, f"no GPU, and triton's interpreter is not usable ({e!r})"
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    if not td._HAVE_TRITON:                                  # pragma: no cover
        return None, None, "no GPU, and triton is not importable"
    return td, torch.device("cpu"), None


