"""Issue 14 in the engine: batched admission (``send_many`` / ``receive_many``), control
frames (everything due to one peer in a tick or call leaves as one payload), and the
whole-set pins behind them.

* a batch moves the same bytes as single calls, and mixes with them;
* bad input anywhere in a batch raises before anything changes: no session, no pin, no
  reserved data tag, no message sent;
* a batch's control messages to one peer leave in as few frames as fit in
  ``MAX_CONTROL_BYTES``, in order, and a peer parses them all;
* a malformed message inside a frame is rejected and ends its frame, touching no session.
"""

from __future__ import annotations

import pytest
from engine_support import (
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
from kvhandoff.engine import (
    DataTagsExhaustedError,
    EngineConfigError,
    PinError,
    TransferEngine,
    TransferFailed,
    TransferRequest,
)
from kvhandoff.engine import _wire as wire
from kvhandoff.engine.errors import UnknownBlockError
from kvhandoff.engine.transports import MAX_CONTROL_BYTES, loopback_group
from kvhandoff.sessions import DuplicateSessionError, State
from test_engine_tp import tp_world

pytestmark = pytest.mark.anyio


async def test_batched_calls_move_the_same_bytes_as_single_calls() -> None:
    async with engine_pair() as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        srcs = [p0.alloc(2, owner=f"b{i}") for i in range(6)]
        dsts = [p1.alloc(2, owner=f"b{i}") for i in range(6)]
        expected = [fill(p0, src, seed=i) for i, src in enumerate(srcs)]
        # Receives first for half of them (the sends then find early advertises), sends
        # first for the rest; one request of each batch is layer-wise, one has metadata.
        early = e1.receive_many([TransferRequest(f"b{i}", dsts[i], 0, layerwise=i == 1)
                                 for i in range(3)])
        sends = e0.send_many([TransferRequest(f"b{i}", srcs[i], 1, layerwise=i == 1,
                                              metadata=b"m%d" % i) for i in range(6)])
        late = e1.receive_many([TransferRequest(f"b{i}", dsts[i], 0) for i in range(3, 6)])
        sends[1].layer_ready(0)
        sends[1].layer_ready(1)
        results = [await h.wait() for h in early + late]
        for handle in sends:
            await handle.wait()
        for i, result in enumerate(results):
            assert result.metadata == b"m%d" % i
            assert same_kv(kv_of(p1, dsts[i]), expected[i])
        await until(lambda: not any(p0.pinned_by(f"b{i}") or p1.pinned_by(f"b{i}")
                                    for i in range(6)))
        for i in range(6):
            p0.free(srcs[i], owner=f"b{i}")
            p1.free(dsts[i], owner=f"b{i}")


@pytest.mark.parametrize("bad", ["duplicate", "live", "free_block", "unknown_block",
                                 "peer", "tokens", "metadata_on_receive", "not_a_request"])
async def test_a_bad_request_anywhere_in_a_batch_changes_nothing(bad: str) -> None:
    # A cancelled posted receive whose sender never sends settles at its transfer deadline.
    async with engine_pair(fast_config(transfer_timeout_s=0.2)) as pair:
        e0, e1, p1 = pair.e0, pair.e1, pair.p1
        pair.t1.max_tag = 5  # "live" and the three good ones fit: a leaked tag would not
        live = e1.receive("live", p1.alloc(1, owner="live"), 0)
        await until(lambda: e0.stats().early_advertises == 1)
        good = [p1.alloc(1, owner=f"g{i}") for i in range(3)]
        requests: list[object] = [TransferRequest(f"g{i}", good[i], 0) for i in range(3)]
        if bad == "duplicate":
            requests.append(TransferRequest("g0", p1.alloc(1, owner="x"), 0))
        elif bad == "live":
            requests.append(TransferRequest("live", p1.alloc(1, owner="x"), 0))
        elif bad == "free_block":
            free = p1.alloc(1, owner="x")
            p1.free(free, owner="x")
            requests.append(TransferRequest("x", free, 0))
        elif bad == "unknown_block":
            requests.append(TransferRequest("x", (p1.num_blocks,), 0))
        elif bad == "peer":
            requests.append(TransferRequest("x", p1.alloc(1, owner="x"), 1))  # itself
        elif bad == "tokens":
            requests.append(TransferRequest("x", p1.alloc(1, owner="x"), 0, num_tokens=10**6))
        elif bad == "metadata_on_receive":
            requests.append(TransferRequest("x", p1.alloc(1, owner="x"), 0, metadata=b"m"))
        else:
            requests.append(("x", (0,), 0))
        sessions_before = e1.stats().sessions
        pinned_before = p1.num_pinned
        expected_error = {"duplicate": DuplicateSessionError, "live": DuplicateSessionError,
                          "free_block": PinError,
                          "unknown_block": UnknownBlockError}.get(bad, EngineConfigError)
        with pytest.raises(expected_error):
            e1.receive_many(requests)  # type: ignore[arg-type]
        assert e1.stats().sessions == sessions_before
        assert p1.num_pinned == pinned_before
        assert not any(p1.pinned_by(f"g{i}") for i in range(3))
        await ticks(e0, e1)
        # Nothing was advertised for the good ones either, and their ids are free to use.
        assert e0.stats().early_advertises == 1  # "live" only
        handles = e1.receive_many([TransferRequest(f"g{i}", good[i], 0) for i in range(3)])
        assert not any(h.done for h in handles)
        for rid in ["live"] + [f"g{i}" for i in range(3)]:
            e1.cancel(rid)
        assert live.done
        await until(lambda: all(not p1.pinned_by(r) for r in ["live", "g0", "g1", "g2"]))


async def test_a_batch_that_runs_out_of_data_tags_reserves_none() -> None:
    t0, t1 = loopback_group(2)
    t1.max_tag = 4  # room for two layer-wise receives of two layers, not three
    p1 = make_pool()
    async with running(TransferEngine(p1, t1, config=fast_config(transfer_timeout_s=0.2))) \
            as (e1,):
        blocks = [p1.alloc(1, owner=f"t{i}") for i in range(3)]
        batch = [TransferRequest(f"t{i}", blocks[i], 0, layerwise=True) for i in range(3)]
        with pytest.raises(DataTagsExhaustedError):
            e1.receive_many(batch)
        assert e1.stats().sessions == 0 and p1.num_pinned == 0
        assert not t0.recv_control()  # nothing advertised
        handles = e1.receive_many(batch[:2])  # every tag came back
        assert len(handles) == 2
        for i in range(2):
            e1.cancel(f"t{i}")
        await until(lambda: p1.num_pinned == 0)


async def test_a_batch_to_one_peer_leaves_as_frames_that_fit_in_order() -> None:
    """200 advertises with long request ids (each ~400 bytes) to one peer: several frames,
    each within ``MAX_CONTROL_BYTES``, holding every advertise once, in the batch's order."""
    t0, t1 = loopback_group(2)
    p1 = make_pool(num_blocks=256)
    async with running(TransferEngine(p1, t1, config=fast_config(transfer_timeout_s=0.2))) \
            as (e1,):
        rids = [f"{i:04d}-" + "r" * 200 for i in range(200)]
        blocks = p1.alloc(200, owner="all")
        e1.receive_many([TransferRequest(rid, (block,), 0) for rid, block in
                         zip(rids, blocks, strict=True)])
        payloads = [payload for _, payload in t0.recv_control()]
        assert 1 < len(payloads) < 200  # batched, and more than one frame was needed
        assert e1.stats().control_frames == len(payloads)
        assert all(len(payload) <= MAX_CONTROL_BYTES for payload in payloads)
        got = []
        for payload in payloads:
            messages, errors = wire.decode_frame(payload)
            assert not errors, errors
            got += [m.request_id for m in messages if isinstance(m, wire.Advertise)]
        assert got == rids
        for rid in rids:
            e1.cancel(rid)
        await until(lambda: p1.num_pinned == 0)
        p1.free(blocks, owner="all")


async def test_a_malformed_message_inside_a_frame_ends_it_and_touches_nothing() -> None:
    """A frame of [valid CANCEL for an unknown id, junk, valid DONE]: the first is handled
    (rejected: unknown), the junk rejected, and the DONE after it never read; a real
    transfer next to it is untouched and completes."""
    async with engine_pair() as pair:
        e0, e1, p0, p1, t1 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t1
        src, dst = p0.alloc(1, owner="r"), p1.alloc(1, owner="r")
        expected = fill(p0, src, seed=3)
        hr = e1.receive("r", dst, 0)
        await until(lambda: e0.stats().early_advertises == 1)
        before = e0.stats().control_rejected
        frame = (wire.encode(wire.Cancel("nobody")) + b"KVHC\x04\x63junk"
                 + wire.encode(wire.Done("r")))
        t1.send_control(0, frame)
        await until(lambda: e0.stats().control_rejected == before + 2)
        assert e0.stats().early_advertises == 1  # rank 1's advertise of "r" still waits
        hs = e0.send("r", src, 1)
        await hs.wait()
        await hr.wait()
        assert same_kv(kv_of(p1, dst), expected)
        assert e0.session("r").state is State.COMPLETE
        await free_once_released(p0, p1, "r", src, dst)


async def test_a_batched_send_failed_at_admission_still_takes_its_early_advertise() -> None:
    """The TP group failed "x" before the host's ``send_many``: the receiver's advertise
    parked on rank 0 is taken (as ``send()`` takes it), so no stale advertise answers a
    later send of the id."""
    _, pools, engines = tp_world(agreement_timeout_s=0.5, queue_timeout_s=5.0,
                                 transfer_timeout_s=0.3)
    async with running(*engines) as es:
        es[2].receive("x", pools[2].alloc(1, owner="x"), 0)
        await until(lambda: es[0].stats().early_advertises == 1)
        es[1].send("x", pools[1].alloc(1, owner="x"), 3)
        es[1].cancel("x")  # the prefill group fails "x"
        await until(lambda: es[0]._agreement.known("x"))
        (handle,) = es[0].send_many([TransferRequest("x", pools[0].alloc(1, owner="x"), 2)])
        assert handle.done  # failed at admission
        assert es[0].stats().early_advertises == 0


async def test_request_ids_the_wire_cannot_carry_are_refused_before_anything_changes() -> None:
    async with engine_pair() as pair:
        e0, e1, p1 = pair.e0, pair.e1, pair.p1
        blocks = p1.alloc(3, owner="x")
        for bad in ("r" * (wire.MAX_REQUEST_ID_BYTES + 1), "\ud800", ""):
            batch = [TransferRequest("a", blocks[:1], 0), TransferRequest(bad, blocks[1:2], 0)]
            with pytest.raises(EngineConfigError):
                e1.receive_many(batch)
            with pytest.raises(EngineConfigError):
                e1.receive(bad, blocks[2:], 0)
            with pytest.raises(EngineConfigError):
                e0.send(bad, (0,), 1)
            assert e1.stats().sessions == 0 and p1.num_pinned == 0
        await ticks(e0, e1)
        assert e0.stats().early_advertises == 0  # nothing was advertised
        p1.free(blocks, owner="x")


async def test_an_unforeseen_error_mid_batch_leaks_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An error after every check passed (here injected into the second admission to the
    session table): the requests not admitted give back their pins and tags, the one
    admitted is cancelled and released with its own, and every tag is free again."""
    t0, t1 = loopback_group(2)
    t1.max_tag = 3  # exactly the batch's tags: a leaked one would make the retry fail
    p1 = make_pool()
    engine = TransferEngine(p1, t1, config=fast_config(transfer_timeout_s=0.2))
    async with running(engine):
        blocks = [p1.alloc(1, owner=f"o{i}") for i in range(3)]
        batch = [TransferRequest(f"r{i}", blocks[i], 0) for i in range(3)]
        admit = engine._table.admit
        calls = []

        def failing_second(*args: object, **kwargs: object) -> object:
            calls.append(args[0])
            if len(calls) == 2:
                raise MemoryError("injected")
            return admit(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(engine._table, "admit", failing_second)
        with pytest.raises(MemoryError):
            engine.receive_many(batch)
        monkeypatch.setattr(engine._table, "admit", admit)
        await until(lambda: p1.num_pinned == 0 and engine.stats().sessions == 0)
        assert engine.session("r0").state is State.CANCELLED
        sent = [m for _, payload in t0.recv_control() for m in wire.decode_frame(payload)[0]]
        assert [type(m) for m in sent] == [wire.Cancel]  # nothing advertised; r0 cancelled
        handles = engine.receive_many(batch)  # all three tags are free again
        assert len(handles) == 3
        for i in range(3):
            engine.cancel(f"r{i}")
        await until(lambda: p1.num_pinned == 0)


@pytest.mark.parametrize("batched", [False, True], ids=["receive", "receive_many"])
async def test_an_error_after_the_table_took_a_request_undoes_its_entry(
        monkeypatch: pytest.MonkeyPatch, batched: bool) -> None:
    """An error inside admission after the session table took the request (injected into
    the lease book): the request is not admitted at all (no session, no pin, no tag), the
    ones admitted before it in a batch are cancelled, and its id can be used again."""
    _, t1 = loopback_group(2)
    t1.max_tag = 3  # a leaked tag would make the retry fail
    p1 = make_pool()
    engine = TransferEngine(p1, t1, config=fast_config(transfer_timeout_s=0.2))
    async with running(engine):
        blocks = [p1.alloc(1, owner=f"o{i}") for i in range(3)]
        opened = engine._leases.opened
        failing_rid = "r1"

        def failing(peer: int, request_id: str) -> None:
            if request_id == failing_rid:
                raise MemoryError("injected after the table took it")
            opened(peer, request_id)

        monkeypatch.setattr(engine._leases, "opened", failing)
        with pytest.raises(MemoryError):
            if batched:
                engine.receive_many([TransferRequest(f"r{i}", blocks[i], 0) for i in range(3)])
            else:
                engine.receive("r1", blocks[1], 0)
        monkeypatch.setattr(engine._leases, "opened", opened)
        assert "r1" not in engine._table and not p1.pinned_by("r1")
        await until(lambda: p1.num_pinned == 0 and engine.stats().sessions == 0)
        if batched:
            assert engine.session("r0").state is State.CANCELLED  # admitted before it
        handles = engine.receive_many([TransferRequest(f"r{i}", blocks[i], 0)
                                       for i in range(3)])  # every id and tag is free again
        assert not any(h.done for h in handles)
        for i in range(3):
            engine.cancel(f"r{i}")
        await until(lambda: p1.num_pinned == 0)


async def test_a_send_whose_start_fails_fails_alone_and_its_batch_gets_every_handle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting one send of a batch from its early advertise raises (injected into the
    plan, as an out-of-memory staging allocation would): that transfer fails on both sides
    (transport_error here, told to the receiver), the others move, and the host gets every
    handle."""
    async with engine_pair(fast_config(transfer_timeout_s=2.0)) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        dst = [p1.alloc(1, owner=f"s{i}") for i in range(3)]
        src = [p0.alloc(1, owner=f"s{i}") for i in range(3)]
        expected = [fill(p0, block, seed=i) for i, block in enumerate(src)]
        receives = e1.receive_many([TransferRequest(f"s{i}", dst[i], 0) for i in range(3)])
        await until(lambda: e0.stats().early_advertises == 3)
        plan = e0._datapath._plan

        def out_of_memory(transfer: object) -> None:
            if transfer.request_id == "s1":  # type: ignore[attr-defined]
                raise RuntimeError("out of memory (injected)")
            plan(transfer)  # type: ignore[arg-type]

        monkeypatch.setattr(e0._datapath, "_plan", out_of_memory)
        sends = e0.send_many([TransferRequest(f"s{i}", src[i], 1) for i in range(3)])
        monkeypatch.setattr(e0._datapath, "_plan", plan)
        assert len(sends) == 3 and e0.stats().early_advertises == 0
        for i in (0, 2):
            await sends[i].wait()
            await receives[i].wait()
            assert same_kv(kv_of(p1, dst[i]), expected[i])
        with pytest.raises(TransferFailed) as sent:
            await sends[1].wait()
        assert sent.value.reason == "transport_error"
        with pytest.raises(TransferFailed):
            await receives[1].wait()
        await until(lambda: p0.num_pinned == 0 and p1.num_pinned == 0)
        for i in range(3):
            p0.free(src[i], owner=f"s{i}")
            p1.free(dst[i], owner=f"s{i}")
