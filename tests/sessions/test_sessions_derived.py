"""What ``kvhandoff.sessions`` derives from its transition table (``allows``, the named state
sets) and the one validator of block ids, ``check_block_ids``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvhandoff.sessions import (
    IN_FLIGHT_STATES,
    OPEN_STATES,
    TRANSITIONS,
    BlockIds,
    Event,
    InvalidArgumentError,
    Role,
    State,
    TransferSession,
    allows,
    check_block_ids,
)


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_sessions_allows_is_the_table(state: State, event: Event) -> None:
    assert allows(state, event) is (event in TRANSITIONS[state])


def test_sessions_named_state_sets() -> None:
    # Expiry quarantines where the peer knows the blocks and the outcome is open.
    assert OPEN_STATES == {State.ADVERTISED, State.IN_FLIGHT}
    # A posted, unsettled local operation: where the handle's completion is awaited.
    assert IN_FLIGHT_STATES == {State.IN_FLIGHT, State.QUARANTINED}


def test_sessions_session_allows_follows_its_state() -> None:
    session = TransferSession.admit("r", Role.SENDER, 1, [0, 1], 10.0)
    assert session.admitted_at == 10.0
    assert session.allows(Event.ADVERTISE) and not session.allows(Event.POSTED)
    session.apply(Event.ADVERTISE, 11.0)
    assert session.allows(Event.POSTED) and not session.allows(Event.ADVERTISE)


@pytest.mark.parametrize("given", [
    [3, 1, 2], (3, 1, 2), [np.int64(3), np.int32(1), 2], np.array([3, 1, 2]),
    torch.tensor([3, 1, 2]), torch.tensor([3, 1, 2], dtype=torch.int32), iter([3, 1, 2]),
])
def test_sessions_check_block_ids_accepts_ints_numpy_and_tensors(given: object) -> None:
    ids = check_block_ids(given)  # type: ignore[arg-type]
    assert ids == (3, 1, 2) and type(ids) is BlockIds
    assert all(type(b) is int for b in ids)
    assert check_block_ids(ids) is ids  # validated once: passes through as it is


def test_sessions_check_block_ids_large_lists_take_the_fast_path() -> None:
    ids = check_block_ids(list(range(10_000)))
    assert len(ids) == 10_000
    with pytest.raises(InvalidArgumentError):
        check_block_ids([*range(100), -1])
    with pytest.raises(InvalidArgumentError):
        check_block_ids([*range(100), 5])


@pytest.mark.parametrize("bad", [[True], [1.0], [-1], [2, 2], ["1"], "12", b"12",
                                 torch.zeros(2, 2, dtype=torch.long), torch.tensor([1.5]),
                                 np.array([[1, 2]]), [torch.tensor(1.0)]])
def test_sessions_check_block_ids_rejects(bad: object) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        check_block_ids(bad)  # type: ignore[arg-type]
    assert info.value.name == "block_ids"
