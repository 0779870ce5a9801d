"""The report of ``kvhandoff analyze``: plain frozen values (attrs), JSON-encodable with
msgspec. ``_diagnosis`` fills them in; ``_render`` prints them."""

from __future__ import annotations

import attrs
from kvhandoff.analysis._reader import InputNote

__all__ = [
    "CallPosition",
    "Cancel",
    "Divergence",
    "EarlyFree",
    "EventExample",
    "EventTally",
    "Fingerprint",
    "Hang",
    "HealthChange",
    "InjectedFault",
    "LateWrite",
    "PinnedBlocks",
    "Quarantine",
    "Report",
    "SessionOutcome",
    "Stall",
    "TimelineEntry",
    "TpFailure",
    "Whereabouts",
]

Fingerprint = tuple[int | None, str | None, str | None]


@attrs.frozen
class CallPosition:
    """Where one rank was in its collective sequence on one communicator. ``ts`` is when it
    entered the call (None if unknown); ``source`` names the evidence (the event, and the
    reporting rank when the position comes from a peer)."""

    rank: int
    seq: int | None
    op: str | None
    site: str | None
    tag: str | None = None
    state: str | None = None
    ts: float | None = None
    source: str = ""

    def fingerprint(self) -> Fingerprint:
        """(seq, op, tag or site): what must agree across ranks."""
        return (self.seq, self.op, self.tag or self.site)


@attrs.frozen
class Divergence:
    """The first collective on ``comm`` where ranks issued different calls. ``positions``
    has every rank known at that point; ``expected_*`` is what the majority issued (ties go
    to the group of the lowest rank); ``absent_ranks`` are ranks of the world with no known
    call there; ``reported_by`` are the ranks that logged ``collective.desync`` for it
    (empty when it was found by comparing the ranks' own records)."""

    comm: str
    seq: int
    expected_op: str | None
    expected_site: str | None
    expected_tag: str | None
    positions: tuple[CallPosition, ...]
    mismatched_ranks: tuple[int, ...]
    absent_ranks: tuple[int, ...]
    reported_by: tuple[int, ...]
    ts: float | None


@attrs.frozen
class Whereabouts:
    """Where one rank was when a hang was observed; ``note`` says how that is known (or
    that it is not)."""

    rank: int
    position: CallPosition | None
    note: str


@attrs.frozen
class Hang:
    """Ranks that entered collective ``seq`` on ``comm`` and never left it. ``missing_ranks``
    never arrived (per the timeout lines); ``at`` is the time the whereabouts are taken at
    (the first timeout, else the first dump, else the stuck ranks' last line)."""

    comm: str
    seq: int
    op: str | None
    site: str | None
    tag: str | None
    stuck_ranks: tuple[int, ...]
    missing_ranks: tuple[int, ...]
    at: float
    evidence: tuple[str, ...]
    whereabouts: tuple[Whereabouts, ...]


@attrs.frozen
class SessionOutcome:
    """The last state of one transfer session on one rank."""

    rank: int
    request_id: str
    role: str | None
    peer: int | None
    state: str
    since: float
    reason: str | None


@attrs.frozen
class Quarantine:
    """A session that entered ``QUARANTINED``."""

    rank: int
    request_id: str
    ts: float
    from_state: str | None
    trigger: str | None
    reason: str | None


@attrs.frozen
class Cancel:
    """One ``cancel()`` call and its result."""

    rank: int
    request_id: str
    ts: float
    state: str | None
    result: str | None
    safe_to_free: bool | None


@attrs.frozen
class PinnedBlocks:
    """Blocks whose free was deferred for ``owner`` and never released by the log's end."""

    rank: int
    owner: str
    block_ids: tuple[int, ...]
    since: float


@attrs.frozen
class HealthChange:
    """One ``health.change`` line."""

    rank: int
    ts: float
    healthy: bool | None
    quarantined: int | None
    quarantine_budget: int | None
    seconds_since_progress: float | None
    in_flight: int | None
    reason: str | None
    restart_requested: bool | None


@attrs.frozen
class TpFailure:
    """The engine's TP group broke, as ``rank`` saw it (``engine.tp_failed``): every open
    transfer there failed. ``error`` is the line's ``"<ExceptionType>: <message>"``;
    ``error_type`` is the exception type in it (None when the text does not start with one);
    ``comm`` names the TP group's communicator."""

    rank: int
    ts: float
    comm: str | None
    error: str
    error_type: str | None


@attrs.frozen
class Stall:
    """A host loop that its watchdog found still inside one call (``host.stalled``): on
    ``rank``, doing ``call`` (about ``request_id``) at ``site``, past ``bound_s``."""

    rank: int
    ts: float
    request_id: str | None
    call: str
    site: str
    bound_s: float | None


@attrs.frozen
class EarlyFree:
    """A host gave ``request_id``'s blocks back to its pool while a transport operation on
    them was not final (``host.free`` with ``pending``): the transport may still write them."""

    rank: int
    ts: float
    request_id: str
    block_ids: tuple[int, ...]


@attrs.frozen
class LateWrite:
    """The pool's poison check found freed ``block_ids`` written after their free
    (``host.poisoned``). ``freed_by`` are the requests whose early frees (``EarlyFree``, same
    rank, before it) gave those blocks back: whose transfer most likely wrote them."""

    rank: int
    ts: float
    block_ids: tuple[int, ...]
    freed_by: tuple[str, ...]
    error: str


@attrs.frozen
class InjectedFault:
    """A fault the run injected on purpose (``fault.injected``)."""

    rank: int
    ts: float
    request_id: str | None
    fault: str
    peer: int | None
    detail: str


@attrs.frozen
class EventExample:
    """One line of an event, in a few words."""

    rank: int
    ts: float
    detail: str


@attrs.frozen
class EventTally:
    """The lines of one event over every rank: ``count`` of them, written by ``ranks``, and
    the first few (``examples``, by time)."""

    event: str
    count: int
    ranks: tuple[int, ...]
    examples: tuple[EventExample, ...]


@attrs.frozen
class TimelineEntry:
    """One line of a request's cross-rank timeline."""

    ts: float
    rank: int
    event: str
    detail: str


@attrs.frozen
class Report:
    """Everything ``kvhandoff analyze`` found. ``problems`` is empty exactly when the run
    was clean; ``expected`` lists, one line each, the findings that the injected faults
    (``injected_faults``) explain, which are not problems: quarantines and failures of those
    requests, and unhealthy spells they caused that recovered. ``stalls``, ``early_frees``
    and ``late_writes`` are a host's own mistakes (a loop frozen on one call, blocks freed
    under a transfer, the write that landed in them); an injected fault never explains
    those. ``missing_ranks`` are world ranks with no readable log file; ``tp_failures``
    has one entry per ``engine.tp_failed`` line, by time; ``engine_warnings`` one tally per
    engine warning that was logged (``control.rejected``, ``control.send_failed``,
    ``engine.drain_left``, ``engine.group_incomplete``); ``timeline`` is filled only when a
    ``request_id`` was asked for."""

    log_dir: str
    ranks: tuple[int, ...]
    missing_ranks: tuple[int, ...]
    event_count: int
    first_ts: float | None
    last_ts: float | None
    notes: tuple[InputNote, ...]
    divergences: tuple[Divergence, ...]
    hangs: tuple[Hang, ...]
    unfinished_sessions: tuple[SessionOutcome, ...]
    failed_sessions: tuple[SessionOutcome, ...]
    quarantines: tuple[Quarantine, ...]
    cancels: tuple[Cancel, ...]
    pinned_blocks: tuple[PinnedBlocks, ...]
    health_changes: tuple[HealthChange, ...]
    tp_failures: tuple[TpFailure, ...]
    engine_warnings: tuple[EventTally, ...]
    stalls: tuple[Stall, ...]
    early_frees: tuple[EarlyFree, ...]
    late_writes: tuple[LateWrite, ...]
    injected_faults: tuple[InjectedFault, ...]
    request_id: str | None
    timeline: tuple[TimelineEntry, ...]
    problems: tuple[str, ...]
    expected: tuple[str, ...]

    @property
    def clean(self) -> bool:
        """True when nothing wrong was found (input notes aside)."""
        return not self.problems
