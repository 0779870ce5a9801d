"""The log schema: every event kvhandoff writes (its runtime, and the host code of its
scenarios: component ``host``), each of its keys, their types and meaning. This module is
the one place they are written down:

- the analyzer's decoders are built from it (``kvhandoff.analysis._reader``);
- docs/log-schema.md is rendered from it (``python -m kvhandoff.analysis.schema``, which
  prints the markdown; a test checks that the committed file equals the render);
- tests check every logging call of the library's source against it (names, keys, level),
  and every line that real runs write (``check_line``).

A line is ``COMMON_KEYS`` (``ts``, ``rank``, ``event``, ``level``) followed by the keys of its
event in ``EVENTS``. Writers write every key of their event on every line (``null`` where a key
is ``nullable``); readers must not rely on that: a key absent from a line reads as None.
A value that is an object inside a line (a rank's position, a flight-recorder entry ...)
is described by a ``LogObject``. The names of the states and results that the runtime
defines as enums are here as data (``SESSION_STATES`` ...), so that the offline tools never
import the runtime.

Pure data and the standard library (plus attrs): it imports nothing of kvhandoff.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs

__all__ = [
    "CALL_STATES",
    "CANCEL_RESULTS",
    "COMMON_KEYS",
    "DRAIN_ENTRY",
    "DUMP_REASONS",
    "EVENTS",
    "EVENT_NAME",
    "FAILURE_REASONS",
    "FINGERPRINT",
    "FREE_PHASES",
    "HEALTH_REASONS",
    "LEVELS",
    "OBJECTS",
    "POSITION",
    "RECORDER_ENTRY",
    "ROLES",
    "SESSION_STATES",
    "SESSION_TRIGGERS",
    "TERMINAL_SESSION_STATES",
    "KeyType",
    "ListOf",
    "LogEvent",
    "LogKey",
    "LogObject",
    "RankMap",
    "check_line",
    "event_keys",
    "main",
    "render_markdown",
]

# --------------------------------------------------------------------------- value names

#: What an event name looks like: dotted lower-case nouns (``session.transition``).
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")

#: The levels a line is written at (structlog's method names; ``warn`` is written ``warning``).
LEVELS = ("debug", "info", "warning", "error")
#: States of one collective call (flight recorder, positions, ``collective.exit``).
CALL_STATES = ("pending", "completed", "failed", "desync", "timeout")
#: Why a flight recorder was dumped.
DUMP_REASONS = ("timeout", "desync", "watchdog", "signal", "request")
#: ``kvhandoff.sessions.State`` names, in the order of the transition table.
SESSION_STATES = (
    "QUEUED",
    "ADVERTISED",
    "IN_FLIGHT",
    "QUARANTINED",
    "COMPLETE",
    "FAILED",
    "CANCELLED",
)
#: The states a session never leaves (``kvhandoff.sessions.TERMINAL_STATES``).
TERMINAL_SESSION_STATES = frozenset({"COMPLETE", "FAILED", "CANCELLED"})
#: ``kvhandoff.sessions.Event`` names: what moved a session (``trigger``).
SESSION_TRIGGERS = (
    "ADVERTISE",
    "POSTED",
    "HANDLE_DONE",
    "HANDLE_FAILED",
    "COMPLETED",
    "CONFIRMED",
    "CANCEL",
    "EXPIRE",
    "ABORT",
    "QUIESCED",
)
#: ``kvhandoff.sessions.Role`` values.
ROLES = ("sender", "receiver")
#: ``kvhandoff.sessions.FailureReason`` values.
FAILURE_REASONS = (
    "queue_timeout",
    "transfer_timeout",
    "transport_error",
    "peer_lost",
    "peer_failed",
    "cancelled",
    "layout_mismatch",
    "size_mismatch",
    "protocol_error",
    "checksum_mismatch",
)
#: ``kvhandoff.sessions.CancelResult`` names.
CANCEL_RESULTS = (
    "NOT_FOUND",
    "ALREADY_COMPLETE",
    "CANCELLED_BEFORE_ADVERTISE",
    "CANCEL_REQUESTED_IN_FLIGHT",
    "BACKEND_UNHEALTHY",
    "NOT_CANCELLABLE",
)
#: Why an engine is unhealthy (``Health.reason``; the last one is the engine's own).
HEALTH_REASONS = ("quarantine_budget_exceeded", "no_progress", "tp_group_failed")
#: The two lines a deferred free writes.
FREE_PHASES = ("deferred", "released")

# --------------------------------------------------------------------------- types


@attrs.frozen
class ListOf:
    """A JSON array whose items are all of type ``item``."""

    item: KeyType


@attrs.frozen
class RankMap:
    """A JSON object keyed by rank, written as a decimal string (``"0"``, ``"1"`` ...)."""

    value: KeyType


@attrs.frozen
class LogKey:
    """One key of a line or of an object in one. ``type`` is ``int``, ``float``, ``str``,
    ``bool``, a ``ListOf``, a ``RankMap`` or a ``LogObject``; ``nullable`` says the writer may
    write null; ``values``, when given, are all the strings it may write. ``required`` keys
    are ones a reader cannot do without: a line or object without them is not read."""

    name: str
    type: KeyType
    meaning: str
    nullable: bool = False
    values: tuple[str, ...] = ()
    required: bool = False


@attrs.frozen
class LogObject:
    """A JSON object inside a line: its keys, in the order they are written."""

    name: str
    keys: tuple[LogKey, ...]
    meaning: str


@attrs.frozen
class LogEvent:
    """One event: its ``name`` (the line's ``event``), the ``level`` it is written at, the
    part of kvhandoff that writes it, and its keys in the order they are written."""

    name: str = attrs.field(validator=attrs.validators.matches_re(EVENT_NAME))
    level: str = attrs.field(validator=attrs.validators.in_(LEVELS))
    component: str
    keys: tuple[LogKey, ...]
    meaning: str


KeyType = type[int] | type[float] | type[str] | type[bool] | ListOf | RankMap | LogObject

# --------------------------------------------------------------------------- keys

COMMON_KEYS = (
    LogKey("ts", float, "wall-clock time, seconds since the epoch (`time.time()`)",
           required=True),
    LogKey("rank", int, "the rank that wrote the line", required=True),
    LogKey("event", str, "the event name below", required=True),
    LogKey("level", str, "the level it was written at", values=LEVELS),
)

# Keys that several events or objects share: one definition each.
_SEQ = LogKey("seq", int, "the call's sequence number on its communicator (0, 1, ...)")
_OP = LogKey("op", str, "the collective, e.g. `allgather`, `bcast`, `barrier`")
_SITE = LogKey("site", str, 'where it was called: `"path/to/file.py:LINE function"`')
_TAG = LogKey("tag", str, "the caller's name for the call, standing in for `site` in the "
              "fingerprint", nullable=True)
_ROOT = LogKey("root", int, "root rank of rooted collectives", nullable=True)
_REDUCE_OP = LogKey("reduce_op", str, "reduction of reducing collectives, e.g. `sum`",
                    nullable=True)
_CALL_STATE = LogKey("state", str, "the call's state", values=CALL_STATES)
_COMM = LogKey("comm", str, "communicator name")
_SUMMARY = LogKey("summary", str, "the payload in short: type, length or shape and dtype, "
                  "never the content")
_REQUEST_ID = LogKey("request_id", str, "the request (transfer) id")
_PEER = LogKey("peer", int, "the rank at the other end")
_ERROR = LogKey("error", str, '`"<ExceptionType>: <message>"`')

POSITION = LogObject(
    "position",
    (_SEQ, _OP, _SITE, _TAG, _CALL_STATE),
    "where a rank was in its collective sequence on one communicator",
)
FINGERPRINT = LogObject(
    "fingerprint",
    (_SEQ, _OP, _SITE, _TAG, _ROOT, _REDUCE_OP),
    "what a rank said it was doing at one collective: ranks agree when `seq`, `op`, `root`, "
    "`reduce_op` and the `tag` (the `site` when there is no tag) are equal",
)
RECORDER_ENTRY = LogObject(
    "recorder entry",
    (
        attrs.evolve(_SEQ, required=True),
        attrs.evolve(_OP, required=True),
        _SITE,
        _TAG,
        _SUMMARY,
        LogKey("start", float, "when the call started (epoch seconds)"),
        LogKey("end", float, "when it ended; null while pending", nullable=True),
        _CALL_STATE,
    ),
    "one call in a flight recorder",
)
DRAIN_ENTRY = LogObject(
    "drain entry",
    (_REQUEST_ID, LogKey("state", str, "its state", values=SESSION_STATES)),
    "a transfer still open when a drain ended",
)

#: Every object that lines hold, in the order of docs/log-schema.md.
OBJECTS = (POSITION, FINGERPRINT, RECORDER_ENTRY, DRAIN_ENTRY)

_COLLECTIVES = "collectives"
_ENGINE = "engine"
_HOST = "host"
_CALL = (_COMM, _SEQ, _OP, _SITE, _TAG)

_EVENT_LIST = (
    LogEvent(
        "collective.enter", "debug", _COLLECTIVES,
        (*_CALL, _ROOT, _REDUCE_OP, _SUMMARY),
        "a rank entered a collective (per-call logging only)",
    ),
    LogEvent(
        "collective.exit", "debug", _COLLECTIVES,
        (*_CALL, LogKey("duration_s", float, "seconds from enter to exit"), _CALL_STATE),
        "a rank left a collective that completed (per-call logging only)",
    ),
    LogEvent(
        "collective.desync", "error", _COLLECTIVES,
        (
            *_CALL,
            LogKey("ranks", RankMap(FINGERPRINT),
                   "the fingerprint of every rank whose fingerprint this rank saw"),
            LogKey("mismatched_ranks", ListOf(int),
                   "ranks whose fingerprint differs from the majority's"),
        ),
        "ranks issued different collectives at the same sequence number",
    ),
    LogEvent(
        "collective.timeout", "error", _COLLECTIVES,
        (
            *_CALL,
            LogKey("deadline_s", float, "the call's deadline, in seconds"),
            LogKey("arrived", ListOf(int), "ranks that entered this call"),
            LogKey("missing", ListOf(int), "ranks that never did"),
            LogKey("positions", RankMap(POSITION),
                   "last known position of every rank as far as this rank knows (ranks "
                   "whose position is unknown are left out)"),
        ),
        "a collective passed its deadline",
    ),
    LogEvent(
        "flight_recorder.dump", "warning", _COLLECTIVES,
        (
            _COMM,
            LogKey("reason", str, "why it was dumped", values=DUMP_REASONS),
            LogKey("entries", ListOf(RECORDER_ENTRY), "the recorded calls, oldest first"),
        ),
        "a communicator's flight recorder: its last calls, written on every problem",
    ),
    LogEvent(
        "session.transition", "info", _ENGINE,
        (
            _REQUEST_ID,
            LogKey("role", str, "this rank's side of the transfer", values=ROLES),
            _PEER,
            LogKey("from_state", str, "the state left", values=SESSION_STATES),
            LogKey("to_state", str, "the state entered", values=SESSION_STATES),
            LogKey("trigger", str, "the session event that moved it (`event` is the line's "
                   "own name, so the session event travels as `trigger`)",
                   values=SESSION_TRIGGERS),
            LogKey("reason", str, "failure reason, when it failed", nullable=True,
                   values=FAILURE_REASONS),
            LogKey("outcome_unknown", bool, "with a failure: this side could not learn the "
                   "other side's outcome (a sender that posted, so the receiver may hold "
                   "every byte, lost the receiver's word); null without a failure",
                   nullable=True),
        ),
        "a transfer session changed state",
    ),
    LogEvent(
        "session.cancel", "info", _ENGINE,
        (
            _REQUEST_ID,
            LogKey("state", str, "its state at the time of the call (null: unknown request)",
                   nullable=True, values=SESSION_STATES),
            LogKey("result", str, "what the cancel did", values=CANCEL_RESULTS),
            LogKey("safe_to_free", bool, "whether the host may free the blocks now"),
        ),
        "the host called `cancel()`",
    ),
    LogEvent(
        "health.change", "info", _ENGINE,
        (
            LogKey("healthy", bool, "the engine's verdict"),
            LogKey("quarantined", int, "sessions quarantined now"),
            LogKey("quarantine_budget", int, "quarantines tolerated before unhealthy"),
            LogKey("seconds_since_progress", float, "since the last completed operation"),
            LogKey("in_flight", int, "sessions in flight"),
            LogKey("reason", str, "why it is unhealthy", nullable=True, values=HEALTH_REASONS),
            LogKey("restart_requested", bool, "whether the engine asks for a restart"),
        ),
        "the engine's health snapshot changed",
    ),
    LogEvent(
        "pool.deferred_free", "info", _ENGINE,
        (
            LogKey("block_ids", ListOf(int), "the blocks, ascending"),
            LogKey("owner", str, "the request id that pins them"),
            LogKey("phase", str, "`deferred` when the host's free was deferred, `released` "
                   "when the blocks went back to the free list", values=FREE_PHASES),
        ),
        "the host freed blocks a transfer still pinned, or such blocks were released",
    ),
    LogEvent(
        "control.rejected", "warning", _ENGINE,
        (
            LogKey("source", int, "the rank that sent it"),
            LogKey("what", str, "which message: `decode` when it could not be decoded, else "
                   "its kind, e.g. `advertise`, `cancel`, `done`, `accept`"),
            LogKey("detail", str, "why it was rejected"),
        ),
        "a control message from a peer was malformed or matched no transfer; it was dropped",
    ),
    LogEvent(
        "control.send_failed", "warning", _ENGINE,
        (_PEER, attrs.evolve(_ERROR, meaning="what the transport raised (its `repr`)")),
        "a control message could not be sent: the peer may never hear of it",
    ),
    LogEvent(
        "engine.drain_left", "warning", _ENGINE,
        (LogKey("left", ListOf(DRAIN_ENTRY), "every transfer still open"),),
        "a drain ended with transfers still open; their blocks stay pinned",
    ),
    LogEvent(
        "engine.group_incomplete", "warning", _ENGINE,
        (
            _REQUEST_ID,
            LogKey("quiescent", ListOf(int), "the TP ranks that said they were quiescent"),
        ),
        "the TP group never agreed a request was quiescent everywhere (some TP rank never "
        "admitted it); after the grace this rank released it on its own",
    ),
    LogEvent(
        "engine.tp_failed", "error", _ENGINE,
        (attrs.evolve(_COMM, meaning="the name of the TP group's communicator"),
         attrs.evolve(_ERROR, meaning='the collective error that broke the group, '
                      '`"<ExceptionType>: <message>"`'),),
        "the engine's TP group broke (desync, timeout, closed): every open transfer fails "
        "and each rank releases its blocks on its own quiescence",
    ),
    LogEvent(
        "transport.cma_unavailable", "info", _ENGINE,
        (
            attrs.evolve(_PEER, meaning="the rank the one-copy path was not agreed with"),
            LogKey("reason", str, "why: `disabled (...)` (`use_cma=False` or "
                   "`KVHANDOFF_MPI_CMA=0`), `cuda_aware=True: ...`, `on another host`, `off on "
                   "that rank's side`, `that rank cannot read this one`, or why reading its "
                   "memory failed (ptrace permission ...)"),
        ),
        "an `MPITransport` could not agree cross-memory read (one copy on one host) with a "
        "peer, at construction: data with that peer moves as MPI messages and datatypes",
    ),
    LogEvent(
        "fault.injected", "warning", _HOST,
        (
            attrs.evolve(_REQUEST_ID, meaning="the request whose transfer the fault hits",
                         nullable=True),
            LogKey("fault", str, "what was injected, e.g. `wedged` (the link holds the "
                   "request's data operation until the run lets it go)"),
            _PEER,
            LogKey("detail", str, "the fault in a few words"),
        ),
        "the run injected a fault on purpose (a test, a scenario): `kvhandoff analyze` counts "
        "the quarantines, failures and recovered health it explains as expected, not as "
        "problems",
    ),
    LogEvent(
        "host.stalled", "error", _HOST,
        (
            attrs.evolve(_REQUEST_ID, meaning="the request the call was about", nullable=True),
            LogKey("call", str, "what the loop was doing, e.g. `wait() on req-1's recv`"),
            attrs.evolve(_SITE, meaning='where it was stuck, from its thread\'s own stack: '
                         '`"path/to/file.py:LINE function"`'),
            LogKey("bound_s", float, "the watchdog's bound, in seconds"),
        ),
        "a host loop's watchdog found the loop still inside one call after its bound (a "
        "blocking wait on a transfer that is not final freezes the whole loop)",
    ),
    LogEvent(
        "host.free", "info", _HOST,
        (
            attrs.evolve(_REQUEST_ID, meaning="the request whose blocks they are"),
            LogKey("block_ids", ListOf(int), "the blocks, ascending"),
            LogKey("pending", bool, "a transport operation on these blocks was not final: "
                   "the transport may still read or write them"),
        ),
        "a host that drives the transport itself gave a request's blocks back to its pool",
    ),
    LogEvent(
        "host.poisoned", "error", _HOST,
        (
            LogKey("block_ids", ListOf(int), "the freed blocks whose poison was gone"),
            LogKey("owner", str, "who was being given them", nullable=True),
            attrs.evolve(_ERROR, meaning='the `PoisonError`, `"<ExceptionType>: <message>"`'),
        ),
        "the pool's poison check (`BlockPool(debug=True)`) found freed blocks written after "
        "their free: something still wrote memory it no longer owned",
    ),
)

#: Every event, by name, in the order of docs/log-schema.md.
EVENTS: Mapping[str, LogEvent] = MappingProxyType({event.name: event for event in _EVENT_LIST})


def event_keys(name: str) -> tuple[str, ...]:
    """The key names of a line of event ``name``, common keys first, in written order.
    Raises ``KeyError`` for an event outside the schema."""
    return tuple(key.name for key in (*COMMON_KEYS, *EVENTS[name].keys))


# --------------------------------------------------------------------------- checking


def check_line(line: Mapping[str, object]) -> list[str]:
    """What is wrong with one decoded line, held to what the runtime must write: an event
    outside the schema, a key missing or extra (in the line or in an object in it), a value
    of another type, null where the key is not nullable, a string outside the key's
    ``values``. Empty when the line follows the schema exactly."""
    name = line.get("event")
    event = EVENTS.get(name) if isinstance(name, str) else None
    if event is None:
        return [f"event {name!r} is not in the schema"]
    return _check_keys(line, (*COMMON_KEYS, *event.keys), event.name)


def _check_keys(found: Mapping[Any, object], keys: Sequence[LogKey], where: str) -> list[str]:
    names = {key.name for key in keys}
    problems = [f"{where}: key {extra!r} is not in the schema" for extra in found
                if extra not in names]
    for key in keys:
        if key.name not in found:
            problems.append(f"{where}: key {key.name!r} is missing")
        else:
            problems += _check_value(found[key.name], key, key.type, f"{where}.{key.name}")
    return problems


def _check_value(value: object, key: LogKey, kind: KeyType, where: str) -> list[str]:
    if value is None:
        return [] if key.nullable and kind is key.type else [f"{where}: null"]
    if isinstance(kind, ListOf):
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [p for i, item in enumerate(value)
                for p in _check_value(item, key, kind.item, f"{where}[{i}]")]
    if isinstance(kind, RankMap):
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object"]
        problems = [f"{where}: key {rank!r} is not a rank" for rank in value
                    if not (isinstance(rank, str) and rank.isdigit())]
        return problems + [p for rank, item in value.items()
                           for p in _check_value(item, key, kind.value, f"{where}[{rank}]")]
    if isinstance(kind, LogObject):
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object"]
        return _check_keys(value, kind.keys, where)
    # float keys take ints too: JSON does not tell 1 from 1.0 everywhere.
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, accepted):
        return [f"{where}: {value!r} is not {kind.__name__}"]
    if key.values and value not in key.values:
        return [f"{where}: {value!r} is not one of {', '.join(key.values)}"]
    return []


# --------------------------------------------------------------------------- markdown

_INTRO = """\
# Log schema

<!-- Rendered from analysis/schema.py by `python -m kvhandoff.analysis.schema`: edit that
module, not this file (a test checks that they agree). -->

Every kvhandoff event is one JSON object per line, one file per rank:
`<log_dir>/rank-<N>.jsonl`, where N is the rank's index in the world (for in-process ranks,
their index in the simulated group). `kvhandoff analyze` and `kvhandoff trace` read exactly
these keys; event names and keys are a public contract (additions are fine, renames are not).
Every line carries every key of its event, `null` where the key's type says "or null"; a
reader treats an absent key as null.
"""

_SECTIONS = {
    _COLLECTIVES: (
        "Collectives (`kvhandoff.collectives`)",
        "`collective.enter` / `collective.exit` are off by default (per-call logging costs "
        "time);\nthe flight recorder keeps the same information in memory and is dumped on "
        "every problem.",
    ),
    _ENGINE: ("Engine (`kvhandoff.engine`)", ""),
    _HOST: (
        "Host programs and injected faults (`kvhandoff.scenarios`)",
        "Written by a host's own code, not by the runtime: a host loop that drives a transport "
        "and a pool\nwithout the engine (the scenarios' unsafe runs) logs what it did, and a "
        "run that injects a fault\non purpose says so.",
    ),
}


def _type_text(kind: KeyType) -> str:
    if isinstance(kind, ListOf):
        return f"list of {_type_text(kind.item)}"
    if isinstance(kind, RankMap):
        return f"object: rank (as a string) -> {_type_text(kind.value)}"
    if isinstance(kind, LogObject):
        return kind.name
    return kind.__name__


def _key_rows(keys: Iterable[LogKey]) -> list[str]:
    rows = ["| key | type | meaning |", "| --- | --- | --- |"]
    for key in keys:
        kind = _type_text(key.type) + (" or null" if key.nullable else "")
        meaning = key.meaning
        # The values, unless the meaning already goes through them.
        if key.values and not all(f"`{value}`" in meaning for value in key.values):
            meaning += ": " + ", ".join(f"`{value}`" for value in key.values)
        rows.append(f"| `{key.name}` | {kind} | {meaning} |")
    return rows


def render_markdown() -> str:
    """docs/log-schema.md: the intro, the keys of every line, the objects inside lines, then
    every event by component with its level and keys."""
    out = [_INTRO, "Keys on every line:", "", *_key_rows(COMMON_KEYS), ""]
    out += ["## Objects inside lines", ""]
    for shape in OBJECTS:
        out += [f"### {shape.name}", "", f"{shape.meaning[0].upper()}{shape.meaning[1:]}.", ""]
        out += [*_key_rows(shape.keys), ""]
    for component, (title, note) in _SECTIONS.items():
        out += [f"## {title}", ""]
        if note:
            out += [note, ""]
        for event in EVENTS.values():
            if event.component != component:
                continue
            meaning = f"{event.meaning[0].upper()}{event.meaning[1:]}"
            out += [f"### `{event.name}`", "", f"{meaning}. Level `{event.level}`.", ""]
            out += [*_key_rows(event.keys), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvhandoff.analysis.schema [-o docs/log-schema.md]``: print the markdown,
    or write it to a file."""
    parser = argparse.ArgumentParser(
        prog="python -m kvhandoff.analysis.schema",
        description="Render the log schema (docs/log-schema.md) as markdown.",
    )
    parser.add_argument("-o", "--output", default=None, help="write it here, not to stdout")
    args = parser.parse_args(argv)
    text = render_markdown()
    if args.output is None:
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
