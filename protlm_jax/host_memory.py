"""Host allocator settings for XLA:CPU programs.

XLA:CPU's fused kernels (YNNPACK) and the buffers of each program run come
from ``malloc``. glibc serves blocks above its mmap threshold (at most 32 MB)
with a fresh ``mmap`` and unmaps them on ``free``, so a [B, H, T, S] attention
block of tens of megabytes is page-faulted in again, page by page, on every
call: on a 2-core VM that can cost more than the arithmetic. Serving every block
from the heap and keeping freed memory for reuse (what the ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=...`` environment variables do, or what jemalloc /
tcmalloc do by default) removes that cost (``benchmarks/README.md``, embed.py).

The cost is that the process keeps its peak heap until it exits instead of
handing freed blocks back to the kernel. Peak resident memory is unchanged
(embedding one 5k / 20k-residue protein: 1,240 / 1,637 MB with it, 1,260 /
1,640 MB without; prot_t5_base width, one layer).

``Embedder`` and ``Trainer`` make the setting when built; set
``PROTLM_MALLOC_TUNING=0`` to leave the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2 ** 31 - 1   # mallopt takes an int: keep up to 2 GiB of free top

_applied = None


def retain_freed_memory() -> bool:
    """Makes glibc serve large blocks from its heap and keep freed ones.

    Idempotent; a no-op (returning False) off glibc, when mallopt is missing
    or refuses, or with ``PROTLM_MALLOC_TUNING=0``. Returns whether the
    settings are in effect.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("PROTLM_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied
