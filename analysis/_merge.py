"""One rank's collective calls, merged from every line that mentions them: the one merge
that ``kvhandoff analyze`` and ``kvhandoff trace`` both use, so that they say the same thing
about the same call.

Three sources can speak of one call (one communicator, one sequence number): its
``collective.enter`` line and its ``collective.exit`` line (per-call logging), and an entry in
any number of ``flight_recorder.dump`` lines. Each attribute of the call is taken from the
first source, in this order, that has it:

- identity (op, site, tag): the enter line, the exit line, the latest dump entry;
- payload summary: the enter line, the latest dump entry;
- start: the enter line's time, the latest dump entry's start (the dump's time when the
  entry has none), the exit line's time less its ``duration_s``;
- end: the exit line's time, the latest dump entry's end;
- state: the exit line's (``completed`` when it has none), the latest dump entry's, else
  ``pending`` (entered, nothing after).

Per-call lines are the call's own words, written as it happened, so they win; of several
dumps, the latest knows the most (an entry only moves on: pending, then an end and a state).
"Latest" is the last in the file, which is the order they were written in.

Speed: the bulk of a big log (``collective.enter`` / ``exit`` lines) is taken as columns, one
C-level pass (``map`` with an ``attrgetter`` into ``np.fromiter`` or a dict method) per
attribute over all lines of an event, not with a Python statement per line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import count
from operator import attrgetter
from typing import Any

import attrs
import numpy as np
from kvhandoff.analysis._reader import Line
from kvhandoff.analysis._report import CallPosition

__all__ = [
    "PENDING",
    "STATE_FROM_DUMP",
    "STATE_FROM_EXIT",
    "STATE_FROM_NOTHING",
    "TIMEOUT",
    "CallIdentity",
    "CallLog",
    "merge_calls",
]

PENDING = "pending"
TIMEOUT = "timeout"
COMPLETED = "completed"

# Where a call's state comes from.
STATE_FROM_NOTHING = 0  # an enter line and nothing after it
STATE_FROM_EXIT = 1
STATE_FROM_DUMP = 2

CallIdentity = tuple[str | None, str | None, str | None]  # (op, site, tag)


@attrs.frozen(eq=False)
class CallLog:
    """One rank's calls on one communicator, one row per seq, rows sorted by seq.

    ``call`` indexes ``calls`` ((op, site, tag)); ``state`` indexes ``states`` (index 0 is
    ``pending``); ``summary`` indexes ``summaries`` (index 0 is None: not known);
    ``start`` / ``end`` / ``dumped_at`` are epoch seconds, NaN when unknown (``dumped_at``:
    when the latest dump holding the call was written)."""

    seqs: np.ndarray
    call: np.ndarray
    start: np.ndarray
    end: np.ndarray
    state: np.ndarray
    state_from: np.ndarray
    has_enter: np.ndarray
    dumped_at: np.ndarray
    summary: np.ndarray
    calls: tuple[CallIdentity, ...]
    states: tuple[str, ...]
    summaries: tuple[str | None, ...]

    @property
    def last_row(self) -> int:
        return len(self.seqs) - 1

    def row_of(self, seq: int) -> int | None:
        row = int(np.searchsorted(self.seqs, seq))
        return row if row < len(self.seqs) and int(self.seqs[row]) == seq else None

    def position(self, rank: int, row: int, at: float | None = None) -> CallPosition:
        """Row ``row`` as a position; with ``at``, its state as it was at that time."""
        op, site, tag = self.calls[int(self.call[row])]
        end = float(self.end[row])
        state = self.states[int(self.state[row])]
        if at is not None and not np.isnan(end) and end > at:
            state = PENDING
        start = float(self.start[row])
        source = (
            "collective.enter"
            if self.has_enter[row]
            else "collective.exit"
            if self.state_from[row] == STATE_FROM_EXIT
            else "flight_recorder.dump"
        )
        return CallPosition(
            rank,
            int(self.seqs[row]),
            op,
            site,
            tag,
            state,
            None if np.isnan(start) else start,
            source,
        )

    def position_of(self, rank: int, seq: int) -> CallPosition | None:
        row = self.row_of(seq)
        return None if row is None else self.position(rank, row)

    def last_position_at(self, rank: int, at: float) -> CallPosition | None:
        """The latest call this rank had started at or before ``at``."""
        started = np.flatnonzero(self.start <= at)
        return self.position(rank, int(started[-1]), at=at) if len(started) else None

    def fingerprint_keys(self) -> list[tuple[str | None, str | None]]:
        """Per entry of ``calls``: (op, tag or site), what must agree across ranks."""
        return [(op, tag or site) for op, site, tag in self.calls]


_SEQ = attrgetter("seq")
_TS = attrgetter("ts")
_IDENTITY = attrgetter("op", "site", "tag")
_ENTER_KEY = attrgetter("comm", "op", "site", "tag", "summary")
_EXIT_KEY = attrgetter("comm", "state")


def _interned(keys: list[Any], table: dict[Any, int]) -> np.ndarray:
    """Small integer ids of ``keys``, growing ``table`` (key -> id) as needed."""
    # Few distinct keys, many lines: find the new keys, then look every key up, both in C.
    for key in dict.fromkeys(keys):
        table.setdefault(key, len(table))
    return np.fromiter(map(table.__getitem__, keys), dtype=np.int32, count=len(keys))


def _factorize(keys: Iterable[Any], size: int) -> tuple[np.ndarray, list[Any]]:
    """Ids of ``size`` ``keys`` (0, 1, ... in order of first appearance), and the distinct
    keys in that order."""
    first: dict[Any, int] = {}
    # One C-level pass: setdefault gives each key the index of its first line. Only new keys
    # are kept, so a line's key tuple is freed at once (kept, they cost more in allocation
    # and garbage collection than the lookups do).
    first_row = np.fromiter(map(first.setdefault, keys, count()), dtype=np.int64, count=size)
    dense = np.zeros(size, dtype=np.int32)
    dense[np.fromiter(first.values(), dtype=np.int64, count=len(first))] = np.arange(len(first))
    return dense[first_row], list(first)


@attrs.frozen(eq=False)
class _Records:
    """The ``collective.enter`` or ``collective.exit`` lines of one communicator as columns:
    ``key`` indexes ``keys``, the event's (comm, ...) tuples of every communicator."""

    comm: str
    lines: Sequence[Line]
    seq: np.ndarray
    ts: np.ndarray
    key: np.ndarray
    keys: list[tuple[Any, ...]]

    @classmethod
    def by_comm(cls, lines: list[Line], key_of: attrgetter[Any]) -> dict[str, _Records]:
        """Lines that have a seq, by communicator ("" for none), in file order. Every column
        is taken over all lines at once (in C); a line without a seq is not a call record."""
        try:
            seq = np.fromiter(map(_SEQ, lines), dtype=np.int64, count=len(lines))
        except TypeError:  # a null seq
            lines = [line for line in lines if line.seq is not None]
            seq = np.fromiter(map(_SEQ, lines), dtype=np.int64, count=len(lines))
        ts = np.fromiter(map(_TS, lines), dtype=np.float64, count=len(lines))
        key, keys = _factorize(map(key_of, lines), len(lines))
        comm_of_key = [comm or "" for comm, *_ in keys]
        comms = dict.fromkeys(comm_of_key)
        if len(comms) <= 1:
            return {name: cls(name, lines, seq, ts, key, keys) for name in comms}
        grouped: dict[str, _Records] = {}
        codes = np.array([list(comms).index(name) for name in comm_of_key], dtype=np.int32)
        line_codes = codes[key]
        for code, name in enumerate(comms):
            rows = np.flatnonzero(line_codes == code)
            subset = list(map(lines.__getitem__, rows.tolist()))
            grouped[name] = cls(name, subset, seq[rows], ts[rows], key[rows], keys)
        return grouped

    @classmethod
    def empty(cls) -> _Records:
        none = np.empty(0, dtype=np.int64)
        return cls("", [], none, np.empty(0), np.empty(0, dtype=np.int32), [])

    def local_ids(self, table: dict[Any, int], part: slice | int) -> np.ndarray:
        """``key`` as ids of ``table`` (``key[part]`` -> id), growing it as needed."""
        remap = np.zeros(len(self.keys), dtype=np.int32)
        for index, key in enumerate(self.keys):
            if (key[0] or "") == self.comm:  # first appearance order, as the lines have them
                remap[index] = table.setdefault(key[part], len(table))
        return remap[self.key]


def merge_calls(
    enters: list[Line], exits: list[Line], dumps: list[Line], *, comm: str | None = None
) -> dict[str, CallLog]:
    """One rank's calls per communicator ("" for lines that name none), from its
    ``collective.enter``, ``collective.exit`` and ``flight_recorder.dump`` lines, each list
    in file order (see the module doc for which source wins). ``comm`` keeps only that
    communicator. Lines without a seq are not calls and are left out."""
    enter_records = _Records.by_comm(enters, _ENTER_KEY)
    exit_records = _Records.by_comm(exits, _EXIT_KEY)
    dumps_by_comm: dict[str, list[Line]] = {}
    for dump in dumps:
        dumps_by_comm.setdefault(dump.comm or "", []).append(dump)
    names = set(enter_records) | set(exit_records) | set(dumps_by_comm)
    if comm is not None:
        names &= {comm}
    merged = {
        name: _call_log(
            enter_records.get(name) or _Records.empty(),
            exit_records.get(name) or _Records.empty(),
            dumps_by_comm.get(name, []),
        )
        for name in sorted(names)
    }
    return {name: log for name, log in merged.items() if len(log.seqs)}


def _call_log(enters: _Records, exits: _Records, dumps: list[Line]) -> CallLog:
    identities: dict[CallIdentity, int] = {}
    states: dict[str | None, int] = {PENDING: 0}
    summaries: dict[str | None, int] = {None: 0}

    enter_seq, enter_ts = enters.seq, enters.ts
    enter_call = enters.local_ids(identities, slice(1, 4))
    enter_summary = enters.local_ids(summaries, 4)

    exit_seq, exit_ts = exits.seq, exits.ts
    exit_state = exits.local_ids(states, 1)
    # Where the enter line is there, it names the call and dates its start: only exits
    # without one (enter logging off) need their own identity and start.
    exit_only = np.flatnonzero(~np.isin(exit_seq, enter_seq)) if len(enter_seq) else None
    lone_exits = (
        list(exits.lines) if exit_only is None else [exits.lines[i] for i in exit_only.tolist()]
    )
    lone_call = _interned(list(map(_IDENTITY, lone_exits)), identities)
    lone_start = np.array(
        [line.ts - (line.duration_s or 0.0) for line in lone_exits], dtype=np.float64
    )
    lone_seq = exit_seq if exit_only is None else exit_seq[exit_only]
    recorded: dict[int, tuple[float, float, str, CallIdentity, str | None, float]] = {}
    for dump in dumps:  # a later dump overrides an earlier one
        for entry in dump.entries or ():
            start = entry.start if entry.start is not None else dump.ts
            end = np.nan if entry.end is None else entry.end
            identity = (entry.op, entry.site, entry.tag)
            state = entry.state or PENDING
            recorded[entry.seq] = (start, end, state, identity, entry.summary, dump.ts)
    dump_seq = np.array(list(recorded), dtype=np.int64)
    dump_rows = list(recorded.values())
    dump_start = np.array([row[0] for row in dump_rows], dtype=np.float64)
    dump_end = np.array([row[1] for row in dump_rows], dtype=np.float64)
    dump_state = _interned([row[2] for row in dump_rows], states)
    dump_call = _interned([row[3] for row in dump_rows], identities)
    dump_summary = _interned([row[4] for row in dump_rows], summaries)
    dump_at = np.array([row[5] for row in dump_rows], dtype=np.float64)

    seqs = np.unique(np.concatenate([enter_seq, exit_seq, dump_seq]))
    size = len(seqs)
    call = np.full(size, -1, dtype=np.int32)
    start = np.full(size, np.nan)
    end = np.full(size, np.nan)
    state = np.zeros(size, dtype=np.int32)
    state_from = np.zeros(size, dtype=np.int8)
    has_enter = np.zeros(size, dtype=bool)
    dumped_at = np.full(size, np.nan)
    summary = np.zeros(size, dtype=np.int32)
    # Lowest priority first: dump entries, then exits, then enters (see the module doc).
    rows = np.searchsorted(seqs, dump_seq)
    call[rows], start[rows], end[rows] = dump_call, dump_start, dump_end
    state[rows], state_from[rows], dumped_at[rows] = dump_state, STATE_FROM_DUMP, dump_at
    summary[rows] = dump_summary
    rows = np.searchsorted(seqs, exit_seq)
    end[rows], state[rows], state_from[rows] = exit_ts, exit_state, STATE_FROM_EXIT
    rows = np.searchsorted(seqs, lone_seq)
    call[rows] = lone_call
    no_start = np.isnan(start[rows])
    start[rows[no_start]] = lone_start[no_start]
    rows = np.searchsorted(seqs, enter_seq)
    call[rows], start[rows], has_enter[rows] = enter_call, enter_ts, True
    summary[rows] = enter_summary
    return CallLog(
        seqs=seqs,
        call=call,
        start=start,
        end=end,
        state=state,
        state_from=state_from,
        has_enter=has_enter,
        dumped_at=dumped_at,
        summary=summary,
        calls=tuple(identities),
        # An exit line without a state ended normally.
        states=tuple(COMPLETED if name is None else name for name in states),
        summaries=tuple(summaries),
    )
