"""``Agreement``: how the ranks of a TP group agree on each request (sans-I/O).

Every rank of a tensor-parallel group moves its own shard of a request's KV, so one request
is one transfer per rank, and the ranks must agree on two separate questions:

*Outcome* is a union: when any rank's transfer failed, the request failed on every rank with
that rank's reason (the first failure heard wins); it completed only when every rank's shard
arrived. *Quiescence* is an intersection: the request's blocks go back only once every rank
says its transport is done with them.

Each rank *reports* what happened locally (``OK``: my shard is in place; ``FAILED``: my side
failed, with reason; ``QUIESCENT``: my transport is done with the blocks); the engine ships
the reports of a tick to the group in one non-blocking allgather (posted on every rank on
every tick, never inside a rank-local condition: seeds 000 and 001) and hands what every rank
said back to ``absorb``. This object does no I/O and keeps no engine state: it is told the
time, answers questions, and is unit-tested without an engine.

A rank that never admits a request would keep the others' blocks pinned forever;
``due_unsettled`` hands back the requests left unsettled for longer than the grace period, so
that each rank releases them on its own quiescence (memory safety never depends on the
group: only a rank's own transport touches its blocks).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

import attrs
from kvhandoff.sessions import FailureReason

__all__ = ["FAILED", "OK", "QUIESCENT", "Agreement", "GroupFailure", "Report"]

#: Report codes: my shard is in place / my side failed / my transport is done with the blocks.
OK, FAILED, QUIESCENT = 1, 2, 3
#: One report as it travels: (request_id, code, reason value or None, detail or None).
Report = tuple[str, int, "str | None", "str | None"]
_BIT = {OK: 1, FAILED: 2, QUIESCENT: 4}


@attrs.frozen
class GroupFailure:
    """The first failure the group heard of for a request: which TP rank, why."""

    tp_rank: int
    reason: FailureReason
    detail: str | None

    def describe(self) -> str:
        """``tp rank R[: detail]``, the detail a failure carries to the other ranks."""
        where = f"tp rank {self.tp_rank}"
        return f"{where}: {self.detail}" if self.detail else where


@attrs.define(eq=False, slots=True)
class _Group:
    """What the group said about one request so far."""

    first_seen: float
    ok: set[int] = attrs.field(factory=set)
    failure: GroupFailure | None = None
    quiescent: set[int] = attrs.field(factory=set)


class Agreement:
    """The agreement state of one rank in a TP group of ``size`` ranks (1: no group, the
    rank's own reports decide at once). ``grace_s`` bounds how long a request may stay
    unsettled (see ``due_unsettled``)."""

    def __init__(self, size: int, grace_s: float) -> None:
        if size < 1:
            raise ValueError(f"a TP group has at least one rank, not {size}")
        self._grace_s = grace_s
        self._outbox: list[Report] = []
        self._reported: dict[str, int] = {}  # request id -> bits of the codes reported
        self._groups: dict[str, _Group] = {}
        self._unsettled: collections.deque[tuple[float, str]] = collections.deque()
        self.broken: str | None = None
        #: Ranks whose word counts: the group's size, or 1 once the group is broken (each
        #: rank then decides alone).
        self.size = size

    # --- this rank's reports ---------------------------------------------------------------

    def report(self, request_id: str, code: int, reason: FailureReason | None = None,
               detail: str | None = None) -> None:
        """Queue this rank's report for the next round; each code at most once per
        request (until ``forget``)."""
        bit = _BIT[code]
        bits = self._reported.get(request_id, 0)
        if bits & bit:
            return
        self._reported[request_id] = bits | bit
        self._outbox.append(
            (request_id, code, None if reason is None else reason.value, detail))

    def mark_reported(self, request_id: str, code: int) -> None:
        """Record ``code`` as said without saying it (the group already knows)."""
        self._reported[request_id] = self._reported.get(request_id, 0) | _BIT[code]

    def forget(self, request_id: str) -> None:
        """The request was released here: a later request with the same id starts afresh."""
        self._reported.pop(request_id, None)

    @property
    def has_reports(self) -> bool:
        return bool(self._outbox)

    def take_reports(self) -> list[Report]:
        """The reports queued since the last call, oldest first."""
        reports, self._outbox = self._outbox, []
        return reports

    # --- what the group said ---------------------------------------------------------------

    def absorb(self, tp_rank: int, reports: Iterable[Report], now: float) -> list[str]:
        """Take what ``tp_rank`` reported; return the request ids concerned, in order (each
        may now be decided: ask ``verdict``)."""
        touched: list[str] = []
        grouped = self.size > 1
        for request_id, code, reason, detail in reports:
            group = self._groups.get(request_id)
            if group is None:
                group = self._groups[request_id] = _Group(first_seen=now)
                if grouped:
                    self._unsettled.append((now, request_id))
            if code == OK:
                group.ok.add(tp_rank)
            elif code == FAILED:
                if group.failure is None:
                    group.failure = GroupFailure(
                        tp_rank, FailureReason(reason or FailureReason.PEER_FAILED), detail)
            else:
                group.quiescent.add(tp_rank)
            touched.append(request_id)
        return touched

    def verdict(self, request_id: str) -> tuple[GroupFailure | None, bool, bool]:
        """``(failure, all ok, all quiescent)`` for a request, in one lookup."""
        group = self._groups.get(request_id)
        if group is None:
            return None, False, False
        size = self.size
        return group.failure, len(group.ok) >= size, len(group.quiescent) >= size

    def known(self, request_id: str) -> bool:
        """The group has said something about the request (it may be decided already)."""
        return request_id in self._groups

    def quiescent_ranks(self, request_id: str) -> list[int]:
        group = self._groups.get(request_id)
        return [] if group is None else sorted(group.quiescent)

    def settle(self, request_id: str) -> None:
        """Drop the group's record of a request once every rank is quiescent."""
        self._groups.pop(request_id, None)

    # --- requests the group does not settle ------------------------------------------------

    @property
    def has_unsettled(self) -> bool:
        return bool(self._unsettled)

    def due_unsettled(self, now: float) -> list[str]:
        """Requests the group has said something about for longer than the grace period and
        not settled, oldest first; each is handed out once (``recheck`` to look again later).
        Cost: O(requests due)."""
        due: list[str] = []
        unsettled = self._unsettled
        while unsettled and now - unsettled[0][0] > self._grace_s:
            _, request_id = unsettled.popleft()
            if request_id in self._groups:
                due.append(request_id)
        return due

    def recheck(self, request_id: str, now: float) -> None:
        """Look at a due request again after another grace period."""
        self._unsettled.append((now, request_id))

    # --- the group breaking ----------------------------------------------------------------

    def break_group(self, error: str) -> None:
        """The group can no longer agree (desync, timeout, closed): forget what it said; from
        now on this rank decides alone (``size`` is 1)."""
        self.broken = error
        self.size = 1
        self._groups.clear()
        self._unsettled.clear()


def absorb_round(agreement: Agreement, results: Sequence[tuple[bool, Sequence[Report]]],
                 now: float) -> tuple[bool, list[str]]:
    """Absorb one allgather round (each rank's ``(done, reports)``, in TP rank order):
    whether every rank was done, and the request ids concerned, in order."""
    all_done = True
    touched: list[str] = []
    for tp_rank, (done, reports) in enumerate(results):
        all_done = all_done and bool(done)
        if reports:
            touched.extend(agreement.absorb(tp_rank, reports, now))
    return all_done, touched
