"""The transition table, pair by pair: every (state, event), legal or not."""

from __future__ import annotations

import itertools

import pytest
from kvhandoff.sessions import (
    TERMINAL_STATES,
    TRANSITIONS,
    Event,
    FailureReason,
    Role,
    State,
    TransferSession,
    TransitionError,
    next_state,
)

QUEUE_TIMEOUT = 10.0
TRANSFER_TIMEOUT = 10.0
LATE = 100.0  # past every deadline of a session built by `build`


class Handle:
    """An opaque transport handle: sessions never call it."""


def build(state: State, *, local_final: bool = False,
          role: Role = Role.RECEIVER) -> TransferSession:
    """A session in ``state``; IN_FLIGHT / QUARANTINED ones hold a pending handle unless
    ``local_final``."""
    s = TransferSession.admit("req", role, 3, [4, 5], 0.0,
                              queue_timeout_s=QUEUE_TIMEOUT, transfer_timeout_s=TRANSFER_TIMEOUT)
    if state is State.QUEUED:
        return s
    if state is State.CANCELLED:
        s.apply(Event.CANCEL, 1.0)
        return s
    s.apply(Event.ADVERTISE, 1.0)
    if state is State.ADVERTISED:
        return s
    s.apply(Event.POSTED, 2.0, handle=Handle())
    if state is State.QUARANTINED:
        s.apply(Event.ABORT, 3.0, reason=FailureReason.PEER_FAILED)
        return s
    if state is State.FAILED:
        s.apply(Event.HANDLE_FAILED, 3.0)
        return s
    if state is State.COMPLETE or local_final:
        s.apply(Event.HANDLE_DONE, 3.0)
    if state is State.COMPLETE:
        s.apply(Event.COMPLETED, 4.0)
    return s


def arguments(event: Event) -> dict[str, object]:
    if event is Event.POSTED:
        return {"handle": Handle()}
    if event is Event.ABORT:
        return {"reason": FailureReason.PEER_LOST}
    return {}


ALL_PAIRS = list(itertools.product(State, Event))
LEGAL = [(s, e) for s, e in ALL_PAIRS if e in TRANSITIONS[s]]
ILLEGAL = [(s, e) for s, e in ALL_PAIRS if e not in TRANSITIONS[s]]
# Legal in the table but guarded by a precondition on the session's data.
NEEDS_LOCAL_FINAL = {(State.IN_FLIGHT, Event.COMPLETED)}
# ``build`` makes receivers, and only a sender is confirmed by its peer.
NEEDS_SENDER = {(State.IN_FLIGHT, Event.CONFIRMED)}
STATE_TRIGGERED = {(State.IN_FLIGHT, Event.QUIESCED), (State.QUARANTINED, Event.QUIESCED)}
GUARDED = [
    (State.IN_FLIGHT, Event.COMPLETED),
    (State.IN_FLIGHT, Event.CONFIRMED),
    (State.IN_FLIGHT, Event.QUIESCED),
    (State.QUARANTINED, Event.QUIESCED),
]


def test_table_guarded_pairs_are_the_legal_pairs_a_fresh_session_refuses() -> None:
    # Checks this file's lists against the real table and TransferSession: a pair is guarded
    # when TRANSITIONS allows it yet a session built in that state (pending handle, no
    # cancel requested) refuses it, leaving the session unchanged.
    refused = set()
    for state, event in LEGAL:
        session = build(state)
        data, history = session.data, session.history
        try:
            session.apply(event, LATE, **arguments(event))  # type: ignore[arg-type]
        except TransitionError as error:
            assert error.detail, (state, event)  # a guard says why; a table miss does not
            assert session.data is data and session.history == history
            refused.add((state, event))
    assert refused == set(GUARDED)
    assert set(GUARDED) == NEEDS_LOCAL_FINAL | NEEDS_SENDER | STATE_TRIGGERED
    assert set(GUARDED) <= set(LEGAL)
    # The state-triggered pairs are exactly the table's QUIESCED entries.
    assert {(s, e) for s, e in LEGAL if e is Event.QUIESCED} == STATE_TRIGGERED


def test_table_has_a_row_for_every_state_and_terminal_rows_are_empty() -> None:
    assert set(TRANSITIONS) == set(State)
    assert {State.COMPLETE, State.FAILED, State.CANCELLED} == TERMINAL_STATES
    for state in State:
        assert (not TRANSITIONS[state]) == (state in TERMINAL_STATES) == state.is_terminal


def test_table_every_state_reaches_a_terminal_state() -> None:
    reachable = {State.QUEUED}
    frontier = [State.QUEUED]
    while frontier:
        for target in TRANSITIONS[frontier.pop()].values():
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(State)
    for state in State:
        seen, todo = {state}, [state]
        while todo:
            for target in TRANSITIONS[todo.pop()].values():
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        assert seen & TERMINAL_STATES, state


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=lambda x: x.name)
def test_table_illegal_pair_raises_and_leaves_session_unchanged(state: State, event: Event) -> None:
    session = build(state)
    data, history = session.data, session.history
    with pytest.raises(TransitionError) as info:
        session.apply(event, LATE, **arguments(event))  # type: ignore[arg-type]
    error = info.value
    assert (error.request_id, error.state, error.event) == ("req", state, event)
    assert error.detail is None
    assert error.__cause__ is None and error.__suppress_context__  # raised `from None`
    assert session.data is data and session.history == history
    with pytest.raises(TransitionError):
        next_state("req", state, event)


@pytest.mark.parametrize(("state", "event"), [p for p in LEGAL if p not in STATE_TRIGGERED],
                         ids=lambda x: x.name)
def test_table_legal_pair_moves_to_the_table_target(state: State, event: Event) -> None:
    session = build(state, local_final=(state, event) in NEEDS_LOCAL_FINAL,
                    role=Role.SENDER if (state, event) in NEEDS_SENDER else Role.RECEIVER)
    made = session.apply(event, LATE, **arguments(event))  # type: ignore[arg-type]
    first = made[0]
    assert (first.from_state, first.event, first.to_state) == (
        state, event, TRANSITIONS[state][event]
    )
    assert first.at == LATE
    assert session.history[-len(made):] == made
    # Only a state-triggered QUIESCED may follow, and it follows the table too.
    for extra in made[1:]:
        assert extra.event is Event.QUIESCED
        assert TRANSITIONS[extra.from_state][Event.QUIESCED] is extra.to_state
    assert session.state is made[-1].to_state


@pytest.mark.parametrize(("state", "event"), GUARDED, ids=lambda x: x.name)
def test_table_guarded_pair_refused_while_precondition_fails(state: State, event: Event) -> None:
    session = build(state)  # pending handle, no cancel requested
    data, history = session.data, session.history
    with pytest.raises(TransitionError) as info:
        session.apply(event, LATE)
    assert info.value.detail
    assert session.data is data and session.history == history


def test_table_quiesced_fires_for_cancelled_in_flight_once_handle_final() -> None:
    session = build(State.IN_FLIGHT)
    session.apply(Event.CANCEL, 3.0)
    assert session.state is State.IN_FLIGHT and session.cancel_requested
    made = session.apply(Event.HANDLE_DONE, 4.0)
    assert [(t.from_state, t.event, t.to_state) for t in made] == [
        (State.IN_FLIGHT, Event.HANDLE_DONE, State.IN_FLIGHT),
        (State.IN_FLIGHT, Event.QUIESCED, State.FAILED),
    ]
    assert session.failure is not None and session.failure.reason is FailureReason.CANCELLED


def test_table_quiesced_fires_for_quarantine_without_pending_handle() -> None:
    session = build(State.IN_FLIGHT, local_final=True)
    made = session.apply(Event.ABORT, 5.0, reason="peer_failed")
    assert [(t.from_state, t.event, t.to_state) for t in made] == [
        (State.IN_FLIGHT, Event.ABORT, State.QUARANTINED),
        (State.QUARANTINED, Event.QUIESCED, State.FAILED),
    ]
    assert session.failure is not None and session.failure.reason is FailureReason.PEER_FAILED
