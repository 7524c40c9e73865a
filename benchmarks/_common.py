"""Helpers shared by the benchmark scripts (JSON lines on a clean stdout)."""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from typing import TextIO


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
