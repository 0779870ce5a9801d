"""``SessionTable``: every live session of one rank, by request id.

Besides the sessions it keeps three indexes in step with every transition, so that no
per-tick operation has to scan the table:

* counts per state (``counts()``, ``in_flight``, ``quarantined``) - O(1);
* a heap of ``(deadline, request_id)`` - ``expire_due(now)`` costs O(k log n) for k entries
  due, with lazy deletion: an entry whose session moved on (or was released) is dropped
  when it reaches the top;
* the terminal sessions in the order they ended - ``pop_releasable()`` costs O(released).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator

from kvhandoff.sessions._cancel import CancelResult, decide_cancel
from kvhandoff.sessions._session import TransferSession, Transition
from kvhandoff.sessions._table import (
    IN_FLIGHT_STATES,
    TERMINAL_STATES,
    Event,
    FailureReason,
    Role,
    State,
)
from kvhandoff.sessions.errors import (
    DuplicateSessionError,
    NotReleasableError,
    UnknownSessionError,
)


class SessionTable:
    """The sessions of one rank. All mutation goes through ``admit``, ``apply``,
    ``cancel``, ``expire_due`` and the release calls, which keep the indexes exact.

    A released session leaves the table: its request id is unknown afterwards (``cancel`` ->
    ``NOT_FOUND``) and may be admitted again.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, TransferSession] = {}
        self._counts: Counter[State] = Counter()
        self._deadlines: list[tuple[float, int, str]] = []
        self._tiebreak = itertools.count()
        self._terminal: dict[str, None] = {}  # insertion-ordered set

    # --- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._sessions

    def __iter__(self) -> Iterator[TransferSession]:
        return iter(list(self._sessions.values()))

    def get(self, request_id: str) -> TransferSession:
        """The session, or ``UnknownSessionError``. Do not call its ``apply`` directly: go
        through the table so its indexes stay exact."""
        try:
            return self._sessions[request_id]
        except KeyError:
            raise UnknownSessionError(request_id) from None

    def find(self, request_id: str) -> TransferSession | None:
        return self._sessions.get(request_id)

    def counts(self) -> dict[State, int]:
        """Sessions per state, every state present (zero included)."""
        return {state: self._counts[state] for state in State}

    def count(self, state: State) -> int:
        return self._counts[state]

    @property
    def in_flight(self) -> int:
        """Sessions with a posted operation not yet settled (``IN_FLIGHT`` + ``QUARANTINED``)."""
        return sum(map(self._counts.__getitem__, IN_FLIGHT_STATES))

    @property
    def quarantined(self) -> int:
        return self._counts[State.QUARANTINED]

    def releasable(self) -> list[str]:
        """Request ids of the sessions that are terminal (hence quiescent: nothing this rank
        posted can still touch their blocks), in the order they ended."""
        return list(self._terminal)

    # --- changing --------------------------------------------------------------------------

    def admit(
        self,
        request_id: str,
        role: Role,
        peer: int,
        block_ids: Iterable[int],
        now: float,
        *,
        queue_timeout_s: float | None = None,
        transfer_timeout_s: float | None = None,
        confirm_grace_s: float | None = None,
    ) -> TransferSession:
        """Add a ``QUEUED`` session; ``DuplicateSessionError`` if the id is already here."""
        if request_id in self._sessions:
            raise DuplicateSessionError(request_id)
        session = TransferSession.admit(
            request_id, role, peer, block_ids, now,
            queue_timeout_s=queue_timeout_s, transfer_timeout_s=transfer_timeout_s,
            confirm_grace_s=confirm_grace_s,
        )
        self._sessions[request_id] = session
        self._counts[session.state] += 1
        self._watch_deadline(session, session.deadline)
        return session

    def apply(
        self,
        request_id: str,
        event: Event,
        now: float,
        *,
        handle: object | None = None,
        reason: FailureReason | str | None = None,
        detail: str | None = None,
        outcome_unknown: bool = False,
    ) -> tuple[Transition, ...]:
        """``TransferSession.apply`` on the session of ``request_id``, keeping the indexes in
        step. Raises ``UnknownSessionError``, ``TransitionError`` or
        ``InvalidArgumentError`` with the table unchanged."""
        session = self._sessions.get(request_id)
        if session is None:
            raise UnknownSessionError(request_id)
        made = session.apply(event, now, handle=handle, reason=reason, detail=detail,
                             outcome_unknown=outcome_unknown)
        self._moved(session, made[0].from_state, made[-1].to_state)
        return made

    def cancel(
        self, request_id: str, *, healthy: bool, cancellable: bool, now: float
    ) -> CancelResult:
        """The host's cancel, decided by the cancel table (see ``decide_cancel``).

        ``CANCELLED_BEFORE_ADVERTISE`` and ``CANCEL_REQUESTED_IN_FLIGHT`` apply ``CANCEL`` to
        the session; the other results change nothing (``BACKEND_UNHEALTHY``: ask again once
        healthy; ``NOT_CANCELLABLE``: the transfer runs to its own end).
        """
        session = self._sessions.get(request_id)
        result = decide_cancel(
            None if session is None else session.state,
            healthy=bool(healthy), cancellable=bool(cancellable),
        )
        if session is not None and result.applies_cancel:
            self.apply(request_id, Event.CANCEL, now)
        return result

    def expire_due(self, now: float) -> list[tuple[TransferSession, tuple[Transition, ...]]]:
        """Apply ``EXPIRE`` to every session whose current deadline is ``<= now`` and return
        each with the transitions made (``QUEUED`` -> ``FAILED(queue_timeout)``,
        ``ADVERTISED`` / ``IN_FLIGHT`` -> ``QUARANTINED(transfer_timeout)``, which settles to
        ``FAILED`` at once when nothing posted is pending). Cost: O(k log n) for k heap
        entries due."""
        expired: list[tuple[TransferSession, tuple[Transition, ...]]] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, _, request_id = heapq.heappop(heap)
            session = self._sessions.get(request_id)
            if session is None or session.deadline != deadline:
                continue  # stale: released, or moved on to a state with another deadline
            expired.append((session, self.apply(request_id, Event.EXPIRE, now)))
        return expired

    def next_deadline(self) -> float | None:
        """The earliest pending deadline (for a loop that wants to sleep until then)."""
        heap = self._deadlines
        while heap:
            deadline, _, request_id = heap[0]
            session = self._sessions.get(request_id)
            if session is not None and session.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def release(self, request_id: str) -> TransferSession:
        """Remove one terminal session and return it (its blocks may go back to the pool).
        ``NotReleasableError`` if it is not terminal."""
        session = self.get(request_id)
        if not session.is_terminal:
            raise NotReleasableError(request_id, session.state)
        self._forget(session)
        return session

    def discard(self, request_id: str) -> None:
        """Undo ``admit``: remove a session that has not moved since (``QUEUED``, no
        transition made), as if never admitted. ``NotReleasableError`` otherwise: a session
        that moved leaves only by ``release`` once terminal."""
        session = self.get(request_id)
        if session.state is not State.QUEUED or session.history:
            raise NotReleasableError(request_id, session.state)
        self._forget(session)

    def pop_releasable(self) -> list[TransferSession]:
        """Remove and return every terminal session, in the order they ended."""
        released = [self._sessions[request_id] for request_id in self._terminal]
        for session in released:
            self._forget(session)
        return released

    # --- bookkeeping -----------------------------------------------------------------------

    def _moved(self, session: TransferSession, before: State, after: State) -> None:
        if after is not before:
            counts = self._counts
            counts[before] -= 1
            counts[after] += 1
            if after in TERMINAL_STATES:
                self._terminal[session.request_id] = None
        # A new deadline (the transfer deadline on advertise) needs a heap entry; IN_FLIGHT
        # keeps ADVERTISED's deadline, whose entry is still in the heap.
        deadline = session.deadline
        if deadline != session._indexed_deadline:
            self._watch_deadline(session, deadline)

    def _watch_deadline(self, session: TransferSession, deadline: float | None) -> None:
        session._indexed_deadline = deadline
        if deadline is None:
            return
        heapq.heappush(self._deadlines, (deadline, next(self._tiebreak), session.request_id))
        self._compact()

    def _compact(self) -> None:
        # Lazy deletion leaves stale entries behind; rebuild when they dominate so memory
        # stays proportional to the live sessions.
        if len(self._deadlines) > 2 * len(self._sessions) + 64:
            live = [
                entry for entry in self._deadlines
                if (s := self._sessions.get(entry[2])) is not None and s.deadline == entry[0]
            ]
            heapq.heapify(live)
            self._deadlines = live

    def _forget(self, session: TransferSession) -> None:
        del self._sessions[session.request_id]
        self._counts[session.state] -= 1
        self._terminal.pop(session.request_id, None)
