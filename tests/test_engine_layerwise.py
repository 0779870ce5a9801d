"""Layer-wise transfers stopped part-way (cancel with some layers posted, a failed layer),
and an advertise that no send ever claims."""

from __future__ import annotations

import anyio
import pytest
from kvhandoff.engine import TransferCancelled, TransferEngine, TransferFailed
from kvhandoff.engine.transports import Fault, FaultyTransport, loopback_group
from kvhandoff.sessions import CancelResult, State
from test_engine_support import HeldTransport, fast_config, make_pool, running, until

pytestmark = pytest.mark.anyio

LAYERS = 4


async def test_engine_layerwise_cancel_part_way_completes_every_layer_then_releases() -> None:
    """A cancel after some layers were posted surfaces at once, but the sender posts the
    remaining layers (their bytes are discarded) so every receive the receiver posted is
    matched: over a transport that cannot cancel a posted send (MPI) this is the only way
    both sides become quiescent. Blocks stay pinned until then, and the wedged layer holds
    the sender's blocks until it finishes."""
    t0, t1 = loopback_group(2)
    h0 = HeldTransport(t0, held=[1], cancellable=True)  # layer 1's send is wedged
    p0, p1 = make_pool(num_layers=LAYERS), make_pool(num_layers=LAYERS)
    async with running(TransferEngine(p0, h0, config=fast_config()),
                       TransferEngine(p1, t1, config=fast_config())) as (e0, e1):
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
        await anyio.sleep(0.02)
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
    p0.check()
    p1.check()


async def test_engine_layerwise_wedged_layer_aborts_at_the_transfer_deadline() -> None:
    """A completing wind-down is bounded: at the transfer deadline the pending operations
    are cancelled and the peer is told to abort its side."""
    t0, t1 = loopback_group(2)
    h0 = FaultyTransport(t0, seed=5, faults={1: Fault.STUCK})  # stuck until cancelled
    p0, p1 = make_pool(num_layers=LAYERS), make_pool(num_layers=LAYERS)
    cfg = fast_config(transfer_timeout_s=0.3)
    async with running(TransferEngine(p0, h0, config=cfg),
                       TransferEngine(p1, t1, config=cfg)) as (e0, e1):
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
    p0.check()
    p1.check()


async def test_engine_layerwise_failed_layer_fails_transfer_after_all_final() -> None:
    t0, t1 = loopback_group(2)
    f0 = FaultyTransport(t0, seed=3, faults={1: Fault.ERROR})
    p0, p1 = make_pool(num_layers=LAYERS), make_pool(num_layers=LAYERS)
    async with running(TransferEngine(p0, f0, config=fast_config()),
                       TransferEngine(p1, t1, config=fast_config())) as (e0, e1):
        src, dst = p0.alloc(2, owner="e"), p1.alloc(2, owner="e")
        hs = e0.send("e", src, 1, layerwise=True)
        hr = e1.receive("e", dst, 0, layerwise=True)
        for layer in range(LAYERS):
            hs.layer_ready(layer)
        with pytest.raises(TransferFailed) as info:
            await hs.wait()
        assert info.value.reason == "transport_error"
        with pytest.raises(TransferFailed):
            await hr.wait()
        await until(lambda: not p0.pinned_by("e") and not p1.pinned_by("e"))
        p0.free(src, owner="e")
        p1.free(dst, owner="e")
    p0.check()
    p1.check()


async def test_engine_unclaimed_advertise_fails_receiver_after_queue_timeout() -> None:
    t0, t1 = loopback_group(2)
    p0, p1 = make_pool(), make_pool()
    cfg = fast_config(queue_timeout_s=0.1, transfer_timeout_s=5.0)
    async with running(TransferEngine(p0, t0, config=cfg),
                       TransferEngine(p1, t1, config=cfg)) as (_, e1):
        dst = p1.alloc(1, owner="u")
        hr = e1.receive("u", dst, 0)  # rank 0's host never sends "u"
        with pytest.raises(TransferFailed) as info:
            await hr.wait()
        assert info.value.reason == "protocol_error"
        await until(lambda: not p1.pinned_by("u"))
        p1.free(dst, owner="u")
    p0.check()
    p1.check()
