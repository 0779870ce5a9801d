"""FaultyTransport over the loopback transport: each fault, determinism, peer loss, and the
rule that a faulted handle never becomes final before its real operation."""

from __future__ import annotations

import pytest
import torch
from kvhandoff.engine.transports import (
    Fault,
    FaultyTransport,
    HandleState,
    LoopbackTransport,
    TransportHandle,
    loopback_group,
)


def _pattern(nbytes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def _faulty_pair(**kwargs: object) -> tuple[FaultyTransport, LoopbackTransport]:
    a, b = LoopbackTransport.pair()
    return FaultyTransport(a, **kwargs), b  # type: ignore[arg-type]


def _run_ops(seed: int, count: int = 60) -> list[Fault]:
    faulty, peer = _faulty_pair(seed=seed, error_rate=0.2, stuck_rate=0.2, delay_rate=0.5,
                                delay_polls=1)
    faults = []
    for i in range(count):
        handle = faulty.post_send(_pattern(8, i), 1, 1 + i % 5)
        peer.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1 + i % 5)
        faults.append(handle.fault)  # type: ignore[attr-defined]
    return faults


def test_faulty_same_seed_same_faults() -> None:
    first = _run_ops(7)
    assert first == _run_ops(7)
    assert first != _run_ops(8)
    assert {Fault.NONE, Fault.DELAY, Fault.ERROR, Fault.STUCK} <= set(first)


def test_faulty_no_faults_moves_data_and_mirrors_inner() -> None:
    faulty, peer = _faulty_pair(seed=0)
    dst = torch.zeros(256, dtype=torch.uint8)
    recv = faulty.post_recv(dst, 1, 3)
    assert recv.test() is HandleState.PENDING
    send = peer.post_send(_pattern(256, 5), 0, 3)
    assert faulty.poll() == [recv]
    assert recv.state is HandleState.DONE and send.test() is HandleState.DONE
    assert torch.equal(dst, _pattern(256, 5))
    assert (faulty.rank, faulty.world_size, faulty.max_tag) == (0, 2, peer.max_tag)
    assert faulty.cancellable_kinds == peer.cancellable_kinds
    assert faulty.injected == {Fault.NONE: 1}


def test_faulty_error_fails_only_after_inner_is_final() -> None:
    faulty, peer = _faulty_pair(seed=0, faults={0: Fault.ERROR})
    recv = faulty.post_recv(torch.zeros(8, dtype=torch.uint8), 1, 1)
    assert faulty.poll() == [] and recv.test() is HandleState.PENDING
    peer.post_send(_pattern(8, 0), 0, 1)
    assert faulty.poll() == [recv]
    assert (recv.state, recv.error) == (HandleState.FAILED, "injected error")


def test_faulty_error_rate_one_fails_everything() -> None:
    faulty, peer = _faulty_pair(seed=3, error_rate=1.0)
    handles = [faulty.post_send(_pattern(4, i), 1, 1) for i in range(5)]
    for _ in handles:
        peer.post_recv(torch.zeros(4, dtype=torch.uint8), 0, 1)
    assert faulty.poll() == handles
    assert all(h.error == "injected error" for h in handles)


def test_faulty_stuck_never_finishes_until_cancelled() -> None:
    faulty, peer = _faulty_pair(seed=0, faults={0: Fault.STUCK})
    dst = torch.zeros(8, dtype=torch.uint8)
    recv = faulty.post_recv(dst, 1, 1)
    peer.post_send(_pattern(8, 1), 0, 1)
    for _ in range(20):
        assert faulty.poll() == []
    assert recv.test() is HandleState.PENDING
    assert recv.wait(0.01) is HandleState.PENDING
    assert torch.equal(dst, _pattern(8, 1))  # the real data did move underneath
    assert recv.cancel() is True
    assert (recv.state, recv.error) == (HandleState.FAILED, "cancelled")
    assert faulty.poll() == [recv]
    assert recv.cancel() is False


def test_faulty_stuck_cancel_cancels_inner_operation() -> None:
    faulty, peer = _faulty_pair(seed=0, stuck_rate=1.0)
    dst = torch.zeros(8, dtype=torch.uint8)
    recv = faulty.post_recv(dst, 1, 1)
    assert recv.cancel() is True
    assert recv.state is HandleState.FAILED
    inner = recv.inner  # type: ignore[attr-defined]
    assert (inner.state, inner.error) == (HandleState.FAILED, "cancelled")
    late = peer.post_send(_pattern(8, 0), 0, 1)  # the cancelled receive no longer matches
    assert late.test() is HandleState.PENDING
    assert torch.equal(dst, torch.zeros(8, dtype=torch.uint8))


def test_faulty_delay_polls() -> None:
    faulty, peer = _faulty_pair(seed=0, delay_polls=3)
    peer.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1)
    send = faulty.post_send(_pattern(8, 0), 1, 1)  # the inner send completes at once
    assert send.fault is Fault.DELAY  # type: ignore[attr-defined]
    assert send.inner.state is HandleState.DONE  # type: ignore[attr-defined]
    assert faulty.poll() == []
    assert faulty.poll() == []
    assert send.test() is HandleState.PENDING
    assert faulty.poll() == [send]
    assert send.state is HandleState.DONE


def test_faulty_delay_seconds_follow_the_clock() -> None:
    now = [100.0]
    faulty, peer = _faulty_pair(seed=0, delay_s=5.0, clock=lambda: now[0])
    peer.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1)
    send = faulty.post_send(_pattern(8, 0), 1, 1)
    now[0] = 104.9
    assert faulty.poll() == []
    now[0] = 105.0
    assert send.test() is HandleState.DONE  # test() releases a due handle too
    assert faulty.poll() == [send]


def test_faulty_delay_rate_zero_means_no_delay() -> None:
    faulty, peer = _faulty_pair(seed=0, delay_polls=5, delay_rate=0.0)
    peer.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1)
    send = faulty.post_send(_pattern(8, 0), 1, 1)
    assert faulty.poll() == [send]


def test_faulty_cancel_delayed_handle() -> None:
    faulty, peer = _faulty_pair(seed=0, delay_polls=100)
    peer.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1)
    send = faulty.post_send(_pattern(8, 0), 1, 1)
    assert send.cancel() is True
    assert (send.state, send.error) == (HandleState.FAILED, "cancelled")
    assert faulty.poll() == [send]


def test_faulty_peer_loss_after_control_messages() -> None:
    faulty, peer = _faulty_pair(seed=0, peer_loss_after={1: 2})
    faulty.send_control(1, b"one")
    peer.send_control(0, b"two")
    assert faulty.recv_control() == [(1, b"two")]
    assert faulty.lost_peers == set()
    faulty.send_control(1, b"three")  # the budget is spent: from here on, silence
    assert peer.recv_control() == [(0, b"one")]
    assert faulty.lost_peers == {1}
    peer.send_control(0, b"four")
    assert faulty.recv_control() == []
    recv = faulty.post_recv(torch.zeros(8, dtype=torch.uint8), 1, 1)
    peer.post_send(_pattern(8, 0), 0, 1)
    assert faulty.poll() == [] and recv.test() is HandleState.PENDING
    assert recv.cancel() is True and recv.test() is HandleState.FAILED


def test_faulty_lose_peer_holds_in_flight_operations() -> None:
    faulty, peer = _faulty_pair(seed=0)
    recv = faulty.post_recv(torch.zeros(8, dtype=torch.uint8), 1, 1)
    faulty.lose_peer(1)
    peer.post_send(_pattern(8, 0), 0, 1)
    assert faulty.poll() == [] and recv.test() is HandleState.PENDING
    faulty.send_control(1, b"lost")
    assert peer.recv_control() == []


def test_faulty_close_cancels_live_handles() -> None:
    faulty, peer = _faulty_pair(seed=0, stuck_rate=1.0)
    handles: list[TransportHandle] = [
        faulty.post_recv(torch.zeros(8, dtype=torch.uint8), 1, t) for t in (1, 2)
    ]
    faulty.close()
    faulty.close()
    assert all(h.state is HandleState.FAILED for h in handles)
    assert sorted(h.tag for h in faulty.poll()) == [1, 2]
    assert faulty.closed and faulty.inner.closed
    late = peer.post_send(_pattern(8, 0), 0, 1)
    assert (late.state, late.error) == (HandleState.FAILED, "peer 0 closed")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"error_rate": -0.1},
        {"stuck_rate": 1.5},
        {"delay_rate": 2.0},
        {"error_rate": 0.6, "stuck_rate": 0.6},
        {"delay_s": -1.0},
        {"delay_polls": -1},
        {"delay_polls": 1.5},
    ],
)
def test_faulty_rejects_bad_config(kwargs: dict[str, object]) -> None:
    a, _ = LoopbackTransport.pair()
    with pytest.raises(ValueError):
        FaultyTransport(a, seed=0, **kwargs)  # type: ignore[arg-type]


def test_faulty_wrapper_is_one_sided_exactly_when_its_inner_transport_is() -> None:
    a, b = loopback_group(2)
    plain = FaultyTransport(a, seed=1)
    assert plain.one_sided is False
    handle = plain.post_recv(torch.zeros(8, dtype=torch.uint8), 1, 1)
    assert handle.retract() is False  # a two-sided receive cannot be retracted
    assert handle.cancel() is True
    b.one_sided = True  # what a one-sided transport (NIXL) declares
    assert FaultyTransport(b, seed=2).one_sided is True
