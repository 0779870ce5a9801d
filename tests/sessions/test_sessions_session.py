"""TransferSession: typed per-state data, arguments, history, deadlines, failure reasons."""

from __future__ import annotations

import pickle

import attrs
import pytest
from kvhandoff.sessions import (
    Advertised,
    Complete,
    Event,
    Failed,
    Failure,
    FailureReason,
    InFlight,
    InvalidArgumentError,
    Quarantined,
    Queued,
    Role,
    State,
    TransferSession,
    TransitionError,
)


def admit(**kw: object) -> TransferSession:
    args: dict[str, object] = {"queue_timeout_s": 5.0, "transfer_timeout_s": 20.0}
    args.update(kw)
    return TransferSession.admit("r", Role.SENDER, 1, [7, 8, 9], 100.0, **args)  # type: ignore[arg-type]


def test_session_admit_is_queued_with_queue_deadline_and_no_handle() -> None:
    s = admit()
    assert s.state is State.QUEUED
    assert s.data == Queued(admitted_at=100.0, queue_deadline=105.0)
    assert s.handle is None and s.failure is None and s.quiescent
    assert s.deadline == 105.0 and s.history == () and s.block_ids == (7, 8, 9)


def test_session_transfer_deadline_runs_from_advertise_not_admission() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 104.0)
    assert s.data == Advertised(advertised_at=104.0, transfer_deadline=124.0)
    s.apply(Event.POSTED, 110.0, handle="h")
    assert s.deadline == 124.0  # IN_FLIGHT keeps the deadline set at advertise


def test_session_in_flight_always_has_handle() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    with pytest.raises(InvalidArgumentError) as info:
        s.apply(Event.POSTED, 102.0)
    assert info.value.name == "handle"
    assert s.state is State.ADVERTISED
    handle = object()
    s.apply(Event.POSTED, 102.0, handle=handle)
    assert isinstance(s.data, InFlight) and s.data.handle is handle and s.handle is handle
    assert not s.quiescent
    with pytest.raises(InvalidArgumentError):
        InFlight(handle=None, posted_at=0.0, transfer_deadline=None)


def test_session_handle_refused_with_other_events() -> None:
    s = admit()
    with pytest.raises(InvalidArgumentError):
        s.apply(Event.ADVERTISE, 101.0, handle="h")
    assert s.state is State.QUEUED and s.history == ()


def test_session_history_records_time_from_to_event() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    s.apply(Event.POSTED, 102.0, handle="h")
    s.apply(Event.HANDLE_DONE, 103.0)
    s.apply(Event.CONFIRMED, 103.5)
    s.apply(Event.COMPLETED, 104.0)
    assert [(t.at, t.from_state, t.to_state, t.event) for t in s.history] == [
        (101.0, State.QUEUED, State.ADVERTISED, Event.ADVERTISE),
        (102.0, State.ADVERTISED, State.IN_FLIGHT, Event.POSTED),
        (103.0, State.IN_FLIGHT, State.IN_FLIGHT, Event.HANDLE_DONE),
        (103.5, State.IN_FLIGHT, State.IN_FLIGHT, Event.CONFIRMED),
        (104.0, State.IN_FLIGHT, State.COMPLETE, Event.COMPLETED),
    ]
    assert s.data == Complete(at=104.0) and s.is_terminal and s.handle is None


def test_session_local_final_separates_quiescence_from_outcome() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    s.apply(Event.POSTED, 102.0, handle="h")
    s.apply(Event.HANDLE_DONE, 103.0)
    assert s.state is State.IN_FLIGHT and s.local_final and s.quiescent
    with pytest.raises(TransitionError) as info:
        s.apply(Event.HANDLE_DONE, 104.0)
    assert info.value.detail and s.local_final
    # another rank failed: already quiescent here, so the session fails at once
    made = s.apply(Event.ABORT, 105.0, reason="peer_failed", detail="rank 1: transport_error")
    assert made[-1].to_state is State.FAILED
    assert s.failure == Failure(FailureReason.PEER_FAILED, "rank 1: transport_error")


def test_session_peer_failure_with_pending_handle_quarantines_until_handle_final() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    s.apply(Event.POSTED, 102.0, handle="h")
    s.apply(Event.ABORT, 103.0, reason=FailureReason.PEER_FAILED)
    assert s.state is State.QUARANTINED and s.handle == "h" and not s.quiescent
    assert s.data == Quarantined(handle="h", since=103.0,
                                 failure=Failure(FailureReason.PEER_FAILED))
    s.apply(Event.ABORT, 104.0, reason=FailureReason.PEER_LOST)  # the first reason wins
    s.apply(Event.HANDLE_FAILED, 105.0, reason="transport_error")
    assert s.data == Failed(at=105.0, failure=Failure(FailureReason.PEER_FAILED))


def test_session_transport_error_fails_with_reason() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    s.apply(Event.POSTED, 102.0, handle="h")
    s.apply(Event.HANDLE_FAILED, 103.0, reason="size_mismatch", detail="got 10 bytes")
    assert s.state is State.FAILED
    assert s.failure == Failure(FailureReason.SIZE_MISMATCH, "got 10 bytes")
    t = admit()
    t.apply(Event.ADVERTISE, 101.0)
    t.apply(Event.POSTED, 102.0, handle="h")
    t.apply(Event.HANDLE_FAILED, 103.0)
    assert t.failure == Failure(FailureReason.TRANSPORT_ERROR)


def test_session_queue_expiry_fails_at_once() -> None:
    s = admit()
    with pytest.raises(TransitionError):
        s.apply(Event.EXPIRE, 104.9)  # not due yet
    made = s.apply(Event.EXPIRE, 105.0)
    assert [t.to_state for t in made] == [State.FAILED]
    assert s.failure == Failure(FailureReason.QUEUE_TIMEOUT)


def test_session_transfer_expiry_quarantines_in_flight_and_keeps_handle() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    s.apply(Event.POSTED, 102.0, handle="h")
    s.apply(Event.EXPIRE, 121.0)
    assert s.state is State.QUARANTINED and s.handle == "h"
    # A sender that posted and never heard from its receiver: it cannot know the outcome.
    assert s.failure == Failure(FailureReason.TRANSFER_TIMEOUT, outcome_unknown=True)
    s.apply(Event.HANDLE_DONE, 200.0)
    assert s.state is State.FAILED and s.handle is None


def test_session_transfer_expiry_of_advertised_settles_at_once() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    made = s.apply(Event.EXPIRE, 121.0)
    assert [(t.to_state, t.event) for t in made] == [
        (State.QUARANTINED, Event.EXPIRE), (State.FAILED, Event.QUIESCED)
    ]
    assert s.failure == Failure(FailureReason.TRANSFER_TIMEOUT)


def test_session_no_deadline_never_expires() -> None:
    s = admit(queue_timeout_s=None, transfer_timeout_s=None)
    assert s.deadline is None
    with pytest.raises(TransitionError):
        s.apply(Event.EXPIRE, 1e9)


def test_session_cancel_after_advertise_ends_failed_cancelled() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    s.apply(Event.CANCEL, 102.0)
    assert s.state is State.FAILED and s.failure == Failure(FailureReason.CANCELLED)

    t = admit()
    t.apply(Event.ADVERTISE, 101.0)
    t.apply(Event.POSTED, 102.0, handle="h")
    t.apply(Event.CANCEL, 103.0)
    assert t.state is State.IN_FLIGHT and t.cancel_requested and t.handle == "h"
    t.apply(Event.HANDLE_FAILED, 104.0, reason="transport_error")
    assert t.state is State.FAILED  # the handle failed before the cancel settled it
    assert t.failure == Failure(FailureReason.TRANSPORT_ERROR)


def test_session_abort_requires_a_known_reason() -> None:
    s = admit()
    with pytest.raises(InvalidArgumentError):
        s.apply(Event.ABORT, 101.0)
    with pytest.raises(InvalidArgumentError) as info:
        s.apply(Event.ABORT, 101.0, reason="gremlins")
    assert info.value.name == "reason" and "peer_lost" in str(info.value)
    with pytest.raises(InvalidArgumentError):
        s.apply(Event.CANCEL, 101.0, reason="cancelled")
    with pytest.raises(InvalidArgumentError):
        s.apply(Event.EXPIRE, 106.0, detail="no reason")
    assert s.state is State.QUEUED and s.history == ()


def test_session_time_may_not_go_backwards() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    with pytest.raises(InvalidArgumentError):
        s.apply(Event.POSTED, 100.5, handle="h")
    with pytest.raises(InvalidArgumentError):
        s.apply(Event.POSTED, float("nan"), handle="h")
    assert s.state is State.ADVERTISED


@pytest.mark.parametrize(
    ("field", "value"),
    [("request_id", ""), ("peer", -1), ("peer", True), ("block_ids", [1, 1]),
     ("block_ids", [-2]), ("queue_timeout_s", 0.0), ("transfer_timeout_s", float("inf")),
     ("role", "sender"), ("now", float("nan"))],
)
def test_session_admit_rejects_bad_arguments(field: str, value: object) -> None:
    args: dict[str, object] = {
        "request_id": "r", "role": Role.SENDER, "peer": 0, "block_ids": [1], "now": 0.0
    }
    args[field] = value
    with pytest.raises(InvalidArgumentError) as info:
        TransferSession.admit(**args)  # type: ignore[arg-type]
    assert info.value.name == field


def test_session_snapshot_is_a_frozen_copy() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    snap = s.snapshot()
    s.apply(Event.CANCEL, 102.0)
    assert snap.state is State.ADVERTISED and len(snap.history) == 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snap.state = State.FAILED  # type: ignore[misc]


def test_session_errors_pickle_with_their_attributes() -> None:
    error = TransitionError("r", State.QUEUED, Event.POSTED, "why")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.request_id, copy.state, copy.event, copy.detail) == (
        "r", State.QUEUED, Event.POSTED, "why"
    )
    assert "POSTED" in str(copy) and "QUEUED" in str(copy)


def test_failure_reason_values_are_the_wire_vocabulary() -> None:
    assert {r.value for r in FailureReason} == {
        "queue_timeout", "transfer_timeout", "transport_error", "peer_lost", "peer_failed",
        "cancelled", "layout_mismatch", "size_mismatch", "protocol_error", "checksum_mismatch",
    }
    assert Failure("peer_lost").reason is FailureReason.PEER_LOST
    assert str(FailureReason.CANCELLED) == "cancelled"


def test_session_sender_completes_only_once_confirmed_in_either_order() -> None:
    for order in ((Event.HANDLE_DONE, Event.CONFIRMED), (Event.CONFIRMED, Event.HANDLE_DONE)):
        s = admit()
        s.apply(Event.ADVERTISE, 101.0)
        s.apply(Event.POSTED, 102.0, handle="h")
        s.apply(order[0], 103.0)
        with pytest.raises(TransitionError):
            s.apply(Event.COMPLETED, 103.5)  # the receiver's word, or the handle, is missing
        assert s.state is State.IN_FLIGHT
        s.apply(order[1], 104.0)
        assert s.confirmed and s.local_final
        s.apply(Event.COMPLETED, 105.0)
        assert s.state is State.COMPLETE


def test_session_confirmed_sender_has_no_deadline_and_confirms_once() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    s.apply(Event.POSTED, 102.0, handle="h")
    assert s.deadline == 121.0
    s.apply(Event.CONFIRMED, 103.0)
    assert s.deadline is None and s.snapshot().confirmed
    with pytest.raises(TransitionError):
        s.apply(Event.EXPIRE, 1e9)  # the outcome is decided: only quiescence is left
    with pytest.raises(TransitionError):
        s.apply(Event.CONFIRMED, 104.0)
    assert s.state is State.IN_FLIGHT and not s.local_final


def test_session_receiver_is_never_confirmed() -> None:
    s = TransferSession.admit("r", Role.RECEIVER, 1, [7], 100.0)
    s.apply(Event.ADVERTISE, 101.0)
    s.apply(Event.POSTED, 102.0, handle="h")
    with pytest.raises(TransitionError):
        s.apply(Event.CONFIRMED, 103.0)
    s.apply(Event.HANDLE_DONE, 103.0)
    s.apply(Event.COMPLETED, 104.0)  # a receiver's outcome is its own
    assert s.state is State.COMPLETE


def test_session_posted_sender_waits_the_confirm_grace_past_its_deadline() -> None:
    s = admit(confirm_grace_s=5.0)
    s.apply(Event.ADVERTISE, 101.0)
    assert s.deadline == 121.0  # nothing posted yet: nothing can have moved
    s.apply(Event.POSTED, 102.0, handle="h")
    assert s.deadline == 126.0
    r = TransferSession.admit("r", Role.RECEIVER, 1, [7], 100.0, transfer_timeout_s=20.0,
                              confirm_grace_s=5.0)
    r.apply(Event.ADVERTISE, 101.0)
    r.apply(Event.POSTED, 101.0, handle="h")
    assert r.deadline == 121.0  # the receiver decides: no grace


def test_session_outcome_unknown_travels_with_abort_only() -> None:
    s = admit()
    s.apply(Event.ADVERTISE, 101.0)
    s.apply(Event.POSTED, 102.0, handle="h")
    with pytest.raises(InvalidArgumentError):
        s.apply(Event.HANDLE_FAILED, 103.0, reason="transport_error", outcome_unknown=True)
    s.apply(Event.ABORT, 103.0, reason="peer_lost", outcome_unknown=True)
    assert s.failure == Failure(FailureReason.PEER_LOST, outcome_unknown=True)
