"""Errors that reach the user as one line: ``protlm: error: <message>``."""

from __future__ import annotations

import re
from typing import Optional


class ProtlmError(Exception):
    """A user-facing error; its message is one line, printed without a traceback."""


class InputError(ProtlmError):
    """Bad input that stops a run: names the file, the line and the reason.

    Attributes:
      path: the file (or glob) the problem was found in.
      line: 1-based line number, or 0 when the problem concerns the whole file
        (e.g. the path cannot be opened).
      reason: a short human-readable reason.
    """

    def __init__(self, path: str, line: int, reason: str):
        self.path = str(path)
        self.line = int(line)
        self.reason = reason
        super().__init__(f"{self.path}:{self.line}: {reason}")

    def __reduce__(self):  # Picklable across Beam workers.
        return (InputError, (self.path, self.line, self.reason))


# Libraries whose exceptions, when they reach the command line, are about the
# user's files or settings (unreadable checkpoint, bad TFRecord, gin value),
# not about our code: they are shown as one line. Anything else keeps its
# traceback, which is then the bug report.
_ENVIRONMENT_MODULES = ("orbax", "tensorstore", "tensorflow", "gin", "h5py", "safetensors")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_GIN_SUFFIX = re.compile(r"\s*In call to configurable .*$", re.S)


def one_line(error: BaseException | str, limit: int = 400) -> str:
    """An error's message as one line: no ANSI colours, no gin call suffix,
    whitespace collapsed, at most ``limit`` characters."""
    text = _GIN_SUFFIX.sub("", _ANSI.sub("", str(error)))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _raised_in(error: BaseException) -> set:
    modules, tb = set(), error.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        modules.add(name.split(".")[0])
        tb = tb.tb_next
    modules.add(type(error).__module__.split(".")[0])
    return modules


def _h5_reason(text: str) -> str:
    """HDF5's long write-failure text cut to its cause (``No space left on device``)."""
    m = re.search(r"error message = '([^']+)'", text)
    return f"{text.split(' (', 1)[0]}: {m[1]}" if m else text


def from_environment(error: BaseException) -> Optional[str]:
    """The one-line message for an error from the environment, or None (a bug).

    ``OSError`` (full disk, read-only folder, missing file) names the file;
    errors raised inside orbax, TensorStore, TensorFlow (tf.data), gin, h5py
    or safetensors name their library.
    """
    if isinstance(error, OSError):
        where = error.filename or ""
        reason = error.strerror or _h5_reason(one_line(error))
        if error.filename2:
            where = f"{where} -> {error.filename2}"
        return one_line(f"{where}: {reason}" if where else reason)
    if isinstance(error, MemoryError):
        return "out of memory (a smaller batch, token budget or model)"
    libraries = [m for m in _ENVIRONMENT_MODULES if m in _raised_in(error)]
    if libraries or "In call to configurable" in str(error):
        origin = libraries[-1] if libraries else "gin"
        return f"{origin}: {type(error).__name__}: {one_line(error)}"
    return None
