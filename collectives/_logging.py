"""Per-rank JSON-lines logs (docs/log-schema.md).

``configure_logging(log_dir)`` points every rank's logger at ``<log_dir>/rank-<N>.jsonl``;
``rank_logger(rank)`` returns a structlog logger whose lines carry ``ts``, ``rank``, ``event``
and ``level`` first, then the event's keys. With no log directory configured, events are
dropped by the first processor, before any formatting. Several in-process ranks share one
process: each file has its own cached handle and lock, and every line is flushed as written so
that a killed process leaves only complete lines.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO, Any

import structlog

_lock = threading.Lock()
_log_dir: Path | None = None
_per_call = False
_files: dict[int, tuple[IO[str], threading.Lock]] = {}
_loggers: dict[int, Any] = {}


def configure_logging(log_dir: str | Path | None, *, per_call: bool = False) -> None:
    """Write events to ``<log_dir>/rank-<N>.jsonl`` (created if needed), or nowhere when
    ``log_dir`` is None. ``per_call`` turns on ``collective.enter`` / ``collective.exit`` for
    every call (costs time; the flight recorder keeps the same data in memory anyway).
    Files already open are closed; later lines append to the new directory's files."""
    global _log_dir, _per_call
    with _lock:
        for handle, file_lock in _files.values():
            with file_lock:
                handle.close()
        _files.clear()
        if log_dir is not None:
            path = Path(log_dir)
            path.mkdir(parents=True, exist_ok=True)
            _log_dir = path
        else:
            _log_dir = None
        _per_call = bool(per_call)


def logging_enabled() -> bool:
    """True when a log directory is configured."""
    return _log_dir is not None


def per_call_logging() -> bool:
    """True when collective.enter / collective.exit are written for every call."""
    return _per_call and _log_dir is not None


def _file_for(rank: int) -> tuple[IO[str], threading.Lock] | None:
    found = _files.get(rank)
    if found is not None:
        return found
    with _lock:
        found = _files.get(rank)
        if found is None:
            if _log_dir is None:
                return None
            # Line-buffered append: each event is one complete line on disk when written.
            handle = open(_log_dir / f"rank-{rank}.jsonl", "a", buffering=1, encoding="utf-8")
            found = (handle, threading.Lock())
            _files[rank] = found
        return found


class _RankWriter:
    """structlog's output object: every level method writes one rendered line."""

    def __init__(self, rank: int) -> None:
        self._rank = rank

    def msg(self, line: str) -> None:
        target = _file_for(self._rank)
        if target is None:
            return
        handle, file_lock = target
        with file_lock:
            if handle.closed:
                return
            handle.write(line + "\n")
            handle.flush()

    debug = info = warning = error = critical = msg


def _drop_when_disabled(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    if _log_dir is None:
        raise structlog.DropEvent
    return event


def _order_keys(_logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
    # Schema order: ts, rank, event, level, then the event's own keys.
    ordered: dict[str, Any] = {
        "ts": time.time(),
        "rank": event.pop("rank"),
        "event": event.pop("event"),
        "level": "warning" if name in ("warn", "warning") else name,
    }
    ordered.update(event)
    return ordered


def _render(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
    return json.dumps(event, default=repr, separators=(",", ":"))


def rank_logger(rank: int) -> Any:
    """A structlog logger for ``rank`` (``.debug/.info/.warning/.error(event, **keys)``).

    Cached per rank; it follows later ``configure_logging`` calls."""
    found = _loggers.get(rank)
    if found is None:
        found = structlog.wrap_logger(
            _RankWriter(rank),
            processors=[_drop_when_disabled, _order_keys, _render],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            context_class=dict,
        ).bind(rank=rank)
        _loggers[rank] = found
    return found
