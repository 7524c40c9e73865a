"""Helpers shared by the benchmark scripts (JSON lines on a clean stdout)."""

from __future__ import annotations

import json
import os
import sys
import time
from importlib import metadata
from typing import Callable, TextIO


def claim_stdout() -> TextIO:
    """Returns a private handle on stdout and points fd 1 at stderr.

    TensorFlow, absl, XLA, Beam and transformers may write to fd 1 from C++ as
    well as Python, and the JSON lines must be the only thing on stdout; so the
    JSON goes through a duplicate of the original fd 1 and everything else
    lands on stderr.
    """
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(json_fd, "w", buffering=1)


def version(package: str) -> str:
    """The installed version of ``package`` (from metadata: no import needed)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def round5(value: float) -> float:
    """Five significant digits: enough for any comparison, short enough to read."""
    return float(f"{value:.5g}")


def _clean(value):
    if isinstance(value, float):
        return round5(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Reporter:
    """Writes one JSON line per measurement, with the shared context added."""

    def __init__(self, stream: TextIO, common: dict):
        self._stream = stream
        self._common = common
        self.lines: list[dict] = []

    def emit(self, benchmark: str, value: float, unit: str, **context) -> dict:
        line = {"benchmark": benchmark, "value": round5(float(value)), "unit": unit}
        line.update(_clean(context))
        # The load now, not only at start: other jobs may share this machine.
        line["loadavg_1m_now"] = round(os.getloadavg()[0], 2)
        line.update(self._common)
        self.lines.append(line)
        self._stream.write(json.dumps(line) + "\n")
        return line


# The float32 matmul peak, the denominator of every benchmark's MFU.

def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_timer(size: int, repeats: int) -> Callable[[], tuple[float, float]]:
    """A function timing float32 ``size``x``size`` products: best of
    ``repeats`` seconds of a jitted ``jnp.dot`` and of ``torch.mm``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((size, size), np.float32) for _ in range(2))
    a, b, dot = jnp.asarray(a_np), jnp.asarray(b_np), jax.jit(jnp.dot)
    at, bt = torch.from_numpy(a_np), torch.from_numpy(b_np)

    def timer() -> tuple[float, float]:
        with torch.no_grad():
            return (best_time(lambda: dot(a, b).block_until_ready(), repeats),
                    best_time(lambda: torch.mm(at, bt), repeats))

    return timer


def matmul_rate_probe(size: int, repeats: int = 3) -> Callable[[], float]:
    """A function measuring the float32 matmul rate now (FLOP/s, the higher of
    jax and torch). For re-measuring the peak between timings."""
    timer = matmul_timer(size, repeats)
    return lambda: 2.0 * size ** 3 / min(timer())


def bench_peak(report: Reporter, size: int, repeats: int) -> float:
    import torch

    torch.set_num_threads(os.cpu_count())
    t_jax, t_torch = matmul_timer(size, repeats)()
    jax_rate, torch_rate = 2.0 * size ** 3 / t_jax, 2.0 * size ** 3 / t_torch
    common = {"size": size, "repeats": repeats, "dtype": "float32"}
    report.emit("peak/jax_dot", jax_rate, "FLOP/s", seconds=t_jax, **common)
    report.emit("peak/torch_mm", torch_rate, "FLOP/s", seconds=t_torch,
                torch_threads=torch.get_num_threads(), **common)
    peak = max(jax_rate, torch_rate)
    # Context only: on a small cache-sharing VM the 2048 product (48 MB of
    # operands) can run well below what smaller, cache-resident products reach.
    by_size = {n: dict(zip(("jax", "torch"), (2.0 * n ** 3 / t
                                              for t in matmul_timer(n, repeats)())))
               for n in (512, 1024) if n < size}
    report.emit("peak/flops", peak, "FLOP/s", source="jax" if jax_rate >= torch_rate
                else "torch", other_sizes=by_size, **common)
    return peak
