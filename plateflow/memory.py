"""How a refresh process gets memory for decoded plates.

A 30-60 MP plate decodes into a buffer of hundreds of MB, and its statistics make a few more of
tens of MB. glibc's malloc serves each such request with a fresh ``mmap`` and returns it to the
kernel when it is freed, so the next plate's buffers are faulted in again, page by page: on these
machines a third as much time as the decoding itself (``benchmarks/cpu_stage.py``). Asked once,
before the refresh starts its threads, ``reuse_freed_memory`` has malloc take every request
from one heap (one arena, no mmap) and keep what is freed there, so each plate reuses the
pages of the one before it. The process's memory then stays at its high-water mark until it
exits: right for a refresh process, which ends with its run.

It must be asked before a second thread allocates (glibc fixes its number of arenas then, and
numpy's import starts threads): ``plateflow``'s batch commands ask first thing, and the work
pool's flow runs get the same settings from their environment (``GLIBC_ENV``, prefect.yaml).
``PLATEFLOW_MALLOC=system`` leaves malloc as it is; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 2**31 - 1
# The same settings as glibc reads them from the environment of a new process: prefect.yaml gives
# them to the flow runs of the work pool (tests/unit/plateflow/test_memory.py checks they agree).
GLIBC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
_done = False


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse in one heap; True if it was set (now or
    before in this process, or by the environment), False where it cannot be (not glibc) or is
    not wanted."""
    global _done
    if _done or all(os.environ.get(k) == v for k, v in GLIBC_ENV.items()):
        return True
    if os.environ.get("PLATEFLOW_MALLOC", "").lower() == "system" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # One arena (threads share the heap that keeps the pages), no mmap for large blocks, and no
    # trimming of the heap's top: every 1 that mallopt returns means the setting took.
    _done = all(mallopt(param, value) == 1 for param, value in
                ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _done
