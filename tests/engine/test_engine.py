"""TransferEngine lifecycle: transfers, layer-wise sends, every CancelResult, timeouts, the
handshake's typed mismatches, deferred release on both sides, and drain. The lifecycle tests
run under asyncio and trio (anyio's plugin)."""

from __future__ import annotations

from functools import partial

import anyio
import pytest
from engine_support import (
    NUM_LAYERS,
    HeldTransport,
    ManualClock,
    engine_pair,
    fast_config,
    fill,
    free_once_released,
    kv_of,
    same_kv,
    ticks,
    until,
)
from engine_support import both_backends as anyio_backend  # noqa: F401 (fixture)
from kvhandoff.engine import (
    EngineClosedError,
    EngineConfigError,
    LayerReadyError,
    TransferCancelled,
    TransferFailed,
    TransferTimeout,
)
from kvhandoff.engine.transports import Fault, FaultyTransport
from kvhandoff.sessions import CancelResult, DuplicateSessionError, Role, State

pytestmark = pytest.mark.anyio


async def test_engine_transfer_moves_bytes_and_frees_late() -> None:
    async with engine_pair() as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src = p0.alloc(3, owner="r1")
        expected = fill(p0, src, seed=1)
        dst = p1.alloc(3, owner="r1")
        hs = e0.send("r1", src, 1)
        p0.free(src, owner="r1")  # the host frees at once: deferred until quiescent
        assert p0.num_deferred == 3
        hr = e1.receive("r1", dst, 0)
        sent, got = await hs.wait(), await hr.wait()
        assert (sent.role, got.role) == (Role.SENDER, Role.RECEIVER)
        assert sent.nbytes == got.nbytes == 3 * p0.block_nbytes
        assert same_kv(kv_of(p1, dst), expected)
        await until(lambda: p0.num_deferred == 0 and e0.stats().sessions == 0)
        assert e0.session("r1").state is State.COMPLETE  # a recently released snapshot
        assert e0.stats().bytes_sent == e1.stats().bytes_received == sent.nbytes
        p1.free(dst, owner="r1")
    assert p0.num_free == p0.num_blocks and p1.num_free == p1.num_blocks


async def test_engine_receive_before_send_is_kept_until_send() -> None:
    async with engine_pair() as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(2, owner="r"), p1.alloc(2, owner="r")
        expected = fill(p0, src, seed=2)
        hr = e1.receive("r", dst, 0)
        await until(lambda: e0.stats().early_advertises == 1)  # it arrived before send()
        hs = e0.send("r", src, 1)
        await hs.wait()
        await hr.wait()
        assert same_kv(kv_of(p1, dst), expected)
        p0.free(src, owner="r")
        p1.free(dst, owner="r")


async def test_engine_layerwise_moves_each_layer_once() -> None:
    async with engine_pair(wrap0=HeldTransport) as pair:
        e0, e1, p0, p1, h0 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t0
        src, dst = p0.alloc(3, owner="lw"), p1.alloc(3, owner="lw")
        expected = fill(p0, src, seed=3)
        hs = e0.send("lw", src, 1, layerwise=True)
        assert hs.layerwise
        hs.layer_ready(1)  # out of order and before the receiver advertised
        hr = e1.receive("lw", dst, 0, layerwise=True)
        await until(lambda: len(h0.posts) == 1)
        with pytest.raises(LayerReadyError):
            hs.layer_ready(1)
        with pytest.raises(LayerReadyError):
            hs.layer_ready(NUM_LAYERS)
        with pytest.raises(LayerReadyError):
            hr.layer_ready(0)  # a receive has no layers to mark
        hs.layer_ready(0)
        await hs.wait()
        await hr.wait()
        assert same_kv(kv_of(p1, dst), expected)
        # One operation per layer, each a layer's share of the bytes.
        assert [nbytes for _, _, nbytes in h0.posts] == [p0.block_nbytes * 3 // NUM_LAYERS] * 2
        p0.free(src, owner="lw")
        p1.free(dst, owner="lw")


async def test_engine_cancel_before_advertise_is_safe_to_free() -> None:
    async with engine_pair() as pair:
        e0, p0 = pair.e0, pair.p0
        src = p0.alloc(2, owner="c")
        hs = e0.send("c", src, 1)
        result = e0.cancel("c")
        assert result is CancelResult.CANCELLED_BEFORE_ADVERTISE and result.safe_to_free
        with pytest.raises(TransferCancelled) as info:
            await hs.wait()
        assert info.value.reason == "cancelled"
        assert p0.pinned_by("c") == frozenset()
        p0.free(src, owner="c")
        assert p0.num_free == p0.num_blocks
        assert e0.cancel("c") is CancelResult.NOT_FOUND
        assert e0.cancel("never-seen") is CancelResult.NOT_FOUND
        assert e0.stats().cancelled == 1


async def test_engine_cancel_in_flight_fails_both_sides_and_keeps_blocks_pinned() -> None:
    # The receiver's receive never finishes until cancelled; the sender's send is held.
    async with engine_pair(wrap0=partial(HeldTransport, held=[0]),
                           wrap1=partial(FaultyTransport, seed=0, faults={0: Fault.STUCK})) \
            as pair:
        e0, e1, p0, p1, h0 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t0
        src, dst = p0.alloc(2, owner="x"), p1.alloc(2, owner="x")
        hs = e0.send("x", src, 1)
        hr = e1.receive("x", dst, 0)
        await until(lambda: e0.session("x").state is State.IN_FLIGHT)
        result = e1.cancel("x")
        assert result is CancelResult.CANCEL_REQUESTED_IN_FLIGHT and not result.safe_to_free
        with pytest.raises(TransferCancelled):
            await hr.wait()
        # The peer learns of it and fails too, but its send is still in the transport.
        with pytest.raises(TransferCancelled):
            await hs.wait()
        p0.free(src, owner="x")
        assert p0.num_deferred == 2 and p0.pinned_by("x") == frozenset(src)
        await ticks(e0, e1)  # many chances to free them early
        assert p0.num_deferred == 2  # never freed while the transport may read it
        assert e0.cancel("x") is CancelResult.NOT_CANCELLABLE  # still posted, uncancellable
        h0.release(0)
        await until(lambda: p0.num_deferred == 0)
        assert e0.cancel("x") is CancelResult.NOT_FOUND
        await until(lambda: e1.stats().sessions == 0)
        p1.free(dst, owner="x")


async def test_engine_queue_timeout_raises_transfer_timeout() -> None:
    clock = ManualClock()
    async with engine_pair(fast_config(queue_timeout_s=0.5), clock) as pair:
        e0, p0 = pair.e0, pair.p0
        src = p0.alloc(1, owner="q")
        hs = e0.send("q", src, 1)
        await clock.advance(0.4)
        assert not hs.done
        await clock.advance(0.2)
        with pytest.raises(TransferTimeout) as info:
            await hs.wait()
        assert info.value.reason == "queue_timeout"
        await until(lambda: not p0.pinned_by("q"))
        p0.free(src, owner="q")


async def test_engine_transfer_timeout_quarantines_until_handle_final() -> None:
    # The receiver's own receive is wedged (the bytes moved underneath, the handle never says
    # so): it times out and quarantines; the sender, whose send finished, adopts its verdict.
    clock = ManualClock()
    async with engine_pair(fast_config(transfer_timeout_s=0.5), clock,
                           wrap1=partial(HeldTransport, held=[0])) as pair:
        e0, e1, p0, p1, h1 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t1
        src, dst = p0.alloc(2, owner="t"), p1.alloc(2, owner="t")
        hs = e0.send("t", src, 1)
        hr = e1.receive("t", dst, 0)
        await clock.advance(0.7)
        with pytest.raises(TransferTimeout) as info:
            await hr.wait()
        assert info.value.reason == "transfer_timeout"
        with pytest.raises(TransferTimeout) as sent:
            await hs.wait()
        assert sent.value.reason == "transfer_timeout" and not sent.value.outcome_unknown
        assert e1.session("t").state is State.QUARANTINED
        assert e1.stats().quarantines == 1
        assert e1.cancel("t") is CancelResult.NOT_CANCELLABLE
        p1.free(dst, owner="t")
        assert p1.num_deferred == 2
        h1.release(0)
        await until(lambda: p1.num_deferred == 0)
        assert e1.session("t").state is State.FAILED
        p0.free(src, owner="t")


async def test_engine_confirmed_sender_with_a_wedged_send_succeeds_and_keeps_blocks() -> None:
    # The receiver has every byte and confirmed (DONE); only the sender's own send handle
    # is wedged and cannot be cancelled. Before the outcome handshake the sender reported
    # transfer_timeout while the receiver reported success. Now the outcome is success on
    # both sides, the blocks stay pinned until the send is final, and the receiver, which
    # is done and stops heartbeating, is not reported lost (lease 5 s, clock moved 8 s).
    clock = ManualClock()
    async with engine_pair(fast_config(transfer_timeout_s=0.5), clock,
                           wrap0=partial(HeldTransport, held=[0])) as pair:
        e0, e1, p0, p1, h0 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t0
        src, dst = p0.alloc(2, owner="t"), p1.alloc(2, owner="t")
        expected = fill(p0, src, seed=3)
        hs = e0.send("t", src, 1)
        hr = e1.receive("t", dst, 0)
        await hr.wait()
        assert same_kv(kv_of(p1, dst), expected)
        result = await hs.wait()
        assert result.nbytes == p0.block_nbytes * 2
        await clock.advance(8.0)
        assert e0.session("t").state is State.IN_FLIGHT and e0.session("t").confirmed
        assert e0.session("t").deadline is None and e0.stats().quarantines == 0
        p0.free(src, owner="t")
        assert p0.num_deferred == 2  # the send still reads them: never freed early
        h0.release(0)
        await until(lambda: p0.num_deferred == 0)
        assert e0.session("t").state is State.COMPLETE
        p1.free(dst, owner="t")


@pytest.mark.parametrize(("receiver_blocks", "receiver_layerwise", "reason"), [
    (3, False, "size_mismatch"),
    (2, True, "layout_mismatch"),
])
async def test_engine_handshake_mismatch_fails_both_sides(
        receiver_blocks: int, receiver_layerwise: bool, reason: str) -> None:
    async with engine_pair() as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(2, owner="m"), p1.alloc(receiver_blocks, owner="m")
        fill(p1, dst, seed=9)
        before = kv_of(p1, dst)
        hs = e0.send("m", src, 1)
        hr = e1.receive("m", dst, 0, layerwise=receiver_layerwise)
        with pytest.raises(TransferFailed) as sent:
            await hs.wait()
        with pytest.raises(TransferFailed) as got:
            await hr.wait()
        assert sent.value.reason == got.value.reason == reason
        assert same_kv(kv_of(p1, dst), before)  # nothing was written
        await until(lambda: e0.stats().sessions == e1.stats().sessions == 0)
        p0.free(src, owner="m")
        p1.free(dst, owner="m")


async def test_engine_layout_extra_mismatch_is_layout_mismatch() -> None:
    async with engine_pair(kwargs0=dict(layout_extra=(0, 2)),
                           kwargs1=dict(layout_extra=(1, 2))) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(1, owner="s"), p1.alloc(1, owner="s")
        hs, hr = e0.send("s", src, 1), e1.receive("s", dst, 0)
        for handle in (hs, hr):
            with pytest.raises(TransferFailed) as info:
                await handle.wait()
            assert info.value.reason == "layout_mismatch"
        await free_once_released(p0, p1, "s", src, dst)


async def test_engine_admission_errors_leave_pool_unchanged() -> None:
    async with engine_pair() as pair:
        e0, p0 = pair.e0, pair.p0
        src = p0.alloc(2, owner="a")
        e0.send("a", src, 1)
        with pytest.raises(DuplicateSessionError):
            e0.send("a", src, 1)
        with pytest.raises(EngineConfigError):
            e0.send("b", src, 0)  # this rank
        with pytest.raises(EngineConfigError):
            e0.send("b", [], 1)
        with pytest.raises(EngineConfigError):
            e0.send("b", src, 7)
        assert p0.pinned_by("b") == frozenset()
        assert e0.cancel("a") is CancelResult.CANCELLED_BEFORE_ADVERTISE
        p0.free(src, owner="a")


async def test_engine_drain_reports_what_is_left_and_refuses_new_work() -> None:
    async with engine_pair(wrap0=partial(HeldTransport, held=[0]),
                           kwargs0=dict(config=fast_config(drain_timeout_s=0.1))) as pair:
        e0, e1, p0, p1, h0 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t0
        src, dst = p0.alloc(2, owner="d"), p1.alloc(2, owner="d")
        hs = e0.send("d", src, 1)
        await e1.receive("d", dst, 0).wait()
        report = await e0.drain(0.1)
        assert not report.clean
        assert [s.request_id for s in report.left] == ["d"]
        assert report.left[0].state is State.IN_FLIGHT
        assert p0.pinned_by("d") == frozenset(src)  # left pinned, never freed early
        with pytest.raises(EngineClosedError):
            e0.send("e", src, 1)
        h0.release(0)
        await hs.wait()
        await until(lambda: not p0.pinned_by("d"))
        report = await e0.drain(1.0)
        assert report.clean
        p0.free(src, owner="d")
        p1.free(dst, owner="d")
    with pytest.raises(EngineConfigError):
        await e0.drain(0)


async def test_engine_drain_is_bounded_in_real_time_with_a_frozen_clock() -> None:
    clock = ManualClock()  # never advanced: only real time can end the drain
    async with engine_pair(clock=clock, wrap0=partial(HeldTransport, held=[0]),
                           kwargs0=dict(config=fast_config(drain_timeout_s=0.1))) as pair:
        e0, e1, p0, p1, h0 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t0
        src, dst = p0.alloc(1, owner="f"), p1.alloc(1, owner="f")
        hs = e0.send("f", src, 1)
        await e1.receive("f", dst, 0).wait()
        with anyio.fail_after(5):
            report = await e0.drain(0.1)
        assert [s.request_id for s in report.left] == ["f"] and report.seconds >= 0.1
        h0.release(0)
        await hs.wait()
        p0.free(src, owner="f")
        p1.free(dst, owner="f")
