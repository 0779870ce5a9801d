"""Bad input and failures inside the public calls: each gets a typed error (raised before
anything changes, or from the handle's ``wait()``), never a bare assertion, and leaves no
block pinned and no session behind. Also: a host exception inside ``async with engine``
reaches the caller as itself, and logging configured after the engine exists is honoured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_support import fast_config, fill, free_once_released, make_pool, running, until
from kvhandoff.collectives import configure_logging
from kvhandoff.engine import (
    DataTagsExhaustedError,
    EngineConfigError,
    TransferEngine,
    TransferError,
    TransferFailed,
    TransferTimeout,
)
from kvhandoff.engine.transports import loopback_group
from kvhandoff.sessions import FailureReason, UnknownSessionError

pytestmark = pytest.mark.anyio


async def test_engine_host_exception_comes_out_as_itself() -> None:
    t0, _ = loopback_group(2)
    raised = TransferTimeout("r", FailureReason.QUEUE_TIMEOUT, "raised by the host")
    with pytest.raises(TransferTimeout) as info:
        async with TransferEngine(make_pool(), t0, config=fast_config()):
            raise raised
    assert info.value is raised  # not an ExceptionGroup around it


async def test_engine_send_that_fails_inside_the_call_returns_a_failing_handle() -> None:
    t0, t1 = loopback_group(2)
    p0, p1 = make_pool(), make_pool()
    async with running(TransferEngine(p0, t0, config=fast_config()),
                       TransferEngine(p1, t1, config=fast_config())) as (e0, e1):
        src, dst = p0.alloc(2, owner="r"), p1.alloc(3, owner="r")
        hr = e1.receive("r", dst, 0)  # advertises 3 blocks
        await until(lambda: e0.stats().early_advertises == 1)
        hs = e0.send("r", src, 1)  # 2 blocks: fails and is released inside the call
        for handle in (hs, hr):
            with pytest.raises(TransferFailed) as info:
                await handle.wait()
            assert info.value.reason is FailureReason.SIZE_MISMATCH
        assert not p0.pinned_by("r")
        await until(lambda: not p1.pinned_by("r"))
        p0.free(src, owner="r")
        p1.free(dst, owner="r")
    p0.check()
    p1.check()


async def test_engine_receive_on_closed_transport_returns_a_failing_handle() -> None:
    t0, t1 = loopback_group(2)
    p1 = make_pool()
    async with running(TransferEngine(p1, t1, config=fast_config())) as (e1,):
        t1.close()
        dst = p1.alloc(2, owner="r")
        handle = e1.receive("r", dst, 0)
        with pytest.raises(TransferFailed) as info:
            await handle.wait()
        assert info.value.reason is FailureReason.TRANSPORT_ERROR
        await until(lambda: not p1.pinned_by("r"))
        p1.free(dst, owner="r")
    t0.close()
    p1.check()


async def test_engine_out_of_data_tags_raises_before_anything_changes() -> None:
    t0, t1 = loopback_group(2)
    t1.max_tag = 3  # room for one layer-wise receive of 2 layers, not two
    p1 = make_pool()
    async with running(TransferEngine(p1, t1, config=fast_config(queue_timeout_s=0.2))) \
            as (e1,):
        first, second = p1.alloc(1, owner="a"), p1.alloc(1, owner="b")
        held = e1.receive("a", first, 0, layerwise=True)
        with pytest.raises(DataTagsExhaustedError) as info:
            e1.receive("b", second, 0, layerwise=True)
        assert (info.value.needed, info.value.max_tag) == (2, 3)
        assert not p1.pinned_by("b")
        with pytest.raises(UnknownSessionError):
            e1.session("b")
        # A whole-request receive needs one tag: tag 3 is free.
        whole = e1.receive("b", second, 0)
        for handle in (held, whole):  # nobody sends: both time out
            with pytest.raises(TransferTimeout):
                await handle.wait()
        await until(lambda: not p1.pinned_by("a") and not p1.pinned_by("b"))
        p1.free(first, owner="a")
        p1.free(second, owner="b")
    t0.close()
    p1.check()


@pytest.mark.parametrize("form", ["numpy_ints", "numpy_array", "tensor"])
async def test_engine_accepts_numpy_and_tensor_block_ids(form: str) -> None:
    def as_form(ids: list[int]) -> object:
        if form == "numpy_ints":
            return [np.int64(b) for b in ids]
        if form == "numpy_array":
            return np.array(ids, dtype=np.int32)
        return torch.tensor(ids, dtype=torch.int64)

    t0, t1 = loopback_group(2)
    p0, p1 = make_pool(), make_pool()
    async with running(TransferEngine(p0, t0, config=fast_config()),
                       TransferEngine(p1, t1, config=fast_config())) as (e0, e1):
        src, dst = p0.alloc(3, owner="r"), p1.alloc(3, owner="r")
        expected = fill(p0, src, seed=5)
        hs, hr = e0.send("r", as_form(src), 1), e1.receive("r", as_form(dst), 0)  # type: ignore[arg-type]
        await hs.wait()
        await hr.wait()
        assert e1.session("r").block_ids == tuple(dst)
        assert all(torch.equal(layer[dst], want) for layer, want in zip(p1.layers, expected,
                                                                      strict=True))
        await free_once_released(p0, p1, "r", src, dst)
    p0.check()
    p1.check()


@pytest.mark.parametrize("bad", [[True], [1.5], [-1], [1, 1], torch.zeros(2, 2).long(),
                                 torch.tensor([1.0]), "01"])
async def test_engine_bad_block_ids_raise_before_anything_is_pinned(bad: object) -> None:
    t0, _ = loopback_group(2)
    pool = make_pool()
    async with running(TransferEngine(pool, t0, config=fast_config())) as (engine,):
        pool.alloc(4, owner="r")
        with pytest.raises(EngineConfigError) as info:
            engine.send("r", bad, 1)  # type: ignore[arg-type]
        assert info.value.name == "block_ids"
        assert pool.num_pinned == 0
        with pytest.raises(UnknownSessionError):
            engine.session("r")
        assert engine.stats().sessions == 0


def test_transfer_error_reason_is_the_enum_and_prints_its_value() -> None:
    error = TransferFailed("r", "peer_lost", "rank 3 silent")
    assert error.reason is FailureReason.PEER_LOST
    assert error.reason == "peer_lost" and str(error.reason) == "peer_lost"
    assert str(error) == "transfer 'r' failed: peer_lost (rank 3 silent)"
    assert isinstance(error, TransferError)
    with pytest.raises(ValueError):
        TransferFailed("r", "no_such_reason")


async def test_engine_logs_when_logging_is_configured_after_it_exists(tmp_path: Path) -> None:
    t0, t1 = loopback_group(2)
    p0, p1 = make_pool(), make_pool()
    engines = (TransferEngine(p0, t0, config=fast_config()),
               TransferEngine(p1, t1, config=fast_config()))
    configure_logging(tmp_path)
    try:
        async with running(*engines) as (e0, e1):
            src, dst = p0.alloc(1, owner="r"), p1.alloc(1, owner="r")
            hs, hr = e0.send("r", src, 1), e1.receive("r", dst, 0)
            await hs.wait()
            await hr.wait()
            p0.free(src, owner="r")
            p1.free(dst, owner="r")
    finally:
        configure_logging(None)
    lines = [json.loads(line) for line in (tmp_path / "rank-0.jsonl").read_text().splitlines()]
    states = [line["to_state"] for line in lines if line["event"] == "session.transition"]
    assert states[-1] == "COMPLETE"
