"""The outcome handshake (the receiver decides, its DONE confirms the sender), what a side
says when it cannot learn the other's outcome, the per-peer early-advertise table, leases
of a peer that finished, and the optional checksum of the moved bytes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from functools import partial

import pytest
import torch
from engine_support import (
    HeldTransport,
    ManualClock,
    engine_pair,
    fast_config,
    fill,
    free_once_released,
    kv_of,
    make_pool,
    running,
    same_kv,
    ticks,
    until,
)
from engine_support import both_backends as anyio_backend  # noqa: F401 (fixture)
from kvhandoff.engine import (
    BlockPool,
    EngineConfig,
    TransferEngine,
    TransferFailed,
    TransferTimeout,
)
from kvhandoff.engine import _wire as wire
from kvhandoff.engine.transports import FaultyTransport, Transport, loopback_group
from kvhandoff.sessions import FailureReason, State

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def three_ranks(config: EngineConfig) -> AsyncIterator[
        tuple[TransferEngine, TransferEngine, BlockPool, BlockPool, Transport, Transport]]:
    """Engines on ranks 0 (sender) and 1 (receiver) of a three-rank loopback group; rank 2
    is a bare transport the test speaks raw messages through (a confused or hostile third
    rank, or a hand-driven peer). Yields rank 1's transport too, to forge its words."""
    t0, t1, t2 = loopback_group(3)
    p0, p1 = make_pool(), make_pool()
    e0 = TransferEngine(p0, t0, config=config)
    e1 = TransferEngine(p1, t1, config=config)
    async with running(e0, e1):
        yield e0, e1, p0, p1, t1, t2
    p0.check()
    p1.check()


def _advertise(rid: str, pool: BlockPool, blocks: int = 1) -> bytes:
    return wire.encode(wire.Advertise(
        rid, blocks, pool.block_nbytes * blocks,
        wire.layout_fingerprint(pool.num_layers, pool.block_shape, pool.dtype), 1))


async def _transfer_completes(e0: TransferEngine, e1: TransferEngine, p0: BlockPool,
                              p1: BlockPool, rid: str) -> None:
    src, dst = p0.alloc(2, owner=rid), p1.alloc(2, owner=rid)
    expected = fill(p0, src, seed=7)
    hr = e1.receive(rid, dst, 0)
    await until(lambda: e0.stats().early_advertises >= 1)  # rank 1's waits for send()
    hs = e0.send(rid, src, 1)
    await hs.wait()
    await hr.wait()
    assert same_kv(kv_of(p1, dst), expected)
    await free_once_released(p0, p1, rid, src, dst)


# --- item 2: a third rank and the early-advertise table --------------------------------------

async def test_engine_third_rank_advertise_cannot_take_anothers_request_id() -> None:
    # Rank 2 advertises "req" to rank 0 first. Before the table was keyed by (peer, request
    # id), rank 1's real advertise was rejected as a duplicate: the sender ended
    # queue_timeout, the receiver protocol_error (duplicate_request).
    async with three_ranks(fast_config()) as (e0, e1, p0, p1, _, t2):
        t2.send_control(0, _advertise("req", p0))
        await until(lambda: e0.stats().early_advertises == 1)
        await _transfer_completes(e0, e1, p0, p1, "req")
        assert e0.stats().control_rejected == 0
        assert e0.stats().early_advertises == 1  # rank 2's still waits for a send to rank 2


def _frame(payload: bytes) -> list[wire.ControlMessage]:
    """The messages of one control payload (a frame), every byte of it well-formed."""
    messages, errors = wire.decode_frame(payload)
    assert not errors, errors
    return messages


async def test_engine_junk_advertises_from_one_rank_never_crowd_out_another() -> None:
    # Rank 2 fills its whole share of the table (and then some). Before the bound was per
    # peer, that filled the table for everyone, and rank 1's receive-before-send failed.
    async with three_ranks(fast_config(max_early_advertises=4)) as (e0, e1, p0, p1, _, t2):
        for i in range(10):
            t2.send_control(0, _advertise(f"junk-{i}", p0))
        await until(lambda: e0.stats().control_rejected == 6)  # 4 kept, the rest refused
        assert e0.stats().early_advertises == 4
        await _transfer_completes(e0, e1, p0, p1, "real")
        refused = [m for _, payload in t2.recv_control() for m in _frame(payload)]
        assert {type(m) for m in refused} == {wire.Cancel}
        assert all(m.reason is wire.FailReason.DUPLICATE_REQUEST for m in refused)


async def test_engine_peer_words_for_anothers_early_advertise_touch_nothing() -> None:
    # A CANCEL from rank 2 for "req" must not drop rank 1's parked advertise of "req".
    async with three_ranks(fast_config()) as (e0, e1, p0, p1, _, t2):
        src, dst = p0.alloc(1, owner="req"), p1.alloc(1, owner="req")
        hr = e1.receive("req", dst, 0)
        await until(lambda: e0.stats().early_advertises == 1)
        t2.send_control(0, wire.encode(wire.Cancel("req")))
        await ticks(e0)
        assert e0.stats().early_advertises == 1
        hs = e0.send("req", src, 1)
        await hs.wait()
        await hr.wait()
        await free_once_released(p0, p1, "req", src, dst)


# --- item 1: DONE ------------------------------------------------------------------------

async def test_engine_done_from_the_wrong_rank_or_for_no_transfer_is_rejected() -> None:
    clock = ManualClock()
    async with engine_pair(fast_config(), clock, wrap1=partial(HeldTransport, held=[0])) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(1, owner="r"), p1.alloc(1, owner="r")
        hs = e0.send("r", src, 1)
        hr = e1.receive("r", dst, 0)
        await until(lambda: e0.session("r").local_final)  # sent; rank 1 never confirms
        before = e0.stats().control_rejected
        # A DONE for a request rank 0 does not have, and one naming the receiver's request to
        # the receiver itself (only a sender is confirmed): both refused, nothing changes.
        pair.t1.send_control(0, wire.encode(wire.Done("nobody")))
        pair.t0.send_control(1, wire.encode(wire.Done("r")))
        await until(lambda: e0.stats().control_rejected == before + 1
                    and e1.stats().control_rejected == 1)
        assert not e0.session("r").confirmed and not hs.done and not hr.done
        pair.t1.release(0)
        await hs.wait()
        await hr.wait()
        await free_once_released(p0, p1, "r", src, dst)


async def test_engine_only_the_receivers_own_done_confirms_a_send() -> None:
    async with three_ranks(fast_config(transfer_timeout_s=30.0)) as (e0, _, p0, __, t1, t2):
        # Rank 2, driven by hand, is the receiver: it posts the receive and advertises.
        landed = torch.zeros(p0.block_nbytes, dtype=torch.uint8)
        op = t2.post_recv(landed, 0, 1)
        t2.send_control(0, _advertise("r", p0))
        src = p0.alloc(1, owner="r")
        hs = e0.send("r", src, 2)
        await until(lambda: e0.session("r").local_final)  # the bytes left; no word yet
        assert op.test().name == "DONE"
        t1.send_control(0, wire.encode(wire.Done("r")))  # rank 1 is no part of "r"
        await until(lambda: e0.stats().control_rejected == 1)
        await ticks(e0)
        assert not e0.session("r").confirmed and not hs.done
        t2.send_control(0, wire.encode(wire.Done("r")))  # the receiver's own word
        result = await hs.wait()
        assert result.peer == 2
        await until(lambda: not p0.pinned_by("r"))
        assert e0.session("r").state is State.COMPLETE
        p0.free(src, owner="r")


async def test_engine_sender_whose_receiver_never_answers_fails_with_unknown_outcome() -> None:
    # The receiver has no deadline and its receive is wedged, so it never decides; it stays
    # alive (heartbeats). The sender waits its deadline plus the grace for the receiver's
    # word, then gives up saying it cannot know the outcome: never success.
    clock = ManualClock()
    cfg = fast_config(transfer_timeout_s=0.5, confirm_grace_s=0.5)
    async with engine_pair(cfg, clock, wrap1=partial(HeldTransport, held=[0]),
                           kwargs1={"config": fast_config(transfer_timeout_s=None)}) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(1, owner="r"), p1.alloc(1, owner="r")
        hs = e0.send("r", src, 1)
        e1.receive("r", dst, 0)
        await until(lambda: e0.session("r").local_final)
        await clock.advance(0.8)  # past the deadline, not past the grace
        assert not hs.done
        await clock.advance(0.4)
        with pytest.raises(TransferTimeout) as info:
            await hs.wait()
        assert info.value.reason is FailureReason.TRANSFER_TIMEOUT
        assert info.value.outcome_unknown and "outcome unknown" in str(info.value)
        assert e0.session("r").failure.outcome_unknown  # type: ignore[union-attr]
        e1.cancel("r")
        pair.t1.release(0)
        await free_once_released(p0, p1, "r", src, dst)


# --- item 4: a healthy peer is not reported dead ---------------------------------------------

async def test_engine_wedged_receive_with_a_finished_sender_is_timeout_not_peer_lost() -> None:
    # The receiver's own receive is wedged while the sender's send finished. Before the
    # outcome handshake the sender completed, released the transfer and stopped
    # heartbeating, and the receiver reported peer_lost once the lease (1 s) lapsed, well
    # before its transfer deadline (3 s). Now the sender waits for the receiver's word and
    # stays visibly alive: both sides end transfer_timeout, at the deadline.
    clock = ManualClock()
    cfg = fast_config(lease_s=1.0, transfer_timeout_s=3.0)
    async with engine_pair(cfg, clock, wrap1=partial(HeldTransport, held=[0])) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(1, owner="w"), p1.alloc(1, owner="w")
        hs = e0.send("w", src, 1)
        hr = e1.receive("w", dst, 0)
        await until(lambda: e0.session("w").local_final)
        await clock.advance(2.0, steps=20)  # two leases: the live sender kept heartbeating
        assert not hr.done and not hs.done
        await clock.advance(1.5, steps=15)
        with pytest.raises(TransferTimeout) as got:
            await hr.wait()
        with pytest.raises(TransferTimeout) as sent:
            await hs.wait()
        assert got.value.reason == sent.value.reason == "transfer_timeout"
        assert not sent.value.outcome_unknown
        pair.t1.release(0)
        await free_once_released(p0, p1, "w", src, dst)


async def test_engine_silent_receiver_is_peer_lost_and_the_sender_says_outcome_unknown() -> None:
    # The receiver process goes silent after the sender's bytes left: the sender cannot
    # know whether they landed, and says so; the receiver, which never got them, knows.
    clock = ManualClock()
    cfg = fast_config(lease_s=1.0, transfer_timeout_s=30.0)
    async with engine_pair(cfg, clock, wrap0=partial(FaultyTransport, seed=1),
                           wrap1=partial(HeldTransport, held=[0])) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(1, owner="s"), p1.alloc(1, owner="s")
        hs = e0.send("s", src, 1)
        hr = e1.receive("s", dst, 0)
        await until(lambda: e0.session("s").local_final)
        pair.t0.lose_peer(1)  # from now on nothing passes between the two ranks
        await clock.advance(1.5, steps=15)
        with pytest.raises(TransferFailed) as sent:
            await hs.wait()
        assert sent.value.reason is FailureReason.PEER_LOST and sent.value.outcome_unknown
        with pytest.raises(TransferFailed) as got:
            await hr.wait()
        assert got.value.reason is FailureReason.PEER_LOST and not got.value.outcome_unknown
        pair.t1.release(0)
        await free_once_released(p0, p1, "s", src, dst)


# --- the optional checksum -----------------------------------------------------------------

class _CorruptingTransport(HeldTransport):
    """Sends a copy of each buffer with one byte flipped: bytes damaged on the way."""

    def post_send(self, buf: torch.Tensor, peer: int, tag: int):  # type: ignore[no-untyped-def]
        damaged = buf.clone()
        damaged[0] ^= 0xFF
        return self._wrap(self.inner.post_send(damaged, peer, tag))


@pytest.mark.parametrize("layerwise", [False, True])
async def test_engine_checksum_mismatch_fails_both_sides_with_a_typed_reason(
        layerwise: bool) -> None:
    async with engine_pair(fast_config(checksum=True), wrap0=_CorruptingTransport) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(2, owner="c"), p1.alloc(2, owner="c")
        fill(p0, src, seed=1)
        hs = e0.send("c", src, 1, layerwise=layerwise)
        hr = e1.receive("c", dst, 0, layerwise=layerwise)
        for layer in range(p0.num_layers if layerwise else 0):
            hs.layer_ready(layer)
        with pytest.raises(TransferFailed) as got:
            await hr.wait()
        with pytest.raises(TransferFailed) as sent:
            await hs.wait()
        assert got.value.reason is sent.value.reason is FailureReason.CHECKSUM_MISMATCH
        await free_once_released(p0, p1, "c", src, dst)


@pytest.mark.parametrize("layerwise", [False, True])
async def test_engine_checksum_on_intact_bytes_completes(layerwise: bool) -> None:
    async with engine_pair(fast_config(checksum=True)) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(3, owner="k"), p1.alloc(3, owner="k")
        expected = fill(p0, src, seed=2)
        hr = e1.receive("k", dst, 0, layerwise=layerwise)
        hs = e0.send("k", src, 1, layerwise=layerwise)
        for layer in reversed(range(p0.num_layers if layerwise else 0)):
            hs.layer_ready(layer)
        await hs.wait()
        await hr.wait()
        assert same_kv(kv_of(p1, dst), expected)
        await free_once_released(p0, p1, "k", src, dst)


async def test_engine_without_checksum_damaged_bytes_go_unnoticed() -> None:
    # The contrast that shows what the checksum is for (it is off by default).
    async with engine_pair(fast_config(), wrap0=_CorruptingTransport) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(1, owner="n"), p1.alloc(1, owner="n")
        expected = fill(p0, src, seed=3)
        hs, hr = e0.send("n", src, 1), e1.receive("n", dst, 0)
        await hs.wait()
        await hr.wait()
        assert not same_kv(kv_of(p1, dst), expected)
        await free_once_released(p0, p1, "n", src, dst)
