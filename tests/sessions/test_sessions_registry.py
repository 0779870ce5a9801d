"""SessionTable: ids, counts, cancel decisions, deadlines by heap, release; and the exports."""

from __future__ import annotations

import itertools
import types

import kvhandoff.sessions as sessions_pkg
import pytest
from kvhandoff.sessions import (
    CancelResult,
    DuplicateSessionError,
    Event,
    FailureReason,
    NotReleasableError,
    Role,
    SessionTable,
    State,
    UnknownSessionError,
    decide_cancel,
)


def drive(table: SessionTable, rid: str, state: State, now: float = 1.0) -> None:
    """Admit ``rid`` and bring it to ``state`` (IN_FLIGHT / QUARANTINED with a pending
    handle)."""
    table.admit(rid, Role.SENDER, 1, [hash(rid) % 1000], 0.0,
                queue_timeout_s=50.0, transfer_timeout_s=50.0)
    if state is State.QUEUED:
        return
    if state is State.CANCELLED:
        table.apply(rid, Event.CANCEL, now)
        return
    table.apply(rid, Event.ADVERTISE, now)
    if state is State.ADVERTISED:
        return
    table.apply(rid, Event.POSTED, now, handle=object())
    if state is State.QUARANTINED:
        table.apply(rid, Event.ABORT, now, reason="peer_lost")
    elif state is State.FAILED:
        table.apply(rid, Event.HANDLE_FAILED, now)
    elif state is State.COMPLETE:
        table.apply(rid, Event.HANDLE_DONE, now)
        table.apply(rid, Event.CONFIRMED, now)  # a sender completes on its receiver's word
        table.apply(rid, Event.COMPLETED, now)


# The cancel table of docs/design.md, case by case: (state, healthy, cancellable) -> result.
_R = CancelResult
EXPECTED_CANCEL: dict[tuple[State | None, bool, bool], CancelResult] = {}
for _healthy, _cancellable in itertools.product((True, False), repeat=2):
    EXPECTED_CANCEL[(None, _healthy, _cancellable)] = _R.NOT_FOUND
    EXPECTED_CANCEL[(State.QUEUED, _healthy, _cancellable)] = _R.CANCELLED_BEFORE_ADVERTISE
    for _terminal in (State.COMPLETE, State.FAILED, State.CANCELLED):
        EXPECTED_CANCEL[(_terminal, _healthy, _cancellable)] = _R.ALREADY_COMPLETE
    EXPECTED_CANCEL[(State.ADVERTISED, _healthy, _cancellable)] = (
        _R.CANCEL_REQUESTED_IN_FLIGHT if _healthy else _R.BACKEND_UNHEALTHY
    )
    for _posted in (State.IN_FLIGHT, State.QUARANTINED):
        EXPECTED_CANCEL[(_posted, _healthy, _cancellable)] = (
            _R.BACKEND_UNHEALTHY if not _healthy
            else _R.CANCEL_REQUESTED_IN_FLIGHT if _cancellable
            else _R.NOT_CANCELLABLE
        )


def test_cancel_result_safe_to_free_is_exactly_the_first_three() -> None:
    assert {r for r in CancelResult if r.safe_to_free} == {
        _R.NOT_FOUND, _R.ALREADY_COMPLETE, _R.CANCELLED_BEFORE_ADVERTISE
    }
    assert len(CancelResult) == 6


@pytest.mark.parametrize(("state", "healthy", "cancellable"), list(EXPECTED_CANCEL))
def test_cancel_decides_per_design_table(state: State | None, healthy: bool,
                                         cancellable: bool) -> None:
    expected = EXPECTED_CANCEL[(state, healthy, cancellable)]
    assert decide_cancel(state, healthy=healthy, cancellable=cancellable) is expected
    table = SessionTable()
    if state is not None:
        drive(table, "r", state)
    before = None if state is None else (table.get("r").data, table.get("r").history)
    result = table.cancel("r", healthy=healthy, cancellable=cancellable, now=2.0)
    assert result is expected
    if state is None:
        assert "r" not in table
        return
    session = table.get("r")
    if result is _R.CANCELLED_BEFORE_ADVERTISE:
        assert session.state is State.CANCELLED
    elif result is _R.CANCEL_REQUESTED_IN_FLIGHT:
        assert session.cancel_requested or session.failure.reason is FailureReason.CANCELLED  # type: ignore[union-attr]
        assert session.history[-1].event in (Event.CANCEL, Event.QUIESCED)
    else:  # the other results change nothing
        assert (session.data, session.history) == before


def test_cancel_after_release_is_not_found() -> None:
    table = SessionTable()
    drive(table, "r", State.COMPLETE)
    assert table.cancel("r", healthy=True, cancellable=True, now=3.0) is _R.ALREADY_COMPLETE
    assert [s.request_id for s in table.pop_releasable()] == ["r"]
    assert table.cancel("r", healthy=True, cancellable=True, now=3.0) is _R.NOT_FOUND


def test_table_duplicate_id_is_a_typed_error() -> None:
    table = SessionTable()
    table.admit("r", Role.RECEIVER, 0, [1], 0.0)
    with pytest.raises(DuplicateSessionError) as info:
        table.admit("r", Role.RECEIVER, 0, [2], 0.0)
    assert info.value.request_id == "r" and len(table) == 1
    with pytest.raises(UnknownSessionError) as missing:
        table.get("nope")
    assert missing.value.request_id == "nope"
    with pytest.raises(UnknownSessionError):
        table.apply("nope", Event.CANCEL, 0.0)


def test_table_counts_follow_every_transition() -> None:
    table = SessionTable()
    for i, state in enumerate(State):
        drive(table, f"r{i}", state)
    assert table.counts() == {state: 1 for state in State}
    assert table.in_flight == 2 and table.quarantined == 1
    table.apply("r2", Event.HANDLE_DONE, 5.0)  # r2 is IN_FLIGHT: self-transition
    assert table.count(State.IN_FLIGHT) == 1
    table.apply("r2", Event.CONFIRMED, 5.0)  # the receiver's DONE: still IN_FLIGHT
    assert table.count(State.IN_FLIGHT) == 1
    table.apply("r2", Event.COMPLETED, 5.0)
    assert table.count(State.IN_FLIGHT) == 0 and table.count(State.COMPLETE) == 2
    assert sum(table.counts().values()) == len(table) == 7


def test_table_release_only_terminal_sessions() -> None:
    table = SessionTable()
    drive(table, "busy", State.IN_FLIGHT)
    drive(table, "done", State.COMPLETE)
    drive(table, "gone", State.CANCELLED)
    assert table.releasable() == ["done", "gone"]
    with pytest.raises(NotReleasableError) as info:
        table.release("busy")
    assert info.value.state is State.IN_FLIGHT
    assert table.release("gone").request_id == "gone"
    assert [s.request_id for s in table.pop_releasable()] == ["done"]
    assert table.releasable() == [] and len(table) == 1
    assert table.counts()[State.COMPLETE] == 0
    table.admit("done", Role.SENDER, 0, [1], 9.0)  # a released id may come back


def test_table_expire_due_uses_each_sessions_current_deadline() -> None:
    table = SessionTable()
    table.admit("queued", Role.SENDER, 0, [1], 0.0, queue_timeout_s=10.0)
    table.admit("moved_on", Role.SENDER, 0, [2], 0.0, queue_timeout_s=10.0,
                transfer_timeout_s=30.0)
    table.apply("moved_on", Event.ADVERTISE, 5.0)  # now its deadline is 35
    table.apply("moved_on", Event.POSTED, 6.0, handle="h")
    table.admit("never", Role.SENDER, 0, [3], 0.0)
    assert table.next_deadline() == 10.0
    assert table.expire_due(9.99) == []
    expired = table.expire_due(10.0)
    assert [(s.request_id, [t.to_state for t in made]) for s, made in expired] == [
        ("queued", [State.FAILED])
    ]
    assert table.get("moved_on").state is State.IN_FLIGHT
    assert table.next_deadline() == 35.0
    expired = table.expire_due(1000.0)
    assert [s.request_id for s, _ in expired] == ["moved_on"]
    assert table.get("moved_on").state is State.QUARANTINED
    assert table.get("never").state is State.QUEUED
    assert table.next_deadline() is None and table.expire_due(1e9) == []


def test_table_expire_due_skips_released_and_readmitted_ids() -> None:
    table = SessionTable()
    table.admit("r", Role.SENDER, 0, [1], 0.0, queue_timeout_s=10.0)
    table.apply("r", Event.CANCEL, 1.0)
    table.pop_releasable()
    table.admit("r", Role.SENDER, 0, [1], 2.0, queue_timeout_s=100.0)
    assert table.expire_due(50.0) == []
    assert table.get("r").state is State.QUEUED


def test_table_deadline_heap_stays_proportional_to_live_sessions() -> None:
    table = SessionTable()
    for i in range(1000):
        rid = f"r{i}"
        table.admit(rid, Role.SENDER, 0, [i], float(i), queue_timeout_s=1e6)
        table.apply(rid, Event.CANCEL, float(i))
        table.pop_releasable()
    assert len(table) == 0
    assert len(table._deadlines) <= 2 * len(table) + 65


def test_sessions_all_matches_public_names() -> None:
    public = {
        name for name, value in vars(sessions_pkg).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    public -= {"annotations"}  # from __future__
    assert set(sessions_pkg.__all__) == public
    for name in sessions_pkg.__all__:
        assert getattr(sessions_pkg, name) is not None


def test_table_discard_undoes_an_admission_only_while_nothing_moved() -> None:
    table = SessionTable()
    table.admit("r", Role.RECEIVER, 1, (0,), 0.0, queue_timeout_s=5.0)
    table.discard("r")  # as if never admitted: gone, its counts and deadline with it
    assert "r" not in table and len(table) == 0 and table.next_deadline() is None
    table.admit("r", Role.RECEIVER, 1, (0,), 1.0)  # the id is free again
    table.apply("r", Event.ADVERTISE, 1.0)
    with pytest.raises(NotReleasableError):
        table.discard("r")  # it moved: only a release once terminal takes it out
    assert table.get("r").state is State.ADVERTISED
    with pytest.raises(UnknownSessionError):
        table.discard("nobody")
