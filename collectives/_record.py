"""Fingerprints, positions, call sites and the flight recorder.

A *fingerprint* is what travels with every payload: (seq, op, root, reduce_op, site, tag,
extra). Two ranks agree when their keys are equal; the key uses the tag in place of the site
when a tag is given, so code that issues one logical collective from two lines can say so.
The flight recorder is a bounded ring of the last calls on one communicator; it is what gets
dumped to the log on a desync, a timeout, the watchdog or SIGUSR1.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any

import attrs

# Frames whose module name starts with this are ours: the call site is the first frame after.
_OWN_PREFIX = "kvhandoff.collectives"
# Per (code, instruction offset): the site string, or _OWN for a frame of ours (the walk goes
# on to its caller), so a warm lookup is one dict hit per frame (no module-name test, no
# line-table lookup, no string formatting).
_OWN = ""
_site_cache: dict[tuple[Any, int], str] = {}


def call_site(skip: int = 2) -> str:
    """``"file.py:LINE function"`` of the first frame outside kvhandoff.collectives.

    A cheap walk of ``f_back`` (no ``inspect.stack``), cached per (code, instruction)."""
    frame = sys._getframe(skip)
    cache = _site_cache
    while frame is not None:
        key = (frame.f_code, frame.f_lasti)
        site = cache.get(key)
        if site is None:
            code = frame.f_code
            if frame.f_globals.get("__name__", "").startswith(_OWN_PREFIX):
                site = _OWN
            else:
                site = f"{code.co_filename}:{frame.f_lineno} {code.co_name}"
            if len(cache) < 65536:
                cache[key] = site
        if site:  # _OWN is the only empty one
            return site
        frame = frame.f_back  # type: ignore[assignment]
    return "<unknown>:0 <unknown>"


# Exact builtin types whose summary depends only on (type, len) or (type, value): memoized,
# because formatting a string per call costs more than the rest of the bookkeeping.
_SIZED = frozenset((list, tuple, dict, set, frozenset, str, bytes))
_summary_cache: dict[Any, str] = {}
_buffer_summary_cache: dict[tuple[Any, ...], str] = {}


def summarize(obj: object) -> str:
    """A short, cheap description of a payload for the flight recorder (type, length,
    shape/dtype for arrays); never the content."""
    kind = type(obj)
    if kind in _SIZED:
        key: Any = (kind, len(obj))  # type: ignore[arg-type]
    elif obj is None or kind is bool:
        key = obj
    elif kind is int or kind is float:
        key = kind
    else:
        return _summarize(obj)
    found = _summary_cache.get(key)
    if found is None:
        found = _summarize(obj)
        if len(_summary_cache) < 4096:
            _summary_cache[key] = found
    return found


def summarize_buffer(extra: tuple[Any, ...]) -> str:
    """The flight recorder's summary of a buffer call from its (kind, dtype, shape)."""
    found = _buffer_summary_cache.get(extra)
    if found is None:
        found = f"{extra[0]}{extra[2]} {extra[1]}"
        if len(_buffer_summary_cache) < 4096:
            _buffer_summary_cache[extra] = found
    return found


def _summarize(obj: object) -> str:
    shape = getattr(obj, "shape", None)
    if shape is not None:
        return f"{type(obj).__name__}{tuple(shape)} {getattr(obj, 'dtype', '')}".rstrip()
    if isinstance(obj, (list, tuple, dict, set, frozenset, str, bytes)):
        return f"{type(obj).__name__}[{len(obj)}]"
    if obj is None or isinstance(obj, (bool, int, float)):
        return repr(obj) if isinstance(obj, bool) or obj is None else type(obj).__name__
    return type(obj).__name__


@attrs.frozen
class Fingerprint:
    """What one rank said it was doing at one collective: compared across ranks."""

    seq: int
    op: str
    site: str
    tag: str | None = None
    root: int | None = None
    reduce_op: str | None = None
    extra: tuple[Any, ...] | None = None  # buffer ops: (dtype, shape)

    def key(self) -> tuple[Any, ...]:
        """The part that must be equal on every rank: the tag replaces the site."""
        where = ("tag", self.tag) if self.tag is not None else ("site", self.site)
        return (self.seq, self.op, self.root, self.reduce_op, where, self.extra)

    def to_wire(self) -> tuple[Any, ...]:
        return (self.seq, self.op, self.site, self.tag, self.root, self.reduce_op, self.extra)

    @classmethod
    def from_wire(cls, wire: tuple[Any, ...]) -> Fingerprint:
        return cls(*wire)

    def describe(self) -> str:
        parts = [f"seq {self.seq} {self.op}"]
        if self.root is not None:
            parts.append(f"root={self.root}")
        if self.reduce_op is not None:
            parts.append(f"op={self.reduce_op}")
        if self.extra is not None:
            parts.append(f"buffer={self.extra}")
        if self.tag is not None:
            parts.append(f"tag={self.tag!r}")
        parts.append(f"at {self.site}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The log schema's per-rank entry of ``collective.desync``."""
        return {"seq": self.seq, "op": self.op, "site": self.site, "tag": self.tag,
                "root": self.root, "reduce_op": self.reduce_op}


@attrs.frozen
class Position:
    """Where a rank was in its collective sequence on one communicator."""

    seq: int
    op: str
    site: str
    tag: str | None
    state: str  # pending, completed, failed, desync, timeout

    def describe(self) -> str:
        tag = f" tag={self.tag!r}" if self.tag is not None else ""
        return f"seq {self.seq} {self.op}{tag} at {self.site} ({self.state})"

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "op": self.op, "site": self.site, "tag": self.tag,
                "state": self.state}

    def to_wire(self) -> tuple[Any, ...]:
        return (self.seq, self.op, self.site, self.tag, self.state)


@attrs.define(slots=True)
class RecordEntry:
    """One call in the flight recorder; mutable because end and state arrive later."""

    seq: int
    op: str
    site: str
    tag: str | None
    summary: str
    start: float
    deadline: float
    end: float | None = None
    state: str = "pending"
    watchdog_dumped: bool = False

    def position(self) -> Position:
        return Position(self.seq, self.op, self.site, self.tag, self.state)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "op": self.op, "site": self.site, "tag": self.tag,
                "summary": self.summary, "start": self.start, "end": self.end,
                "state": self.state}


class FlightRecorder:
    """A bounded ring of the last ``capacity`` calls of one rank on one communicator.

    Appends come from the rank's own thread; snapshots may come from the watchdog thread.
    Both ``deque.append`` and ``list(deque)`` run in C under the GIL, so no lock is needed."""

    def __init__(self, capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError(f"flight recorder capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._ring: collections.deque[RecordEntry] = collections.deque(maxlen=capacity)

    def start(self, seq: int, op: str, site: str, tag: str | None, summary: str,
              deadline_s: float) -> RecordEntry:
        # CheckedComm inlines this (RecordEntry + _ring.append) on its hot path.
        now = time.time()
        entry = RecordEntry(seq, op, site, tag, summary, now, now + deadline_s)
        self._ring.append(entry)
        return entry

    def entries(self) -> list[RecordEntry]:
        """A copy of the ring, oldest first."""
        return list(self._ring)

    def last_position(self) -> Position | None:
        ring = list(self._ring)
        return ring[-1].position() if ring else None

    def pending(self) -> list[RecordEntry]:
        return [e for e in list(self._ring) if e.state == "pending"]
