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


async def test_engine_layerwise_cancel_part_way_stops_posting_and_releases() -> None:
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
        hs.layer_ready(2)  # after the cancel: recorded, never posted
        await anyio.sleep(0.02)
        assert len(h0.posts) == 2
        snapshot = e0.session("p")  # cancel requested, waiting for the wedged layer
        assert snapshot.cancel_requested and not snapshot.state.is_terminal
        assert p0.pinned_by("p") == frozenset(src)  # the wedged layer may still read them
        await until(lambda: not p1.pinned_by("p"))  # the receiver cancelled its receives
        h0.release(1)
        await until(lambda: not p0.pinned_by("p"))
        assert e0.session("p").state in (State.CANCELLED, State.FAILED)
        p0.free(src, owner="p")
        p1.free(dst, owner="p")
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
