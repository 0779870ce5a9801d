"""One rank's log reduced to what the cross-rank analysis needs: compact and picklable, so
that ranks can be digested in parallel worker processes and only the digest travels back.

- Collectives: per communicator a ``CallLog``, one row per sequence number with the call's
  identity, start, end, state and where the state came from, as numpy arrays (a few bytes a
  call instead of a decoded line a call). Enter/exit lines and flight-recorder entries of the
  same call are merged: the enter line names the call, the exit line ends it, a dump entry
  fills in what per-call logging did not record.
- Sessions and health: only the findings (unfinished and failed sessions, quarantines,
  cancels, blocks never released, health changes, the asked-for request's timeline).
- The rare collective lines (``collective.desync``, ``collective.timeout``) as they are.

Speed: the bulk of a big log (``collective.enter`` / ``exit`` lines) is taken as columns, one
C-level pass (``map`` with an ``attrgetter`` into ``np.fromiter`` or a dict method) per
attribute over all lines of an event, not with a Python statement per line.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import count
from operator import attrgetter
from typing import Any

import attrs
import numpy as np
from kvhandoff.engine._logs import (
    UNREADABLE_FILE,
    InputNote,
    Line,
    LogLine,
    RankLog,
    read_rank_events,
)
from kvhandoff.engine._report import (
    CallPosition,
    Cancel,
    HealthChange,
    PinnedBlocks,
    Quarantine,
    SessionOutcome,
    TimelineEntry,
)

TERMINAL_STATES = frozenset({"COMPLETE", "FAILED", "CANCELLED"})
_ENDED_WELL = TERMINAL_STATES - {"FAILED"}
QUARANTINED = "QUARANTINED"
FAILED = "FAILED"
PENDING = "pending"
TIMEOUT = "timeout"

# Where a call's state comes from.
STATE_FROM_NOTHING = 0  # an enter line and nothing after it
STATE_FROM_EXIT = 1
STATE_FROM_DUMP = 2

CallIdentity = tuple[str | None, str | None, str | None]  # (op, site, tag)


@attrs.frozen(eq=False)
class CallLog:
    """One rank's calls on one communicator, one row per seq, rows sorted by seq.

    ``call`` indexes ``calls`` ((op, site, tag)); ``state`` indexes ``states`` (index 0 is
    ``pending``); ``start`` / ``end`` / ``dumped_at`` are epoch seconds, NaN when unknown."""

    seqs: np.ndarray
    call: np.ndarray
    start: np.ndarray
    end: np.ndarray
    state: np.ndarray
    state_from: np.ndarray
    has_enter: np.ndarray
    dumped_at: np.ndarray
    calls: tuple[CallIdentity, ...]
    states: tuple[str, ...]

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
_ENTER_KEY = attrgetter("comm", "op", "site", "tag")
_EXIT_KEY = attrgetter("comm", "state")
_REQUEST_ID = attrgetter("request_id")
_TO_STATE = attrgetter("to_state")


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


def _call_log(enters: _Records, exits: _Records, dumps: list[Line]) -> CallLog:
    identities: dict[CallIdentity, int] = {}
    states: dict[str | None, int] = {PENDING: 0}

    enter_seq, enter_ts = enters.seq, enters.ts
    enter_call = enters.local_ids(identities, slice(1, None))

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
    recorded: dict[int, tuple[float, float, str, CallIdentity, float]] = {}
    for dump in dumps:  # a later dump overrides an earlier one
        for entry in dump.entries or ():
            start = entry.start if entry.start is not None else dump.ts
            end = np.nan if entry.end is None else entry.end
            identity = (entry.op, entry.site, entry.tag)
            recorded[entry.seq] = (start, end, entry.state, identity, dump.ts)
    dump_seq = np.array(list(recorded), dtype=np.int64)
    dump_rows = list(recorded.values())
    dump_start = np.array([row[0] for row in dump_rows], dtype=np.float64)
    dump_end = np.array([row[1] for row in dump_rows], dtype=np.float64)
    dump_state = _interned([row[2] for row in dump_rows], states)
    dump_call = _interned([row[3] for row in dump_rows], identities)
    dump_at = np.array([row[4] for row in dump_rows], dtype=np.float64)

    seqs = np.unique(np.concatenate([enter_seq, exit_seq, dump_seq]))
    size = len(seqs)
    call = np.full(size, -1, dtype=np.int32)
    start = np.full(size, np.nan)
    end = np.full(size, np.nan)
    state = np.zeros(size, dtype=np.int32)
    state_from = np.zeros(size, dtype=np.int8)
    has_enter = np.zeros(size, dtype=bool)
    dumped_at = np.full(size, np.nan)
    # Lowest priority first: dump entries, then exits, then enters (which name the call).
    rows = np.searchsorted(seqs, dump_seq)
    call[rows], start[rows], end[rows] = dump_call, dump_start, dump_end
    state[rows], state_from[rows], dumped_at[rows] = dump_state, STATE_FROM_DUMP, dump_at
    rows = np.searchsorted(seqs, exit_seq)
    end[rows], state[rows], state_from[rows] = exit_ts, exit_state, STATE_FROM_EXIT
    rows = np.searchsorted(seqs, lone_seq)
    call[rows] = lone_call
    no_start = np.isnan(start[rows])
    start[rows[no_start]] = lone_start[no_start]
    rows = np.searchsorted(seqs, enter_seq)
    call[rows], start[rows], has_enter[rows] = enter_call, enter_ts, True
    return CallLog(
        seqs=seqs,
        call=call,
        start=start,
        end=end,
        state=state,
        state_from=state_from,
        has_enter=has_enter,
        dumped_at=dumped_at,
        calls=tuple(identities),
        # An exit line without a state ended normally.
        states=tuple("completed" if name is None else name for name in states),
    )


@attrs.frozen(eq=False)
class RankDigest:
    """What the cross-rank analysis needs of one rank's log (see the module doc)."""

    rank: int
    path: str
    event_count: int
    first_ts: float | None
    last_ts: float | None
    notes: tuple[InputNote, ...]
    calls: dict[str, CallLog]
    desyncs: tuple[Line, ...]
    timeouts: tuple[Line, ...]
    named_ranks: frozenset[int]
    unfinished: tuple[SessionOutcome, ...]
    failed: tuple[SessionOutcome, ...]
    quarantines: tuple[Quarantine, ...]
    cancels: tuple[Cancel, ...]
    pinned: tuple[PinnedBlocks, ...]
    health: tuple[HealthChange, ...]
    timeline: tuple[TimelineEntry, ...]


def _int_keys(mapping: dict[str, object] | None) -> set[int]:
    return {int(key) for key in mapping or () if key.lstrip("-").isdigit()}


def digest_rank(
    rank_log: RankLog[LogLine] | RankLog[Line],
    *,
    request_id: str | None = None,
    comm: str | None = None,
) -> RankDigest:
    """Reduce one rank's decoded log. ``comm`` keeps only that communicator's collectives;
    ``request_id`` collects that request's timeline lines."""
    rank, lines = rank_log.rank, rank_log.lines
    # One plain loop: measured faster here than sorting codes with numpy or than one
    # filtering pass per group.
    by_event: defaultdict[str, list[Line]] = defaultdict(list)
    for line in lines:
        by_event[line.event].append(line)

    def only_comm(grouped: dict[str, Any]) -> dict[str, Any]:
        if comm is not None:
            return {comm: grouped[comm]} if comm in grouped else {}
        return grouped

    def collective(name: str) -> dict[str, list[Line]]:
        grouped: defaultdict[str, list[Line]] = defaultdict(list)
        for line in by_event.get(name, ()):
            if name == "flight_recorder.dump" or line.seq is not None:
                grouped[line.comm or ""].append(line)
        return only_comm(grouped)

    # The bulk of a log: taken as columns, not line by line.
    enters = only_comm(_Records.by_comm(by_event.get("collective.enter", []), _ENTER_KEY))
    exits = only_comm(_Records.by_comm(by_event.get("collective.exit", []), _EXIT_KEY))
    dumps = collective("flight_recorder.dump")
    calls = {
        name: _call_log(
            enters.get(name) or _Records.empty(),
            exits.get(name) or _Records.empty(),
            dumps.get(name, []),
        )
        for name in sorted(set(enters) | set(exits) | set(dumps))
    }
    calls = {name: log for name, log in calls.items() if len(log.seqs)}
    desyncs = [line for lines_ in collective("collective.desync").values() for line in lines_]
    timeouts = [line for lines_ in collective("collective.timeout").values() for line in lines_]
    named: set[int] = set()
    for line in desyncs:
        named |= _int_keys(line.ranks)
        named.update(line.mismatched_ranks or ())
    for line in timeouts:
        named |= _int_keys(line.positions)
        named.update(line.arrived or ())
        named.update(line.missing or ())

    starts = [lines[0].ts] if lines else []
    starts.extend(float(np.nanmin(log.start)) for log in calls.values() if log.start.size
                  and not np.isnan(log.start).all())
    unfinished, failed, quarantines = _sessions(rank, by_event.get("session.transition", []))
    return RankDigest(
        rank=rank,
        path=rank_log.path,
        event_count=len(lines),
        first_ts=min(starts) if starts else None,
        last_ts=lines[-1].ts if lines else None,
        notes=rank_log.notes,
        calls=calls,
        desyncs=tuple(desyncs),
        timeouts=tuple(timeouts),
        named_ranks=frozenset(named),
        unfinished=tuple(unfinished),
        failed=tuple(failed),
        quarantines=tuple(quarantines),
        cancels=tuple(
            Cancel(rank, line.request_id or "", line.ts, line.state, line.result,
                   line.safe_to_free)
            for line in by_event.get("session.cancel", ())
        ),
        pinned=tuple(_pinned(rank, by_event.get("pool.deferred_free", []))),
        health=tuple(
            HealthChange(rank, line.ts, line.healthy, line.quarantined, line.quarantine_budget,
                         line.seconds_since_progress, line.in_flight, line.reason,
                         line.restart_requested)
            for line in by_event.get("health.change", ())
        ),
        timeline=tuple(_timeline(rank, by_event, request_id)) if request_id is not None else (),
    )


def _sessions(
    rank: int, transitions: list[Line]
) -> tuple[list[SessionOutcome], list[SessionOutcome], list[Quarantine]]:
    # dict(zip(...)) keeps each request's last line, without a Python-level loop per line;
    # the same goes for the checks that usually find nothing (`in`, all() run in C).
    last = dict(zip(map(_REQUEST_ID, transitions), transitions, strict=True))
    quarantines = [
        Quarantine(rank, line.request_id or "", line.ts, line.from_state, line.trigger,
                   line.reason)
        for line in transitions
        if line.to_state == QUARANTINED
    ] if QUARANTINED in map(_TO_STATE, transitions) else []
    if all(map(_ENDED_WELL.__contains__, map(_TO_STATE, last.values()))):
        return [], [], quarantines
    ended = [
        line for line in last.values()
        if line.to_state not in TERMINAL_STATES or line.to_state == FAILED
    ]
    wanted = {line.request_id for line in ended}
    last_reason = {
        line.request_id: line.reason
        for line in transitions
        if line.reason is not None and line.request_id in wanted
    }
    unfinished: list[SessionOutcome] = []
    failed: list[SessionOutcome] = []
    for line in ended:
        outcome = SessionOutcome(
            rank, line.request_id or "", line.role, line.peer, line.to_state or "", line.ts,
            last_reason.get(line.request_id),
        )
        (failed if line.to_state == FAILED else unfinished).append(outcome)
    return unfinished, failed, quarantines


def _pinned(rank: int, frees: list[Line]) -> list[PinnedBlocks]:
    """Blocks deferred for an owner and not released after, with when they were deferred."""
    held: dict[str, dict[int, float]] = {}
    for line in frees:
        owner = line.owner or ""
        block_ids = line.block_ids or ()
        blocks = held.get(owner)
        if line.phase == "deferred":
            if blocks is None:
                held[owner] = dict.fromkeys(block_ids, line.ts)
            else:
                for block_id in block_ids:
                    blocks.setdefault(block_id, line.ts)
        elif line.phase == "released" and blocks is not None:
            for block_id in block_ids:
                blocks.pop(block_id, None)
            if not blocks:
                del held[owner]  # keeps the table as small as what is still held
    return [
        PinnedBlocks(rank, owner, tuple(sorted(blocks)), min(blocks.values()))
        for owner, blocks in held.items()
        if blocks
    ]


def _timeline(
    rank: int, by_event: dict[str, list[Line]], request_id: str
) -> list[TimelineEntry]:
    entries: list[TimelineEntry] = []
    for line in by_event.get("session.transition", ()):
        if line.request_id == request_id:
            detail = f"{line.from_state} -> {line.to_state} on {line.trigger}"
            if line.role is not None:
                detail += f" ({line.role}, peer {line.peer})"
            if line.reason is not None:
                detail += f", reason {line.reason}"
            entries.append(TimelineEntry(line.ts, rank, line.event, detail))
    for line in by_event.get("session.cancel", ()):
        if line.request_id == request_id:
            detail = f"cancel in {line.state}: {line.result} (safe_to_free={line.safe_to_free})"
            entries.append(TimelineEntry(line.ts, rank, line.event, detail))
    for line in by_event.get("pool.deferred_free", ()):
        if line.owner == request_id:
            detail = f"{line.phase}: blocks {list(line.block_ids or ())}"
            entries.append(TimelineEntry(line.ts, rank, line.event, detail))
    return entries


def digest_file(
    path: str, rank: int, request_id: str | None, comm: str | None
) -> RankDigest | InputNote:
    """Read and digest one rank file (the unit of work of a worker process); an unreadable
    file gives an ``unreadable_file`` note instead."""
    try:
        rank_log = read_rank_events(path, rank)
    except OSError as exc:
        return InputNote(UNREADABLE_FILE, path, rank, f"cannot read it ({exc.strerror})")
    return digest_rank(rank_log, request_id=request_id, comm=comm)


def digest_files(
    files: dict[int, str],
    *,
    request_id: str | None,
    comm: str | None,
    workers: int,
) -> list[RankDigest | InputNote]:
    """Digest every file, in ``workers`` processes when more than one (results in rank
    order)."""
    ranks = sorted(files)
    if workers <= 1 or len(ranks) <= 1:
        return [digest_file(files[rank], rank, request_id, comm) for rank in ranks]
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    # fork is the cheap start (the workers inherit the imports: kvhandoff.engine imports
    # torch, seconds per worker otherwise) and is safe while this process runs one thread;
    # with more threads, forkserver (spawn where there is none).
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        method = "fork"
    else:
        method = "forkserver" if "forkserver" in methods else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=min(workers, len(ranks)), mp_context=context) as pool:
        futures = [
            pool.submit(digest_file, files[rank], rank, request_id, comm) for rank in ranks
        ]
        return [future.result() for future in futures]


def default_workers(files: Sequence[str], parallel_min_bytes: int) -> int:
    """Worker processes worth starting for these files: one per CPU when they are big enough
    to pay for starting the workers, else none (1)."""
    total = 0
    for path in files:
        try:
            total += os.path.getsize(path)
        except OSError:
            continue
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, len(files))) if total >= parallel_min_bytes else 1
