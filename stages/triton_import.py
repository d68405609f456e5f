"""Triton for the kernel modules (``stages/triton_*.py``), when it can be imported: ``triton``,
``tl`` and ``HAVE_TRITON``; without it their callers keep the torch paths. The tests import
this module again under Triton's interpreter before the kernel module (tests/triton_env.py).
"""
try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:                       # pragma: no cover - no triton: torch paths only
    triton = None
    tl = None
    HAVE_TRITON = False
