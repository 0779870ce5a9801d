"""``TransferSession``: one request's transfer on one rank, with typed per-state data.

The state is not stored next to the data: it *is* the type of the data (``Queued``,
``Advertised``, ``InFlight``, ...), so an ``IN_FLIGHT`` session always has a handle and a
``QUEUED`` one never has one. Every change goes through ``TransferSession.apply``, which looks
the event up in ``TRANSITIONS`` and validates everything before it changes anything.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from kvhandoff.sessions._table import TRANSITIONS, Event, FailureReason, Role, State
from kvhandoff.sessions.errors import InvalidArgumentError, TransitionError


def _to_reason(value: FailureReason | str) -> FailureReason:
    return FailureReason(value)


@attrs.frozen
class Failure:
    """Why a session failed: one reason of the vocabulary, plus optional free text."""

    reason: FailureReason = attrs.field(converter=_to_reason)
    detail: str | None = None
    #: True when this side could not learn the other side's outcome: a sender that posted
    #: (so the receiver may have every byte) failed without the receiver's word (its lease
    #: lapsed, its extended deadline passed). Never plain success, never a known failure.
    outcome_unknown: bool = False


# --- per-state data --------------------------------------------------------------------------


@attrs.frozen
class Queued:
    """Admitted, nobody outside this process knows the blocks. ``queue_deadline`` is absolute
    (admission time + queue timeout) or None for no deadline."""

    admitted_at: float
    queue_deadline: float | None


@attrs.frozen
class Advertised:
    """The peer was told. ``transfer_deadline`` runs from the handshake."""

    advertised_at: float
    transfer_deadline: float | None


def _not_none(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        raise InvalidArgumentError(attribute.name, value, "a transport handle, never None")


@attrs.frozen
class InFlight:
    """The local operation is posted; ``handle`` is never None. ``local_final``: the handle
    finished successfully but the group has not agreed on the outcome yet. ``confirmed``
    (senders): the receiver confirmed that every byte landed; the outcome is success and
    there is no deadline any more. ``cancel_requested``: the host asked to cancel; the
    session ends ``FAILED(cancelled)`` as soon as it is quiescent."""

    handle: object = attrs.field(validator=_not_none)
    posted_at: float
    transfer_deadline: float | None
    local_final: bool = False
    cancel_requested: bool = False
    confirmed: bool = False


@attrs.frozen
class Quarantined:
    """Failed, error surfaced, but ``handle`` (None when nothing was posted) may still touch
    the blocks until it is final."""

    handle: object | None
    since: float
    failure: Failure
    local_final: bool = False
    cancel_requested: bool = False

    @property
    def quiescent(self) -> bool:
        return self.handle is None or self.local_final


@attrs.frozen
class Complete:
    """Every rank's shard arrived."""

    at: float


@attrs.frozen
class Failed:
    """Failed and quiescent."""

    at: float
    failure: Failure


@attrs.frozen
class Cancelled:
    """Cancelled before advertise."""

    at: float


SessionData = Queued | Advertised | InFlight | Quarantined | Complete | Failed | Cancelled

STATE_OF_DATA: dict[type, State] = {
    Queued: State.QUEUED,
    Advertised: State.ADVERTISED,
    InFlight: State.IN_FLIGHT,
    Quarantined: State.QUARANTINED,
    Complete: State.COMPLETE,
    Failed: State.FAILED,
    Cancelled: State.CANCELLED,
}


@attrs.frozen
class Transition:
    """One entry of a session's history: at ``at``, ``event`` moved it ``from_state`` ->
    ``to_state``. ``failure`` is set on transitions into ``QUARANTINED`` / ``FAILED``."""

    at: float
    from_state: State
    to_state: State
    event: Event
    failure: Failure | None = None


#: One history entry: (at, from state, to state, event, failure) with the enums as indexes.
_Entry = tuple[float, int, int, int, "Failure | None"]
_STATES: tuple[State, ...] = tuple(State)
_EVENTS: tuple[Event, ...] = tuple(Event)
_STATE_INDEX: dict[State, int] = {state: i for i, state in enumerate(_STATES)}
_EVENT_INDEX: dict[Event, int] = {event: i for i, event in enumerate(_EVENTS)}


def _entry(t: Transition) -> _Entry:
    return (t.at, _STATE_INDEX[t.from_state], _STATE_INDEX[t.to_state], _EVENT_INDEX[t.event],
            t.failure)


@attrs.frozen
class SessionSnapshot:
    """A read-only copy of a session at one moment (safe to hand to other code)."""

    request_id: str
    role: Role
    peer: int
    block_ids: tuple[int, ...]
    state: State
    failure: Failure | None
    cancel_requested: bool
    local_final: bool
    deadline: float | None
    history: tuple[Transition, ...]
    confirmed: bool = False


# --- argument checks -------------------------------------------------------------------------

_isfinite = math.isfinite
_EXACT_INT = frozenset({int})


def _check_time(name: str, value: float) -> float:
    if type(value) is float and _isfinite(value):  # the usual case, checked first
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(name, value, "a finite number of seconds")
    return float(value)


def _check_timeout(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if type(value) is float and _isfinite(value) and value > 0:  # the usual case
        return value
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise InvalidArgumentError(name, value, "None (no deadline) or a positive number")
    return float(value)


class BlockIds(tuple[int, ...]):
    """A tuple of block ids that ``check_block_ids`` has validated: distinct non-negative
    exact ints. Passing one to an API that validates block ids again costs nothing, so a
    request's ids are checked once however many layers (engine, pool, session) take them."""

    __slots__ = ()


def _as_id(raw: Any) -> int:
    # ints, numpy integers and integer 0-d tensors (``__index__``); never bools or floats.
    if isinstance(raw, bool):
        return -1
    try:
        return operator.index(raw)
    except TypeError:
        return -1


def check_block_ids(block_ids: Iterable[int]) -> BlockIds:
    """``block_ids`` as ``BlockIds`` (distinct non-negative ints, in the given order), or
    ``InvalidArgumentError`` naming the bad ones. Accepts any iterable of ints or numpy
    integers, and 1-D integer arrays or tensors (read with one ``tolist()``); bools, floats and
    strings are refused. The one validator of block ids: the engine runs it once per request,
    before anything is pinned, and the pool and the session accept its result as it is."""
    if type(block_ids) is BlockIds:
        return block_ids
    if isinstance(block_ids, (str, bytes)):
        raise InvalidArgumentError("block_ids", block_ids, "an iterable of int block ids")
    if getattr(block_ids, "ndim", None) is not None and hasattr(block_ids, "tolist"):
        if block_ids.ndim != 1:  # type: ignore[attr-defined]
            raise InvalidArgumentError("block_ids", block_ids, "a 1-D array of block ids")
        block_ids = block_ids.tolist()  # type: ignore[attr-defined]
    ids = tuple(block_ids)
    if not _EXACT_INT.issuperset(map(type, ids)) or (ids and min(ids) < 0):
        # The C-level passes above cover the usual case: only exact ints (so no bool), no
        # negative; a transfer may list tens of thousands of blocks. Else one step per id.
        converted = tuple(map(_as_id, ids))
        bad = [raw for raw, value in zip(ids, converted, strict=True) if value < 0]
        if bad:
            raise InvalidArgumentError("block_ids", bad, "non-negative int block ids")
        ids = converted
    if len(set(ids)) != len(ids):
        raise InvalidArgumentError("block_ids", ids, "distinct block ids")
    return BlockIds(ids)


# --- building the next state's data ----------------------------------------------------------
# One builder per (from state, event) that the table allows. A builder raises TransitionError
# with a detail when a precondition on the data does not hold. They only build: nothing is
# changed until every check has passed.

_Builder = Callable[["TransferSession", Any, float, object | None, Failure | None], SessionData]


def _refuse(session: TransferSession, event: Event, detail: str) -> TransitionError:
    return TransitionError(session.request_id, session.state, event, detail)


def _advertise(s: TransferSession, d: Queued, now: float, h: object, f: Failure | None) -> Any:
    deadline = None if s.transfer_timeout_s is None else now + s.transfer_timeout_s
    return Advertised(advertised_at=now, transfer_deadline=deadline)


def _post(s: TransferSession, d: Advertised, now: float, h: object, f: Failure | None) -> Any:
    deadline = d.transfer_deadline
    if s.role is Role.SENDER and deadline is not None and s.confirm_grace_s is not None:
        # Once a sender posted, the receiver may get every byte: its outcome is the
        # receiver's word, which the receiver's own (earlier) deadline bounds; the grace
        # keeps a late word from meeting a sender that already gave up.
        deadline += s.confirm_grace_s
    return InFlight(handle=h, posted_at=now, transfer_deadline=deadline)


def _local_done(s: TransferSession, d: InFlight, now: float, h: object, f: Failure | None) -> Any:
    if d.local_final:
        raise _refuse(s, Event.HANDLE_DONE, "the local handle is already final")
    # Every transfer passes here: built directly, as ``attrs.evolve`` costs several times more.
    return InFlight(handle=d.handle, posted_at=d.posted_at, transfer_deadline=d.transfer_deadline,
                    local_final=True, cancel_requested=d.cancel_requested,
                    confirmed=d.confirmed)


def _confirm(s: TransferSession, d: InFlight, now: float, h: object, f: Failure | None) -> Any:
    if s.role is not Role.SENDER:
        raise _refuse(s, Event.CONFIRMED, "only a sender is confirmed by its receiver")
    if d.confirmed:
        raise _refuse(s, Event.CONFIRMED, "the receiver confirmed already")
    # Every send passes here: built directly, as in ``_local_done``.
    return InFlight(handle=d.handle, posted_at=d.posted_at, transfer_deadline=d.transfer_deadline,
                    local_final=d.local_final, cancel_requested=d.cancel_requested,
                    confirmed=True)


def _local_failed(s: TransferSession, d: InFlight, now: float, h: object,
                  f: Failure | None) -> Any:
    if d.local_final:
        raise _refuse(s, Event.HANDLE_FAILED, "the local handle is already final")
    return Failed(at=now, failure=f or Failure(FailureReason.TRANSPORT_ERROR))


def _completed(s: TransferSession, d: InFlight, now: float, h: object, f: Failure | None) -> Any:
    if not d.local_final:
        raise _refuse(s, Event.COMPLETED, "the local handle is not final yet (apply HANDLE_DONE)")
    if s.role is Role.SENDER and not d.confirmed:
        raise _refuse(s, Event.COMPLETED, "the receiver has not confirmed (apply CONFIRMED)")
    return Complete(at=now)


def _cancel_queued(s: TransferSession, d: Queued, now: float, h: object,
                   f: Failure | None) -> Any:
    return Cancelled(at=now)


def _cancel_advertised(s: TransferSession, d: Advertised, now: float, h: object,
                       f: Failure | None) -> Any:
    return Failed(at=now, failure=Failure(FailureReason.CANCELLED))


def _request_cancel(s: TransferSession, d: Any, now: float, h: object, f: Failure | None) -> Any:
    return attrs.evolve(d, cancel_requested=True)


def _check_due(s: TransferSession, deadline: float | None, now: float) -> None:
    if deadline is None or now < deadline:
        raise _refuse(s, Event.EXPIRE, f"deadline {deadline} not reached at {now}")


def _expire_queued(s: TransferSession, d: Queued, now: float, h: object,
                   f: Failure | None) -> Any:
    _check_due(s, d.queue_deadline, now)
    return Failed(at=now, failure=f or Failure(FailureReason.QUEUE_TIMEOUT))


def _expire_advertised(s: TransferSession, d: Advertised, now: float, h: object,
                       f: Failure | None) -> Any:
    _check_due(s, d.transfer_deadline, now)
    return Quarantined(handle=None, since=now,
                       failure=f or Failure(FailureReason.TRANSFER_TIMEOUT))


def _expire_in_flight(s: TransferSession, d: InFlight, now: float, h: object,
                      f: Failure | None) -> Any:
    _check_due(s, None if d.confirmed else d.transfer_deadline, now)
    # A sender that posted and hears nothing from its receiver cannot know whether the
    # receiver got every byte: its failure says the outcome is unknown.
    unknown = s.role is Role.SENDER
    return Quarantined(handle=d.handle, since=now,
                       failure=f or Failure(FailureReason.TRANSFER_TIMEOUT,
                                            outcome_unknown=unknown),
                       local_final=d.local_final, cancel_requested=d.cancel_requested)


def _abort_queued(s: TransferSession, d: Queued, now: float, h: object, f: Failure | None) -> Any:
    assert f is not None  # apply() checked that ABORT carries a reason
    return Failed(at=now, failure=f)


def _abort_advertised(s: TransferSession, d: Advertised, now: float, h: object,
                      f: Failure | None) -> Any:
    assert f is not None
    return Quarantined(handle=None, since=now, failure=f)


def _abort_in_flight(s: TransferSession, d: InFlight, now: float, h: object,
                     f: Failure | None) -> Any:
    assert f is not None
    return Quarantined(handle=d.handle, since=now, failure=f, local_final=d.local_final,
                       cancel_requested=d.cancel_requested)


def _keep(s: TransferSession, d: Any, now: float, h: object, f: Failure | None) -> Any:
    return d


def _settle_cancel(s: TransferSession, d: InFlight, now: float, h: object,
                   f: Failure | None) -> Any:
    if not (d.cancel_requested and d.local_final):
        raise _refuse(s, Event.QUIESCED, "only a cancelled session with a final handle settles")
    return Failed(at=now, failure=Failure(FailureReason.CANCELLED))


def _quarantine_final(s: TransferSession, d: Quarantined, now: float, h: object,
                      f: Failure | None) -> Any:
    # A quarantined session's handle is always pending (a final one settles at once), and
    # the reason that surfaced first stays the session's reason.
    return Failed(at=now, failure=d.failure)


def _settle_quarantine(s: TransferSession, d: Quarantined, now: float, h: object,
                       f: Failure | None) -> Any:
    if not d.quiescent:
        raise _refuse(s, Event.QUIESCED, "the handle is not final yet")
    return Failed(at=now, failure=d.failure)


_BUILDERS: dict[tuple[State, Event], _Builder] = {
    (State.QUEUED, Event.ADVERTISE): _advertise,
    (State.QUEUED, Event.CANCEL): _cancel_queued,
    (State.QUEUED, Event.EXPIRE): _expire_queued,
    (State.QUEUED, Event.ABORT): _abort_queued,
    (State.ADVERTISED, Event.POSTED): _post,
    (State.ADVERTISED, Event.CANCEL): _cancel_advertised,
    (State.ADVERTISED, Event.EXPIRE): _expire_advertised,
    (State.ADVERTISED, Event.ABORT): _abort_advertised,
    (State.IN_FLIGHT, Event.HANDLE_DONE): _local_done,
    (State.IN_FLIGHT, Event.HANDLE_FAILED): _local_failed,
    (State.IN_FLIGHT, Event.CONFIRMED): _confirm,
    (State.IN_FLIGHT, Event.COMPLETED): _completed,
    (State.IN_FLIGHT, Event.CANCEL): _request_cancel,
    (State.IN_FLIGHT, Event.EXPIRE): _expire_in_flight,
    (State.IN_FLIGHT, Event.ABORT): _abort_in_flight,
    (State.IN_FLIGHT, Event.QUIESCED): _settle_cancel,
    (State.QUARANTINED, Event.HANDLE_DONE): _quarantine_final,
    (State.QUARANTINED, Event.HANDLE_FAILED): _quarantine_final,
    (State.QUARANTINED, Event.CANCEL): _request_cancel,
    (State.QUARANTINED, Event.ABORT): _keep,  # already failed: the first reason travels
    (State.QUARANTINED, Event.QUIESCED): _settle_quarantine,
}

#: ``TRANSITIONS`` and ``_BUILDERS`` joined: state -> event -> (next state, builder), so that
#: ``apply`` makes one lookup per transition. A miss is an illegal event, as in ``next_state``.
_STEPS: dict[State, dict[Event, tuple[State, _Builder]]] = {
    state: {event: (target, _BUILDERS[(state, event)]) for event, target in row.items()}
    for state, row in TRANSITIONS.items()
}

# Which events take which keyword arguments of apply().
_TAKES_HANDLE = frozenset({Event.POSTED})
_TAKES_REASON = frozenset({Event.ABORT, Event.HANDLE_FAILED, Event.EXPIRE})
_NEEDS_REASON = frozenset({Event.ABORT})
_REASON_EVENTS = "no reason or detail except with ABORT, HANDLE_FAILED, EXPIRE"


def _waits_only_for_quiescence(data: SessionData) -> bool:
    """The state-triggered rule (see the table's theory of operation)."""
    if type(data) is Quarantined:
        return data.quiescent
    if type(data) is InFlight:
        return data.cancel_requested and data.local_final
    return False


@attrs.define(eq=False)
class TransferSession:
    """One request's transfer on this rank.

    ``data`` is the per-state record; ``state`` is derived from its type. ``history`` lists
    every transition, oldest first. Create with ``TransferSession.admit``; change only with
    ``apply`` (a ``SessionTable`` does both and keeps its indexes in step).
    """

    request_id: str
    role: Role
    peer: int
    block_ids: tuple[int, ...]
    queue_timeout_s: float | None
    transfer_timeout_s: float | None
    data: SessionData
    #: When the session was admitted (the start of ``TransferResult.seconds``).
    admitted_at: float = 0.0
    #: A sender that posted waits this long past its transfer deadline for the receiver's
    #: word (None: not at all).
    confirm_grace_s: float | None = None
    #: The transitions made, each kept as plain values (``_entry``): a tuple of floats, ints
    #: and None is untracked by Python's cyclic collector, where a ``Transition`` would be
    #: one more object per transition for every pass to walk while the session lives.
    _history: list[_Entry] = attrs.field(factory=list)
    #: The deadline a ``SessionTable`` last indexed for this session (its heap has it):
    #: a transition that leaves the deadline as it was needs no new entry.
    _indexed_deadline: float | None = attrs.field(default=None, init=False, repr=False)

    @classmethod
    def admit(
        cls,
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
        """A new ``QUEUED`` session. ``queue_timeout_s`` bounds the wait before advertise
        (from now), ``transfer_timeout_s`` the transfer (from advertise); None = no bound.
        ``confirm_grace_s`` (senders) extends the transfer deadline once posted, for the
        receiver's word (see the table's theory of operation)."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidArgumentError("request_id", request_id, "a non-empty str")
        if not isinstance(role, Role):
            raise InvalidArgumentError("role", role, "Role.SENDER or Role.RECEIVER")
        if isinstance(peer, bool) or not isinstance(peer, int) or peer < 0:
            raise InvalidArgumentError("peer", peer, "a non-negative int rank")
        now = _check_time("now", now)
        queue_timeout = _check_timeout("queue_timeout_s", queue_timeout_s)
        transfer_timeout = _check_timeout("transfer_timeout_s", transfer_timeout_s)
        confirm_grace = _check_timeout("confirm_grace_s", confirm_grace_s)
        deadline = None if queue_timeout is None else now + queue_timeout
        return cls(
            request_id=request_id,
            role=role,
            peer=peer,
            block_ids=check_block_ids(block_ids),
            queue_timeout_s=queue_timeout,
            transfer_timeout_s=transfer_timeout,
            data=Queued(admitted_at=now, queue_deadline=deadline),
            admitted_at=now,
            confirm_grace_s=confirm_grace,
        )

    # --- reading ---------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return STATE_OF_DATA[type(self.data)]

    def allows(self, event: Event) -> bool:
        """True when ``event`` is legal in the current state (``TRANSITIONS``; a precondition
        on the data may still refuse it)."""
        return event in _STEPS[STATE_OF_DATA[type(self.data)]]

    @property
    def history(self) -> tuple[Transition, ...]:
        return tuple(Transition(at, _STATES[f], _STATES[t], _EVENTS[e], failure)
                     for at, f, t, e, failure in self._history)

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    @property
    def handle(self) -> object | None:
        """The posted operation's handle while one may still be pending or awaiting
        agreement (``IN_FLIGHT``, ``QUARANTINED``), else None."""
        return getattr(self.data, "handle", None)

    @property
    def local_final(self) -> bool:
        return bool(getattr(self.data, "local_final", False))

    @property
    def confirmed(self) -> bool:
        """A sender's receiver confirmed that every byte landed (``IN_FLIGHT`` only: after
        that the session completes or, in a TP group, fails with the group)."""
        return bool(getattr(self.data, "confirmed", False))

    @property
    def cancel_requested(self) -> bool:
        return bool(getattr(self.data, "cancel_requested", False))

    @property
    def quiescent(self) -> bool:
        """True when no operation posted by this rank can still touch the blocks."""
        return self.handle is None or self.local_final

    @property
    def failure(self) -> Failure | None:
        """Set in ``QUARANTINED`` and ``FAILED``."""
        return getattr(self.data, "failure", None)

    @property
    def deadline(self) -> float | None:
        """The deadline that ``EXPIRE`` answers to in the current state (queue deadline while
        ``QUEUED``, transfer deadline while ``ADVERTISED`` / ``IN_FLIGHT``), else None."""
        data = self.data
        # Exact types (the per-state classes are final; ``state`` dispatches on type too).
        if type(data) is Queued:
            return data.queue_deadline
        if type(data) is InFlight:
            return None if data.confirmed else data.transfer_deadline
        if type(data) is Advertised:
            return data.transfer_deadline
        return None

    def snapshot(self) -> SessionSnapshot:
        return SessionSnapshot(
            request_id=self.request_id,
            role=self.role,
            peer=self.peer,
            block_ids=self.block_ids,
            state=self.state,
            failure=self.failure,
            cancel_requested=self.cancel_requested,
            local_final=self.local_final,
            deadline=self.deadline,
            history=self.history,
            confirmed=self.confirmed,
        )

    # --- changing --------------------------------------------------------------------------

    def apply(
        self,
        event: Event,
        now: float,
        *,
        handle: object | None = None,
        reason: FailureReason | str | None = None,
        detail: str | None = None,
        outcome_unknown: bool = False,
    ) -> tuple[Transition, ...]:
        """Apply ``event`` at time ``now`` and return the transitions made (one, or two when
        the new state at once fires ``QUIESCED``), each appended to ``history``.

        ``handle`` is required with ``POSTED`` and refused elsewhere. ``reason`` (a
        ``FailureReason`` or its value) is required with ``ABORT`` and optional with
        ``HANDLE_FAILED`` (default ``transport_error``) and ``EXPIRE`` (default
        ``queue_timeout`` / ``transfer_timeout``); ``outcome_unknown`` (with ``ABORT`` only)
        marks a failure decided without the other side's word. An illegal event raises
        ``TransitionError``, a bad argument ``InvalidArgumentError``; either way the session
        is unchanged.
        """
        if type(event) is not Event:  # Event has members, so it has no subclasses
            raise InvalidArgumentError("event", event, "an Event member")
        data = self.data
        from_state = STATE_OF_DATA[type(data)]
        try:
            to_state, build = _STEPS[from_state][event]
        except KeyError:
            raise TransitionError(self.request_id, from_state, event) from None
        if type(now) is not float or not _isfinite(now):
            now = _check_time("now", now)
        history = self._history
        if history and now < history[-1][0]:
            raise InvalidArgumentError(
                "now", now, f"a time not before the last transition ({history[-1][0]})"
            )
        if (handle is not None) != (event in _TAKES_HANDLE):
            raise InvalidArgumentError(
                "handle", handle, "a handle with POSTED (and only with POSTED)"
            )
        if outcome_unknown and event is not Event.ABORT:
            raise InvalidArgumentError("outcome_unknown", outcome_unknown,
                                       "outcome_unknown only with ABORT")
        failure = None
        if reason is None:
            if event in _NEEDS_REASON:
                raise InvalidArgumentError("reason", reason, f"a FailureReason with {event.name}")
            if detail is not None:
                if event not in _TAKES_REASON:
                    raise InvalidArgumentError("reason", reason, _REASON_EVENTS)
                raise InvalidArgumentError(
                    "detail", detail, "a detail only together with a reason"
                )
        else:
            if event not in _TAKES_REASON:
                raise InvalidArgumentError("reason", reason, _REASON_EVENTS)
            try:
                failure = Failure(FailureReason(reason), detail, bool(outcome_unknown))
            except ValueError:
                raise InvalidArgumentError(
                    "reason", reason, "one of " + ", ".join(r.value for r in FailureReason)
                ) from None

        data = build(self, data, now, handle, failure)
        made: tuple[Transition, ...] = (
            Transition(now, from_state, to_state, event, getattr(data, "failure", None)),
        )
        # State-triggered: a session that only waits for quiescence and has it settles now.
        if _waits_only_for_quiescence(data):
            settled_to, settle = _STEPS[to_state][Event.QUIESCED]
            data = settle(self, data, now, None, None)
            made += (Transition(now, to_state, settled_to, Event.QUIESCED,
                                getattr(data, "failure", None)),)
        self.data = data
        history.extend(map(_entry, made))
        return made
