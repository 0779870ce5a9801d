"""TransferEngine under faults: stuck handles (quarantine, blocks held until the handle is
final, the loop keeps serving other sessions), progress-aware health (budget, deadline, not
a slow link), leases, and malformed or misdirected control messages."""

from __future__ import annotations

import struct
from functools import partial

import anyio
import pytest
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
    until,
)
from kvhandoff.engine import TransferEngine, TransferFailed, TransferTimeout
from kvhandoff.engine import _wire as wire
from kvhandoff.engine.transports import Fault, FaultyTransport, loopback_group
from kvhandoff.sessions import CancelResult, Health, State

pytestmark = pytest.mark.anyio


async def test_engine_stuck_handle_quarantined_others_complete_blocks_held() -> None:
    clock = ManualClock()
    cfg = fast_config(transfer_timeout_s=1.0, quarantine_budget=1, progress_deadline_s=100.0)
    # The first two receives never finish until released (rank 1 plays the part of rank 0
    # here: ``e0`` is the engine with the wedged handles).
    async with engine_pair(cfg, clock, wrap1=partial(HeldTransport, held=[0, 1]),
                           num_blocks=64) as pair:
        e0, e1, p0, p1, h0 = pair.e1, pair.e0, pair.p1, pair.p0, pair.t1
        stuck = {}
        for rid in ("stuck-a", "stuck-b"):
            src, dst = p0.alloc(2, owner=rid), p1.alloc(2, owner=rid)
            stuck[rid] = (e0.receive(rid, src, 0), src, dst)
            e1.send(rid, dst, 1)  # its bytes move; rank 1's receive never says so
            await until(lambda rid=rid: e1.session(rid).local_final)
        # The loop keeps serving other transfers while two handles are wedged.
        for i in range(10):
            rid = f"ok-{i}"
            src, dst = p0.alloc(1, owner=rid), p1.alloc(1, owner=rid)
            expected = fill(p0, src, seed=i)
            hs, hr = e0.send(rid, src, 0), e1.receive(rid, dst, 1)
            await hs.wait()
            await hr.wait()
            assert same_kv(kv_of(p1, dst), expected)
            await until(lambda rid=rid: not p0.pinned_by(rid))
            p0.free(src, owner=rid)
            p1.free(dst, owner=rid)
        assert e0.health().healthy
        await clock.advance(1.5)
        for rid, (handle, src, _) in stuck.items():
            with pytest.raises(TransferTimeout):
                await handle.wait()
            assert e0.session(rid).state is State.QUARANTINED
            p0.free(src, owner=rid)  # deferred: the transport may still write them
        health = e0.health()
        assert not health.healthy and health.reason == "quarantine_budget_exceeded"
        assert health.quarantined == 2
        # Every block that can be allocated now excludes the quarantined ones.
        held_blocks = {b for _, src, _ in stuck.values() for b in src}
        assert p0.deferred_blocks() == frozenset(held_blocks)
        grabbed = p0.alloc(p0.num_free, owner="grab")
        assert held_blocks.isdisjoint(grabbed)
        p0.free(grabbed, owner="grab")
        h0.release(0)
        await until(lambda: e0.health().quarantined == 1)
        await until(lambda: e0.health().healthy)  # back within the budget
        h0.release(1)
        await until(lambda: p0.num_deferred == 0)
        assert e0.stats().quarantines == 2
        for rid, (_, _, dst) in stuck.items():
            p1.free(dst, owner=rid)
    assert p0.num_free == p0.num_blocks


async def test_engine_no_progress_flips_health_and_asks_restart() -> None:
    clock = ManualClock()
    restarts: list[Health] = []
    cfg = fast_config(transfer_timeout_s=None, progress_deadline_s=1.0, restart_grace_s=2.0)
    async with engine_pair(cfg, clock, wrap0=partial(HeldTransport, held=[0], cancellable=True),
                           kwargs0=dict(on_restart=restarts.append)) as pair:
        e0, e1, p0, p1, h0 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t0
        src, dst = p0.alloc(1, owner="w"), p1.alloc(1, owner="w")
        hs = e0.send("w", src, 1)
        await e1.receive("w", dst, 0).wait()
        await clock.advance(0.8)
        assert e0.health().healthy and not e0.restart_requested
        await clock.advance(0.5)
        health = e0.health()
        assert not health.healthy and health.reason == "no_progress"
        assert health.in_flight == 1
        # Unhealthy: cancel asks nothing of the backend.
        result = e0.cancel("w")
        assert result is CancelResult.BACKEND_UNHEALTHY and not result.safe_to_free
        assert not e0.restart_requested
        await clock.advance(2.5)
        assert e0.restart_requested
        with anyio.fail_after(2):
            assert not (await e0.wait_restart_requested()).healthy
        assert len(restarts) == 1 and restarts[0].reason == "no_progress"
        h0.release(0)
        await hs.wait()
        await until(lambda: e0.health().healthy)
        assert not e0.restart_requested
        p0.free(src, owner="w")
        p1.free(dst, owner="w")


async def test_engine_slow_link_keeps_health() -> None:
    clock = ManualClock()
    cfg = fast_config(queue_timeout_s=None, transfer_timeout_s=None, progress_deadline_s=1.0,
                      lease_s=100.0)
    # Every send finishes 0.5 s (of the manual clock) after its bytes moved.
    async with engine_pair(cfg, clock, wrap0=partial(FaultyTransport, seed=1, delay_s=0.5,
                                                     clock=clock)) as pair:
        e0, e1, p0, p1, f0 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t0
        open_: list[tuple[str, object, list[int], list[int]]] = []
        unhealthy_seen = []
        for i in range(16):  # two transfers always in flight, 4 s of clock in all
            rid = f"slow-{i}"
            src, dst = p0.alloc(1, owner=rid), p1.alloc(1, owner=rid)
            open_.append((rid, e0.send(rid, src, 1), src, dst))
            e1.receive(rid, dst, 0)
            await clock.advance(0.25, steps=5)
            unhealthy_seen.append(not e0.health().healthy)
            if len(open_) > 2:
                rid, handle, src, dst = open_.pop(0)
                await handle.wait()  # type: ignore[attr-defined]
                p0.free(src, owner=rid)
                p1.free(dst, owner=rid)
        await clock.advance(1.0)
        for rid, handle, src, dst in open_:
            await handle.wait()  # type: ignore[attr-defined]
            p0.free(src, owner=rid)
            p1.free(dst, owner=rid)
        assert f0.injected[Fault.DELAY] == 16
        assert not any(unhealthy_seen)
        assert e0.stats().completed == 16


async def test_engine_silent_peer_fails_sessions_with_peer_lost() -> None:
    clock = ManualClock()
    cfg = fast_config(queue_timeout_s=None, transfer_timeout_s=None, lease_s=1.0,
                      progress_deadline_s=100.0)
    # Both sides' data operations hang, so the sessions stay open on both ranks.
    hanging = partial(FaultyTransport, seed=0, faults={0: Fault.STUCK})
    async with engine_pair(cfg, clock, wrap0=hanging, wrap1=hanging) as pair:
        e0, e1, p0, p1, f0 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t0
        src, dst = p0.alloc(2, owner="l"), p1.alloc(2, owner="l")
        hs, hr = e0.send("l", src, 1), e1.receive("l", dst, 0)
        await until(lambda: e0.session("l").state is State.IN_FLIGHT
                    and e1.session("l").state is State.IN_FLIGHT)
        await clock.advance(3.0, steps=30)  # heartbeats keep both leases alive
        assert not hs.done and not hr.done
        f0.lose_peer(1)  # from now on rank 0 hears nothing from rank 1, and vice versa
        await clock.advance(1.5, steps=15)
        for handle in (hs, hr):
            with pytest.raises(TransferFailed) as info:
                await handle.wait()
            assert info.value.reason == "peer_lost"
        await free_once_released(p0, p1, "l", src, dst)


def _advertise_bytes(rid: str, blocks: int, nbytes: int, tag: int = 7) -> bytes:
    return wire.encode(wire.Advertise(request_id=rid, block_count=blocks, total_bytes=nbytes,
                                      layout_fingerprint=1, data_tag=tag))


def _malformed(rid: str, block_nbytes: int) -> list[bytes]:
    good = _advertise_bytes(rid, 2, 2 * block_nbytes)
    wrong_version = good[:4] + bytes([99]) + good[5:]
    huge_count = good[:8] + struct.pack("!I", 2**32 - 1) + good[12:]
    huge_bytes = good[:12] + struct.pack("!Q", 2**63) + good[20:]
    bad_kind = good[:5] + bytes([77]) + good[6:]
    return [good[:5], good[:-3], good + b"x", wrong_version, huge_count, huge_bytes, bad_kind,
            b"", b"\x00" * 64]


async def test_engine_malformed_control_messages_rejected_nothing_freed() -> None:
    t0, t1, t2 = loopback_group(3)
    p0, p1, p2 = make_pool(), make_pool(), make_pool()
    cfg = fast_config()
    async with running(TransferEngine(p0, t0, config=cfg), TransferEngine(p1, t1, config=cfg),
                       TransferEngine(p2, t2, config=cfg)) as (e0, e1, _):
        src = p0.alloc(2, owner="r")
        expected = fill(p0, src, seed=5)
        hs = e0.send("r", src, 1)
        p0.free(src, owner="r")  # deferred while the send holds them
        junk = _malformed("r", p0.block_nbytes)
        for payload in junk:
            t2.send_control(0, payload)
        # Well-formed but misdirected: wrong sender for "r", unknown request ids.
        t2.send_control(0, _advertise_bytes("r", 2, 2 * p0.block_nbytes))
        t2.send_control(0, wire.encode(wire.Cancel("r")))
        t2.send_control(0, wire.encode(wire.Fail("nope", wire.FailReason.INTERNAL, "x")))
        t1.send_control(0, wire.encode(wire.Cancel("other-request")))
        # Each junk payload is one rejection, except ``good + b"x"``: a frame whose first
        # message (a well-formed advertise, from the wrong rank) is rejected on its own
        # before its one-byte tail is.
        await until(lambda: e0.stats().control_rejected == len(junk) + 1 + 4)
        assert e0.session("r").state is State.QUEUED and not hs.done
        assert p0.num_deferred == 2  # nothing freed early
        # The real receiver still completes the transfer.
        dst = p1.alloc(2, owner="r")
        await e1.receive("r", dst, 0).wait()
        await hs.wait()
        assert same_kv(kv_of(p1, dst), expected)
        await until(lambda: p0.num_deferred == 0)
        p1.free(dst, owner="r")
    for pool in (p0, p1, p2):
        pool.check()


async def test_engine_advertise_to_a_receiver_is_rejected_with_fail() -> None:
    async with engine_pair() as pair:
        e1, p1, t0 = pair.e1, pair.p1, pair.t0
        dst = p1.alloc(1, owner="r")
        hr = e1.receive("r", dst, 0)
        # An advertise for "r" to the rank that receives it: a protocol error, not a send.
        t0.send_control(1, _advertise_bytes("r", 1, p1.block_nbytes))
        await until(lambda: e1.stats().control_rejected == 1)
        assert not hr.done
        assert e1.cancel("r") is CancelResult.CANCEL_REQUESTED_IN_FLIGHT
        await until(lambda: not p1.pinned_by("r"))
        p1.free(dst, owner="r")
