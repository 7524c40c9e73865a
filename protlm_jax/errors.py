"""Errors that reach the user as one line: ``protlm: error: <message>``."""


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
