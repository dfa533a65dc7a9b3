"""Keep freed host memory inside the process, so large CPU tensors are not page-faulted in on every use.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
and hands it back to the kernel on ``free``. A training step on a CPU allocates and frees activations of
tens to hundreds of MiB many times over, so each one costs a round of page faults, which for a cheap
element-wise op (a GELU) can cost more than the op itself. Turning off ``mmap`` for large blocks
(``M_MMAP_MAX = 0``) and not trimming the heap (``M_TRIM_THRESHOLD``) keeps that memory in the
process, as PyTorch's CUDA caching allocator does on a GPU, and as preloading jemalloc or tcmalloc
would. The cost: the process keeps its peak heap until it exits.

This is a process-wide setting, so the library never applies it on import: ``clipforge.train.train``
applies it (a training run owns a long-running process; ``clipforge train`` and ``clipforge demo`` go
through it), and a program of your own can call ``retain_freed_memory`` at start.
``CLIPFORGE_RETAIN_FREED_MEMORY=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_VAR = "CLIPFORGE_RETAIN_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes: return memory only above 2 GiB of free top
_state: dict[str, bool] = {}


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it; True if the setting is in force.

    False, and nothing changed, where it does not apply: not Linux, a C library without ``mallopt``
    (musl), or ``CLIPFORGE_RETAIN_FREED_MEMORY=0`` in the environment. Calling it again is harmless.
    """
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if "applied" in _state:
        return _state["applied"]
    applied = False
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    _state["applied"] = applied
    return applied
