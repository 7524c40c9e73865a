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

``mallopt`` at run time does not reach everything, though. XLA:CPU's worker
threads allocate from glibc's per-thread arenas, and a non-main arena still
serves a large block with a fresh ``mmap`` whatever ``M_MMAP_MAX`` says; and
``mallopt`` takes an ``int``, so at most 2 GiB of free heap is kept, against
the ~6 GB of buffers one prot_t5_small train step (B=8, 512+512) frees. A
train step therefore still page-faulted ~1.6 million pages (6.5 GB) per step,
4-5 s of kernel time on two cores. :func:`tuned_environ` gives the
environment that fixes it from process start (one arena, no mmap, a 1 TiB
trim threshold, 1 GiB heap growth, through ``GLIBC_TUNABLES``), and :func:`reexec_tuned`
restarts the program under it: ``protlm train``/``finetune`` and the
training benchmarks do that first thing. Measured on prot_t5_small: 0 page faults per
step after the first, and the step 8.4-10.1 s -> 5.7-6.0 s
(``benchmarks/README.md``, ``variant/.../allocator``).

The price: the heap keeps its peak for the life of the process and, with one
arena, different shapes one after another fragment it. A process that runs
prot_t5_small and then prot_t5_base, each next to its torch baseline
(``benchmarks/train_step.py --models prot_t5_small,prot_t5_base``), grew to
24 GB and was killed; prot_t5_base with its baseline alone peaks at 17.4 GB.
So the restart is for programs that repeat one step (training), not for
embedding with varying buckets.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from typing import Mapping, Optional

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2 ** 31 - 1   # mallopt takes an int: keep up to 2 GiB of free top

_applied = None

# What tuned_environ adds to GLIBC_TUNABLES (glibc >= 2.26 reads them at
# start): every thread on the main arena, no mmap-served blocks, and freed
# heap kept up to 1 TiB, so a step's buffers are reused, never faulted in again;
# the heap grows 1 GiB at a time (address space only: pages are touched when
# used), which makes the first step's growth cheap (13 s -> 6.7 s for the
# first prot_t5_small step, against 6.0 s for the others).
TUNABLES = {"glibc.malloc.arena_max": "1", "glibc.malloc.mmap_max": "0",
            "glibc.malloc.trim_threshold": str(1 << 40), "glibc.malloc.top_pad": str(1 << 30)}
_REEXEC_MARK = "PROTLM_MALLOC_REEXEC"
# Hosts with an accelerator keep glibc's defaults: their steps do not run on
# the host's heap, and one arena could slow a many-threaded input pipeline.
_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*")


def _glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (ValueError, OSError, AttributeError):
        return ()
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) if name == "glibc" else ()


def tuned_environ(environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """``environ`` with :data:`TUNABLES` added to ``GLIBC_TUNABLES``, or None.

    None means nothing is to change: ``PROTLM_MALLOC_TUNING=0``, not Linux with
    glibc >= 2.26, an accelerator host (``/dev/nvidia*``, ``/dev/accel*``,
    unless ``JAX_PLATFORMS=cpu``), or every tunable already named (a value the
    user gave is kept as it is; only the missing ones are added).
    """
    environ = os.environ if environ is None else environ
    if environ.get("PROTLM_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    if _glibc_version() < (2, 26):
        return None
    if environ.get("JAX_PLATFORMS", "") != "cpu" and any(
            glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    named = {item.split("=", 1)[0] for item in current.split(":") if item}
    missing = [f"{k}={v}" for k, v in TUNABLES.items() if k not in named]
    if not missing:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([current, *missing] if current else missing)
    return env


def reexec_tuned() -> None:
    """Restarts this program (same pid, same command line) under
    :func:`tuned_environ`, when that changes anything; otherwise returns.

    Call it first thing in a program's entry point, before threads start or
    files are opened; it does not return when it restarts. Runs at most once
    per process tree (a marker variable stops a second restart).
    """
    env = tuned_environ()
    if env is None or os.environ.get(_REEXEC_MARK):
        return
    env[_REEXEC_MARK] = "1"
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def _tunables_in_effect() -> bool:
    named = {item.split("=", 1)[0] for item in os.environ.get("GLIBC_TUNABLES", "").split(":")}
    return "glibc.malloc.trim_threshold" in named


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
    if _tunables_in_effect():
        # Set at start (reexec_tuned or the user); mallopt's int would cut the
        # trim threshold back to 2 GiB.
        _applied = True
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied
