"""One rank's log reduced to what the cross-rank analysis needs: compact and picklable, so
that ranks can be digested in parallel worker processes and only the digest travels back.

- Collectives: per communicator a ``CallLog`` (``_merge``: enter/exit lines and
  flight-recorder entries of the same call merged into one row per sequence number, as numpy
  arrays, a few bytes a call instead of a decoded line a call).
- Sessions and health: only the findings (unfinished and failed sessions, quarantines,
  cancels, blocks never released, health changes, the asked-for request's timeline).
- The engine's own troubles: each ``engine.tp_failed`` line, and per engine warning
  (``control.rejected`` ...) a count and the first few lines in a few words.
- The rare collective lines (``collective.desync``, ``collective.timeout``) as they are, as
  are the lines of a host's own code (``HOST_EVENTS``: its stalls, frees, poison hits, and
  the faults the run injected).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from operator import attrgetter

import attrs
import numpy as np
from kvhandoff.analysis import schema
from kvhandoff.analysis._merge import CallLog, merge_calls
from kvhandoff.analysis._reader import (
    UNREADABLE_FILE,
    InputNote,
    Line,
    RankLog,
    read_rank_events,
)
from kvhandoff.analysis._report import (
    Cancel,
    EventExample,
    HealthChange,
    PinnedBlocks,
    Quarantine,
    SessionOutcome,
    TimelineEntry,
    TpFailure,
)

_ENDED_WELL = schema.TERMINAL_SESSION_STATES - {"FAILED"}
QUARANTINED = "QUARANTINED"
FAILED = "FAILED"
_REQUEST_ID = attrgetter("request_id")
_TO_STATE = attrgetter("to_state")
# The first this many lines of each engine warning are kept as examples, per rank.
EXAMPLES = 3
#: Lines a host's own code writes (schema component ``host``), kept as they are.
HOST_EVENTS = tuple(name for name, event in schema.EVENTS.items() if event.component == "host")


def _detail_rejected(line: Line) -> str:
    return f"{line.what} from rank {line.source}: {line.detail}"


def _detail_send_failed(line: Line) -> str:
    return f"to rank {line.peer}: {line.error}"


def _detail_drain_left(line: Line) -> str:
    left = line.left or []
    named = ", ".join(f"{entry.request_id} ({entry.state})" for entry in left[:8])
    more = f", ... ({len(left)} in all)" if len(left) > 8 else ""
    return f"{len(left)} transfer(s) still open: {named}{more}"


def _detail_group_incomplete(line: Line) -> str:
    quiescent = ", ".join(map(str, line.quiescent or ())) or "none"
    return f"{line.request_id} released without the group; quiescent TP rank(s): {quiescent}"


#: The engine warnings the report counts, with how one line reads in it.
ENGINE_WARNINGS: dict[str, Callable[[Line], str]] = {
    "control.rejected": _detail_rejected,
    "control.send_failed": _detail_send_failed,
    "engine.drain_left": _detail_drain_left,
    "engine.group_incomplete": _detail_group_incomplete,
}


def error_type(error: str) -> str | None:
    """The exception type that starts ``"<ExceptionType>: <message>"``, if it does."""
    name = error.partition(":")[0].strip()
    last = name.rpartition(".")[2]
    identifier = name.replace(".", "").replace("_", "").isalnum()
    return name if identifier and last[:1].isupper() else None


@attrs.frozen(eq=False)
class RankDigest:
    """What the cross-rank analysis needs of one rank's log (see the module doc).
    ``warnings`` maps each engine warning logged to (how many lines, the first ones);
    ``host`` holds the ``HOST_EVENTS`` lines by time."""

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
    tp_failures: tuple[TpFailure, ...]
    warnings: dict[str, tuple[int, tuple[EventExample, ...]]]
    timeline: tuple[TimelineEntry, ...]
    host: tuple[Line, ...]


def _int_keys(mapping: dict[str, object] | None) -> set[int]:
    return {int(key) for key in mapping or () if key.lstrip("-").isdigit()}


def digest_rank(
    rank_log: RankLog, *, request_id: str | None = None, comm: str | None = None
) -> RankDigest:
    """Reduce one rank's decoded log. ``comm`` keeps only that communicator's collectives;
    ``request_id`` collects that request's timeline lines."""
    rank, lines = rank_log.rank, rank_log.lines
    # One plain loop: measured faster here than sorting codes with numpy or than one
    # filtering pass per group.
    by_event: defaultdict[str, list[Line]] = defaultdict(list)
    for line in lines:
        by_event[line.event].append(line)

    def collective(name: str) -> list[Line]:
        return [
            line
            for line in by_event.get(name, ())
            if line.seq is not None and (comm is None or (line.comm or "") == comm)
        ]

    calls = merge_calls(
        by_event.get("collective.enter", []),
        by_event.get("collective.exit", []),
        by_event.get("flight_recorder.dump", []),
        comm=comm,
    )
    desyncs = collective("collective.desync")
    timeouts = collective("collective.timeout")
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
        tp_failures=tuple(
            TpFailure(rank, line.ts, line.comm, line.error or "",
                      error_type(line.error or ""))
            for line in by_event.get("engine.tp_failed", ())
        ),
        warnings={
            name: (len(found), tuple(EventExample(rank, line.ts, detail(line))
                                     for line in found[:EXAMPLES]))
            for name, detail in ENGINE_WARNINGS.items()
            if (found := by_event.get(name))
        },
        timeline=tuple(_timeline(rank, by_event, request_id)) if request_id is not None else (),
        host=tuple(sorted((line for name in HOST_EVENTS for line in by_event.get(name, ())),
                          key=attrgetter("ts"))),
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
        if line.to_state not in schema.TERMINAL_SESSION_STATES or line.to_state == FAILED
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
    for line in by_event.get("engine.group_incomplete", ()):
        if line.request_id == request_id:
            entries.append(TimelineEntry(line.ts, rank, line.event,
                                         _detail_group_incomplete(line)))
    for line in by_event.get("engine.drain_left", ()):
        for entry in line.left or ():
            if entry.request_id == request_id:
                detail = f"still open in {entry.state} when the drain ended"
                entries.append(TimelineEntry(line.ts, rank, line.event, detail))
    for name, describe in _HOST_TIMELINE.items():
        for line in by_event.get(name, ()):
            if line.request_id == request_id:
                entries.append(TimelineEntry(line.ts, rank, line.event, describe(line)))
    return entries


#: How a host line about one request reads in its timeline.
_HOST_TIMELINE: dict[str, Callable[[Line], str]] = {
    "fault.injected": lambda line: f"injected {line.fault} (peer {line.peer}): {line.detail}",
    "host.stalled": lambda line: f"host loop stalled in {line.call} at {line.site}",
    "host.free": lambda line: (f"host freed blocks {list(line.block_ids or ())}"
                               + (" with its transfer still pending" if line.pending else "")),
}


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

    # fork is the cheap start (the workers inherit the imports, numpy and msgspec, and the
    # structs built from the schema) and is safe while this process runs one thread; with
    # more threads, forkserver (spawn where there is none).
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
