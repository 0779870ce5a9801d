"""The exceptions of kvhandoff.analysis. The tools are tolerant of what is in a log (bad
lines become notes); they raise only when there is nothing to read."""

from __future__ import annotations

__all__ = ["LogDirError"]


class LogDirError(Exception):
    """The log directory cannot be analyzed at all: it does not exist, cannot be listed, or
    holds no readable ``rank-<N>.jsonl`` file. ``path`` is the directory, ``reason`` says which.
    (``kvhandoff analyze`` exits 2 on it.)"""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot analyze {path}: {reason}; pass the directory that holds the "
            f"rank-<N>.jsonl files written by kvhandoff's logging"
        )
        self.path = path
        self.reason = reason
