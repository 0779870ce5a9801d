"""Layer-wise transfers stopped part-way (cancel with some layers posted, a failed layer),
and an advertise that no send ever claims."""

from __future__ import annotations

from functools import partial

import pytest
from engine_support import (
    HeldTransport,
    engine_pair,
    fast_config,
    fill,
    free_once_released,
    kv_of,
    same_kv,
    ticks,
    until,
)
from kvhandoff.engine import TransferCancelled, TransferFailed
from kvhandoff.engine.transports import Fault, FaultyTransport
from kvhandoff.sessions import CancelResult, State

pytestmark = pytest.mark.anyio

LAYERS = 4


async def test_engine_layerwise_cancel_part_way_completes_every_layer_then_releases() -> None:
    """A cancel after some layers were posted surfaces at once, but the sender posts the
    remaining layers (their bytes are discarded) so every receive the receiver posted is
    matched: over a transport that cannot cancel a posted send (MPI) this is the only way
    both sides become quiescent. Blocks stay pinned until then, and the wedged layer holds
    the sender's blocks until it finishes."""
    # Layer 1's send is wedged.
    async with engine_pair(wrap0=partial(HeldTransport, held=[1], cancellable=True),
                           num_layers=LAYERS) as pair:
        e0, e1, p0, p1, h0 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t0
        src, dst = p0.alloc(2, owner="p"), p1.alloc(2, owner="p")
        hs = e0.send("p", src, 1, layerwise=True)
        hr = e1.receive("p", dst, 0, layerwise=True)
        hs.layer_ready(0)
        hs.layer_ready(1)
        await until(lambda: len(h0.posts) == 2)
        assert e0.cancel("p") is CancelResult.CANCEL_REQUESTED_IN_FLIGHT
        for handle in (hs, hr):
            with pytest.raises(TransferCancelled):
                await handle.wait()
        # Every layer is now posted exactly once, whatever was ready.
        assert [tag for _, tag, _ in h0.posts] == [1, 2, 3, 4]
        hs.layer_ready(2)  # after the cancel: recorded, never posted again
        await ticks(e0, e1)  # many chances to post it again
        assert len(h0.posts) == LAYERS
        snapshot = e0.session("p")  # cancel requested, waiting for the wedged layer
        assert snapshot.cancel_requested and not snapshot.state.is_terminal
        assert p0.pinned_by("p") == frozenset(src)  # the wedged layer may still read them
        # Every receive was matched, so the receiver is quiescent and released already.
        await until(lambda: not p1.pinned_by("p"))
        h0.release(1)
        await until(lambda: not p0.pinned_by("p") and not p1.pinned_by("p"))
        assert e0.session("p").state is State.FAILED
        assert e1.session("p").state is State.FAILED
        p0.free(src, owner="p")
        p1.free(dst, owner="p")


async def test_engine_layerwise_wedged_layer_aborts_at_the_transfer_deadline() -> None:
    """A completing wind-down is bounded: at the transfer deadline the pending operations
    are cancelled and the peer is told to abort its side."""
    # Layer 1's send is stuck until cancelled.
    async with engine_pair(fast_config(transfer_timeout_s=0.3), num_layers=LAYERS,
                           wrap0=partial(FaultyTransport, seed=5, faults={1: Fault.STUCK})) \
            as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(2, owner="w"), p1.alloc(2, owner="w")
        hs = e0.send("w", src, 1, layerwise=True)
        e1.receive("w", dst, 0, layerwise=True)
        hs.layer_ready(0)
        hs.layer_ready(1)
        await until(lambda: e0.session("w").state is State.IN_FLIGHT)
        e0.cancel("w")
        # Never released by hand: the deadline's cancel frees the wedged send.
        await until(lambda: not p0.pinned_by("w") and not p1.pinned_by("w"), timeout=10)
        p0.free(src, owner="w")
        p1.free(dst, owner="w")


async def test_engine_layerwise_failed_layer_fails_transfer_after_all_final() -> None:
    # A layer's receive fails on the receiver: both sides fail with the same reason.
    async with engine_pair(wrap1=partial(FaultyTransport, seed=3, faults={1: Fault.ERROR}),
                           num_layers=LAYERS) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(2, owner="e"), p1.alloc(2, owner="e")
        hs = e0.send("e", src, 1, layerwise=True)
        hr = e1.receive("e", dst, 0, layerwise=True)
        for layer in range(LAYERS):
            hs.layer_ready(layer)
        with pytest.raises(TransferFailed) as got:
            await hr.wait()
        with pytest.raises(TransferFailed) as sent:
            await hs.wait()
        assert got.value.reason == sent.value.reason == "transport_error"
        await free_once_released(p0, p1, "e", src, dst)


async def test_engine_layerwise_sender_error_after_the_bytes_landed_is_success() -> None:
    # The sender's transport reports a layer's send failed although its bytes arrived (a
    # link failing after the data moved). Before the outcome handshake the sender failed
    # while the receiver completed; now the receiver, which sees every byte land, decides,
    # and both sides report success.
    async with engine_pair(wrap0=partial(FaultyTransport, seed=3, faults={1: Fault.ERROR}),
                           num_layers=LAYERS) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(2, owner="e"), p1.alloc(2, owner="e")
        expected = fill(p0, src, seed=5)
        hs = e0.send("e", src, 1, layerwise=True)
        hr = e1.receive("e", dst, 0, layerwise=True)
        for layer in range(LAYERS):
            hs.layer_ready(layer)
        await hr.wait()
        await hs.wait()
        assert same_kv(kv_of(p1, dst), expected)
        await until(lambda: not p0.pinned_by("e") and not p1.pinned_by("e"))
        assert e0.session("e").state is e1.session("e").state is State.COMPLETE
        p0.free(src, owner="e")
        p1.free(dst, owner="e")


async def test_engine_unclaimed_advertise_fails_receiver_after_queue_timeout() -> None:
    async with engine_pair(fast_config(queue_timeout_s=0.1, transfer_timeout_s=5.0)) as pair:
        e1, p1 = pair.e1, pair.p1
        dst = p1.alloc(1, owner="u")
        hr = e1.receive("u", dst, 0)  # rank 0's host never sends "u"
        with pytest.raises(TransferFailed) as info:
            await hr.wait()
        assert info.value.reason == "protocol_error"
        await until(lambda: not p1.pinned_by("u"))
        p1.free(dst, owner="u")
