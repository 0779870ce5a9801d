"""The transfer state machine: states, events and the one transition table.

Theory of operation
===================

A ``TransferSession`` follows one request's KV blocks on one rank, on the sending side (the
prefill rank) or the receiving side (the decode rank). What matters in each state is *who may
touch the session's memory*:

``QUEUED``
    Registered locally, blocks pinned, no peer has been told. Only this process knows the
    block ids, so nothing outside it can touch them: cancelling or timing out frees at once.
``ADVERTISED``
    The handshake happened (sent or received): the peer knows the block ids. This rank has
    posted no data operation yet, and kvhandoff's transports are two-sided (a peer can only
    move data into or out of memory through an operation this rank posted), so the local
    side is still quiescent; the transfer deadline runs from here.
``IN_FLIGHT``
    The local data operation is posted and its handle is owned by the session: the transport
    may read or write the blocks until the handle reaches a final state. ``local_final`` says
    the handle is final while the group (a TP group, or the peer) has not yet agreed on the
    outcome: *quiescence* (is the memory ours again?) and *outcome* (did it work?) are
    separate questions. A *sender*'s outcome is the receiver's: it completes only once the
    receiver confirmed that every byte landed (``CONFIRMED``: the receiver's DONE), which may
    come before or after its own handle is final. A confirmed sender has no deadline any more
    (its outcome is decided, only quiescence is left); an unconfirmed one that posted waits
    ``confirm_grace_s`` past its transfer deadline for the receiver's word, since the
    receiver's own deadline (which runs from its advertise, earlier) decides first.
``QUARANTINED``
    The session has failed (deadline, peer failure, lapsed lease) and the error is surfaced to
    the caller at once, but its handle is not final: the handle and the blocks stay pinned.
    It becomes ``FAILED`` when the handle reaches a final state.
``COMPLETE`` / ``FAILED`` / ``CANCELLED``
    Terminal. Nothing touches the memory any more: the blocks are releasable. ``CANCELLED``
    means cancelled before advertise; a cancel after advertise ends ``FAILED`` with the reason
    ``cancelled`` once the session is quiescent.

Every transition is a lookup in ``TRANSITIONS``; a miss raises ``TransitionError`` and leaves
the session unchanged. The one rule outside the table is a *state-triggered* event, as in
h11: a session that only waits for quiescence (``QUARANTINED``, or cancel requested) and is
already quiescent fires ``QUIESCED`` at once, so failure never waits for a handle that is
already final or was never posted. That event, too, goes through the table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from kvhandoff.sessions.errors import TransitionError


class State(enum.Enum):
    """The seven states of a transfer session (see the module docstring)."""

    QUEUED = "QUEUED"
    ADVERTISED = "ADVERTISED"
    IN_FLIGHT = "IN_FLIGHT"
    QUARANTINED = "QUARANTINED"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    # Members are singletons and ``==`` is identity, so identity hashing agrees with equality;
    # it spares every table lookup Enum's Python-level ``hash(self._name_)``.
    __hash__ = object.__hash__

    @property
    def is_terminal(self) -> bool:
        """True for ``COMPLETE``, ``FAILED`` and ``CANCELLED``."""
        return self in TERMINAL_STATES


class Event(enum.Enum):
    """What can happen to a session. The name travels as ``trigger`` in ``session.transition``
    log lines."""

    #: The handshake with the peer happened (sent or received); starts the transfer deadline.
    ADVERTISE = "ADVERTISE"
    #: The local data operation was posted; carries its handle.
    POSTED = "POSTED"
    #: The local handle reached a final state successfully.
    HANDLE_DONE = "HANDLE_DONE"
    #: The local handle reached a final state with a transport error; carries the reason.
    HANDLE_FAILED = "HANDLE_FAILED"
    #: Every rank's shard arrived (for a single rank: its own handle is done).
    COMPLETED = "COMPLETED"
    #: The receiver confirmed that every byte landed and its side completed (its DONE): a
    #: sender's outcome is success, whether or not its own handle is final yet.
    CONFIRMED = "CONFIRMED"
    #: The host asked to cancel.
    CANCEL = "CANCEL"
    #: The current deadline passed (queue deadline in QUEUED, transfer deadline after).
    EXPIRE = "EXPIRE"
    #: The outcome is failure for a reason that is not the local handle's: a peer rank failed,
    #: the peer's lease lapsed, a control message was invalid. Carries the reason.
    ABORT = "ABORT"
    #: State-triggered: the session waits only for quiescence and is quiescent.
    QUIESCED = "QUIESCED"

    __hash__ = object.__hash__  # as for ``State``


class Role(enum.Enum):
    """Which side of the transfer this rank is."""

    SENDER = "sender"
    RECEIVER = "receiver"

    __hash__ = object.__hash__  # as for ``State``


class FailureReason(str, enum.Enum):
    """Why a session failed: a small vocabulary, carried with an optional free-text detail.
    The value is what logs and control messages carry."""

    QUEUE_TIMEOUT = "queue_timeout"
    TRANSFER_TIMEOUT = "transfer_timeout"
    TRANSPORT_ERROR = "transport_error"
    PEER_LOST = "peer_lost"
    PEER_FAILED = "peer_failed"
    CANCELLED = "cancelled"
    LAYOUT_MISMATCH = "layout_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    PROTOCOL_ERROR = "protocol_error"
    CHECKSUM_MISMATCH = "checksum_mismatch"

    def __str__(self) -> str:
        return self.value


_S = State
_E = Event

#: The whole state machine. Terminal states map to ``{}``. Self-transitions record data
#: (``HANDLE_DONE`` sets ``local_final``; ``CANCEL`` sets ``cancel_requested``).
TRANSITIONS: Mapping[State, Mapping[Event, State]] = MappingProxyType({
    _S.QUEUED: MappingProxyType({
        _E.ADVERTISE: _S.ADVERTISED,
        _E.CANCEL: _S.CANCELLED,
        _E.EXPIRE: _S.FAILED,  # queue_timeout: nobody outside ever saw the blocks
        _E.ABORT: _S.FAILED,
    }),
    _S.ADVERTISED: MappingProxyType({
        _E.POSTED: _S.IN_FLIGHT,
        _E.CANCEL: _S.FAILED,  # reason cancelled; no local operation was posted
        _E.EXPIRE: _S.QUARANTINED,  # transfer_timeout; settles at once (no handle)
        _E.ABORT: _S.QUARANTINED,
    }),
    _S.IN_FLIGHT: MappingProxyType({
        _E.HANDLE_DONE: _S.IN_FLIGHT,  # local_final; the outcome is still the group's
        _E.HANDLE_FAILED: _S.FAILED,
        _E.CONFIRMED: _S.IN_FLIGHT,  # a sender's confirmed; the deadline goes
        _E.COMPLETED: _S.COMPLETE,  # precondition: local_final (and a sender confirmed)
        _E.CANCEL: _S.IN_FLIGHT,  # cancel_requested; FAILED(cancelled) once quiescent
        _E.EXPIRE: _S.QUARANTINED,
        _E.ABORT: _S.QUARANTINED,
        _E.QUIESCED: _S.FAILED,  # precondition: cancel_requested and local_final
    }),
    _S.QUARANTINED: MappingProxyType({
        _E.HANDLE_DONE: _S.FAILED,
        _E.HANDLE_FAILED: _S.FAILED,
        _E.CANCEL: _S.QUARANTINED,  # recorded; the reason stays the first one
        _E.ABORT: _S.QUARANTINED,  # already failed: the first reason wins
        _E.QUIESCED: _S.FAILED,  # precondition: no pending handle
    }),
    _S.COMPLETE: MappingProxyType({}),
    _S.FAILED: MappingProxyType({}),
    _S.CANCELLED: MappingProxyType({}),
})

TERMINAL_STATES: frozenset[State] = frozenset(s for s, row in TRANSITIONS.items() if not row)

# ``TRANSITIONS`` as plain dicts, for lookups on the hot path (a mapping proxy costs a call).
_NEXT: dict[State, dict[Event, State]] = {s: dict(row) for s, row in TRANSITIONS.items()}


#: The states in which the peer knows the blocks and the outcome is still open: expiry there
#: quarantines instead of failing at once (``ADVERTISED``, ``IN_FLIGHT``).
OPEN_STATES: frozenset[State] = frozenset(
    s for s, row in TRANSITIONS.items() if row.get(Event.EXPIRE) is State.QUARANTINED)

#: The states with a posted local operation that is not settled yet: those that wait for the
#: handle (``HANDLE_DONE`` is legal) without being done with it (``IN_FLIGHT``,
#: ``QUARANTINED``). The health monitor's progress clock runs while there are any.
IN_FLIGHT_STATES: frozenset[State] = frozenset(
    s for s, row in TRANSITIONS.items() if Event.HANDLE_DONE in row)


def allows(state: State, event: Event) -> bool:
    """True when ``event`` is legal in ``state`` (a lookup in ``TRANSITIONS``)."""
    return event in _NEXT[state]


def next_state(request_id: str, state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``; ``TransitionError`` if it is not legal."""
    try:
        return _NEXT[state][event]
    except KeyError:
        raise TransitionError(request_id, state, event) from None
