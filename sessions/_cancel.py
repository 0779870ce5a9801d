"""``CancelResult``: the six answers to a host's cancel, and whether it may free now."""

from __future__ import annotations

import enum

from kvhandoff.sessions._table import State


class CancelResult(enum.Enum):
    """What ``cancel()`` did. ``safe_to_free`` says whether the host may free the request's
    blocks right away; when it is False the blocks stay pinned until the transfer is quiescent
    (a host ``free()`` meanwhile is deferred by the pool, never lost)."""

    #: Unknown request id, or the session was already released.
    NOT_FOUND = "NOT_FOUND"
    #: The session is terminal (complete, failed or cancelled).
    ALREADY_COMPLETE = "ALREADY_COMPLETE"
    #: It was QUEUED: nobody outside ever saw the blocks (decided before looking at health).
    CANCELLED_BEFORE_ADVERTISE = "CANCELLED_BEFORE_ADVERTISE"
    #: ADVERTISED / IN_FLIGHT / QUARANTINED: cancel recorded and asked of peer and transport.
    CANCEL_REQUESTED_IN_FLIGHT = "CANCEL_REQUESTED_IN_FLIGHT"
    #: In flight while the engine is unhealthy: nothing was asked of the backend; retry later.
    BACKEND_UNHEALTHY = "BACKEND_UNHEALTHY"
    #: The transport cannot cancel the posted operation: the transfer runs to its own end.
    NOT_CANCELLABLE = "NOT_CANCELLABLE"

    __hash__ = object.__hash__  # members are singletons: see ``State``

    @property
    def safe_to_free(self) -> bool:
        """True for exactly ``NOT_FOUND``, ``ALREADY_COMPLETE`` and
        ``CANCELLED_BEFORE_ADVERTISE``."""
        return self in _SAFE_TO_FREE

    @property
    def applies_cancel(self) -> bool:
        """True when the session took the ``CANCEL`` event (``CANCELLED_BEFORE_ADVERTISE``,
        ``CANCEL_REQUESTED_IN_FLIGHT``); the other answers changed nothing."""
        return self in _APPLIES_CANCEL


_SAFE_TO_FREE = frozenset({
    CancelResult.NOT_FOUND,
    CancelResult.ALREADY_COMPLETE,
    CancelResult.CANCELLED_BEFORE_ADVERTISE,
})


_APPLIES_CANCEL = frozenset({
    CancelResult.CANCELLED_BEFORE_ADVERTISE,
    CancelResult.CANCEL_REQUESTED_IN_FLIGHT,
})


# The per-state part of the cancel table. None marks the in-flight states, where the
# answer depends on health and on whether the transport can cancel a posted operation.
_BY_STATE: dict[State, CancelResult | None] = {
    State.QUEUED: CancelResult.CANCELLED_BEFORE_ADVERTISE,
    State.ADVERTISED: None,
    State.IN_FLIGHT: None,
    State.QUARANTINED: None,
    State.COMPLETE: CancelResult.ALREADY_COMPLETE,
    State.FAILED: CancelResult.ALREADY_COMPLETE,
    State.CANCELLED: CancelResult.ALREADY_COMPLETE,
}
# States in which a local operation has been posted (so `cancellable` matters).
_POSTED = frozenset({State.IN_FLIGHT, State.QUARANTINED})


def decide_cancel(state: State | None, *, healthy: bool, cancellable: bool) -> CancelResult:
    """The cancel decision for a session in ``state`` (None: no such session).

    ``QUEUED`` is decided before health is looked at: releasing never-advertised blocks is
    always safe and relieves a struggling backend. ``cancellable`` is whether the transport
    can cancel a posted operation, or (a one-sided transport's receive) ask its peer to give
    the memory up: either way the blocks stay pinned until the operation is final, so the
    answer is never safe to free. Before anything is posted (``ADVERTISED``) it is moot.
    """
    if state is None:
        return CancelResult.NOT_FOUND
    fixed = _BY_STATE[state]
    if fixed is not None:
        return fixed
    if not healthy:
        return CancelResult.BACKEND_UNHEALTHY
    if state in _POSTED and not cancellable:
        return CancelResult.NOT_CANCELLABLE
    return CancelResult.CANCEL_REQUESTED_IN_FLIGHT
