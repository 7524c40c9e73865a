"""The allocator environment of CPU runs (protlm_jax.host_memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from protlm_jax import host_memory

# A worker thread (as XLA:CPU's are) frees a 64 MB block and asks for it
# again, after a restart under host_memory.reexec_tuned.
_THREAD_FAULTS = """
import os, resource, threading
from protlm_jax import host_memory
host_memory.reexec_tuned()
import numpy as np
host_memory.retain_freed_memory()      # what Trainer and Embedder do as well
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
out = []
def work():
    a = np.ones(16 << 20, np.float32); del a
    before = faults()
    for _ in range(4):
        a = np.ones(16 << 20, np.float32); del a
    out.append((faults() - before) / 4)
t = threading.Thread(target=work); t.start(); t.join()
print(os.environ.get("GLIBC_TUNABLES", "-"), out[0])
"""


def test_tuned_environ_adds_only_what_is_missing():
    base = {"PATH": "/bin", "JAX_PLATFORMS": "cpu"}
    env = host_memory.tuned_environ(base)
    if env is None:
        pytest.fail("a Linux glibc host with JAX_PLATFORMS=cpu gets the tunables")
    items = env["GLIBC_TUNABLES"].split(":")
    assert sorted(items) == sorted(f"{k}={v}" for k, v in host_memory.TUNABLES.items())
    assert env["PATH"] == "/bin" and "GLIBC_TUNABLES" not in base
    # A value the user set is kept, the others are added after it.
    mine = dict(base, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    items = host_memory.tuned_environ(mine)["GLIBC_TUNABLES"].split(":")
    assert items[0] == "glibc.malloc.arena_max=4" and len(items) == len(host_memory.TUNABLES)
    # Nothing to change: all named already, or opted out.
    assert host_memory.tuned_environ(dict(base, GLIBC_TUNABLES=env["GLIBC_TUNABLES"])) is None
    assert host_memory.tuned_environ(dict(base, PROTLM_MALLOC_TUNING="0")) is None


@pytest.mark.parametrize("tuning", ["1", "0"])
def test_restart_under_tunables_reuses_a_threads_freed_blocks(tuning):
    # mallopt alone (tuning "0" turns both off; the mallopt-only case is the
    # Embedder's test) does not reach a worker thread's arena: only the
    # restart's GLIBC_TUNABLES make the thread's 64 MB block come back
    # without page faults.
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "PROTLM_MALLOC_REEXEC")}
    env.update(PROTLM_MALLOC_TUNING=tuning, JAX_PLATFORMS="cpu")
    tunables, faults = subprocess.run(
        [sys.executable, "-c", _THREAD_FAULTS], check=True, text=True, capture_output=True,
        env=env).stdout.split()
    if tuning == "1":
        assert "glibc.malloc.arena_max=1" in tunables and float(faults) < 8
    else:
        assert tunables == "-" and float(faults) >= 32


def test_mallopt_alone_leaves_a_threads_blocks_faulting():
    # Why the restart exists: with only retain_freed_memory's mallopt, the
    # worker thread's block is still unmapped and faulted in again.
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(PROTLM_MALLOC_REEXEC="1", JAX_PLATFORMS="cpu")
    _, faults = subprocess.run(
        [sys.executable, "-c", _THREAD_FAULTS], check=True, text=True, capture_output=True,
        env=env).stdout.split()
    assert float(faults) >= 32
