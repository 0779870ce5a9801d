"""Issue 12 phase 2 in the engine: token counts and per-transfer metadata through the
handshake, and layout mismatches that name their fields on both sides.

* ``num_tokens``: the receiver's count travels in its ADVERTISE, a different count on the
  sender is ``size_mismatch`` on both ranks, and both results report the count;
* ``metadata``: the sender's opaque bytes travel in ACCEPT and come out of the receiver's
  ``TransferResult`` exactly (never unpickled); the receiver completes only once both its
  bytes and the ACCEPT are in, whichever comes first;
* a layout mismatch says which field differs, with both values, in both ranks' errors.
"""

from __future__ import annotations

import pickle

import anyio
import pytest
import torch
from engine_support import (
    engine_pair,
    fast_config,
    fill,
    free_once_released,
    kv_of,
    running,
    same_kv,
    ticks,
    token_slots,
    until,
)
from kvhandoff.engine import (
    BlockPool,
    EngineConfigError,
    KVLayout,
    TransferEngine,
    TransferFailed,
)
from kvhandoff.engine import _wire as wire
from kvhandoff.engine.transports import loopback_group
from kvhandoff.sessions import Role, State

pytestmark = pytest.mark.anyio

BT = 4  # engine_support's pools: 4 tokens per block


async def test_num_tokens_round_trip_reports_the_count_on_both_sides() -> None:
    async with engine_pair() as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(3, owner="t"), p1.alloc(3, owner="t")
        fill(p0, src, seed=1)
        fill(p1, dst, seed=4)
        _, untouched = token_slots(p1, dst, 10)
        hs = e0.send("t", src, 1, num_tokens=10)  # 3 blocks of 4: the last holds 2
        hr = e1.receive("t", dst, 0, num_tokens=10)
        sent, got = await hs.wait(), await hr.wait()
        assert sent.num_tokens == got.num_tokens == 10
        assert (sent.role, got.role) == (Role.SENDER, Role.RECEIVER)
        # Only the 10 tokens moved: the receiver's last 2 slots kept their bytes.
        kept, past = token_slots(p1, dst, 10)
        assert same_kv(kept, token_slots(p0, src, 10)[0])
        assert same_kv(past, untouched)
        token_bytes = 2 * 8 * 4  # kv_heads x head_dim float32, per layer tensor
        assert sent.nbytes == got.nbytes == 10 * token_bytes * len(p0.layers)
        # Left out, the count is every slot of every block.
        src2, dst2 = p0.alloc(2, owner="u"), p1.alloc(2, owner="u")
        hs, hr = e0.send("u", src2, 1), e1.receive("u", dst2, 0)
        assert (await hs.wait()).num_tokens == (await hr.wait()).num_tokens == 2 * BT
        p0.free(src, owner="t")
        p1.free(dst, owner="t")
        p0.free(src2, owner="u")
        p1.free(dst2, owner="u")


async def test_num_tokens_mismatch_is_size_mismatch_on_both_sides() -> None:
    async with engine_pair() as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(3, owner="m"), p1.alloc(3, owner="m")
        fill(p0, src, seed=2)
        before = fill(p1, dst, seed=3)
        hs = e0.send("m", src, 1, num_tokens=9)
        hr = e1.receive("m", dst, 0, num_tokens=11)
        errors = []
        for handle in (hs, hr):
            with pytest.raises(TransferFailed) as info:
                await handle.wait()
            errors.append(info.value)
        assert [e.reason for e in errors] == ["size_mismatch", "size_mismatch"]
        for error in errors:  # both name the count and both values
            assert "num tokens: receiver 11, sender 9" in str(error.detail)
        assert same_kv(kv_of(p1, dst), before)  # nothing was written
        await free_once_released(p0, p1, "m", src, dst)


async def test_bad_num_tokens_and_metadata_raise_before_anything_changes() -> None:
    async with engine_pair() as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src = p0.alloc(3, owner="b")
        bad_tokens: list[object] = [8, 13, 0, -1, True, 9.0, "9"]  # 3 blocks hold 9..12
        for tokens in bad_tokens:
            with pytest.raises(EngineConfigError) as info:
                e0.send("b", src, 1, num_tokens=tokens)  # type: ignore[arg-type]
            assert info.value.name == "num_tokens"
            with pytest.raises(EngineConfigError):
                e1.receive("b", p1.alloc(3, owner=f"r{tokens!r}"), 0,
                           num_tokens=tokens)  # type: ignore[arg-type]
        from kvhandoff.engine import MAX_METADATA_BYTES

        assert MAX_METADATA_BYTES == wire.MAX_METADATA_BYTES == 3072  # the public bound
        bad_metadata: list[object] = ["text", b"m" * (MAX_METADATA_BYTES + 1), 7, None]
        for metadata in bad_metadata:
            with pytest.raises(EngineConfigError) as info:
                e0.send("b", src, 1, metadata=metadata)  # type: ignore[arg-type]
            assert info.value.name == "metadata"
        assert not p0.pinned_by("b")
        assert e0.stats().sessions == e1.stats().sessions == 0
        p0.free(src, owner="b")


async def test_metadata_reaches_the_receivers_result_as_opaque_bytes() -> None:
    """Arbitrary bytes, a pickle among them, come out exactly as sent: never unpickled."""

    class Boom:
        def __reduce__(self) -> tuple[object, ...]:
            return (pytest.fail, ("the receiver unpickled the metadata",))

    payloads = [b"", b"\x00\xffrequest=42;prompt_hash=ab12", pickle.dumps(Boom()),
                bytearray(b"a bytearray"), b"m" * wire.MAX_METADATA_BYTES]
    async with engine_pair() as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        for index, metadata in enumerate(payloads):
            rid = f"md{index}"
            src, dst = p0.alloc(2, owner=rid), p1.alloc(2, owner=rid)
            expected = fill(p0, src, seed=index)
            hs = e0.send(rid, src, 1, metadata=metadata, layerwise=index % 2 == 1)
            if hs.layerwise:
                for layer in range(p0.num_layers):
                    hs.layer_ready(layer)
            hr = e1.receive(rid, dst, 0, layerwise=hs.layerwise)
            sent, got = await hs.wait(), await hr.wait()
            assert type(got.metadata) is bytes and got.metadata == bytes(metadata)
            assert sent.metadata == bytes(metadata)
            assert same_kv(kv_of(p1, dst), expected)
            p0.free(src, owner=rid)
            p1.free(dst, owner=rid)


async def test_receiver_completes_only_once_bytes_and_accept_are_both_in() -> None:
    """A hand-driven sender over the raw loopback transport sends every byte first and the
    ACCEPT last: the receive stays open until the ACCEPT arrives, then completes with its
    metadata."""
    t0, t1 = loopback_group(2)
    pool = BlockPool(8, 2, BT, 2, 8, dtype=torch.float32, debug=True)
    async with running(TransferEngine(pool, t1, config=fast_config())) as (engine,):
        dst = pool.alloc(2, owner="late")
        handle = engine.receive("late", dst, 0, num_tokens=7)
        advertise: wire.Advertise | None = None
        with anyio.fail_after(5):
            while advertise is None:
                for _, payload in t0.recv_control():
                    messages, errors = wire.decode_frame(payload)  # one frame per tick
                    assert not errors, errors
                    for message in messages:
                        if isinstance(message, wire.Advertise):
                            advertise = message
                await anyio.sleep(0)
        assert advertise.num_tokens == 7
        assert KVLayout.decode(advertise.layout) == pool.layout
        data = torch.arange(advertise.total_bytes, dtype=torch.int64).to(torch.uint8)
        op = t0.post_send(data, 1, advertise.data_tag)
        await until(lambda: op.final and engine.session("late").local_final)
        await ticks(engine, n=10)
        assert not handle.done  # every byte landed, the ACCEPT has not come
        t0.send_control(1, wire.encode(wire.Accept("late", advertise.data_tag, metadata=b"meta")))
        result = await handle.wait()
        assert result.metadata == b"meta" and result.num_tokens == 7
        assert engine.session("late").state is State.COMPLETE
        pool.free(dst, owner="late")


def _layout(**overrides: object) -> KVLayout:
    fields: dict[str, object] = dict(num_layers=2, block_tokens=BT, kv_heads=2, head_dim=8,
                                     dtype=torch.float32)
    fields.update(overrides)
    return KVLayout(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sender", "receiver", "named"),
    [
        (_layout(), _layout(kv_heads=4, head_dim=4), ["kv_heads receiver 4, sender 2",
                                                      "head_dim receiver 4, sender 8"]),
        (_layout(), _layout(dtype=torch.bfloat16, head_dim=16),
         ["dtype receiver 'bfloat16', sender 'float32'"]),
        (_layout(order="HND"), _layout(), ["order receiver 'NHD', sender 'HND'"]),
        (_layout(tp_size=2, tp_rank=0), _layout(tp_size=2, tp_rank=1),
         ["tp_rank receiver 1, sender 0"]),
        (_layout(extra=("llama", "rev=a")), _layout(extra=("llama", "rev=b")),
         ["extra receiver ('llama', 'rev=b'), sender ('llama', 'rev=a')"]),
    ],
    ids=["heads", "dtype", "order", "tp-shard", "extra"],
)
async def test_layout_mismatch_names_each_field_with_both_values_on_both_sides(
        sender: KVLayout, receiver: KVLayout, named: list[str]) -> None:
    t0, t1 = loopback_group(2)
    p0 = BlockPool.from_layout(sender, 8, debug=True)
    p1 = BlockPool.from_layout(receiver, 8, debug=True)
    async with running(TransferEngine(p0, t0, config=fast_config()),
                       TransferEngine(p1, t1, config=fast_config())) as (e0, e1):
        # Blocks of one byte size (heads x dim kept equal) where possible, so only the
        # named fields differ, not merely the byte count.
        src, dst = p0.alloc(1, owner="l"), p1.alloc(1, owner="l")
        hs, hr = e0.send("l", src, 1), e1.receive("l", dst, 0)
        for handle in (hs, hr):
            with pytest.raises(TransferFailed) as info:
                await handle.wait()
            assert info.value.reason == "layout_mismatch"
            for text in named:
                assert text in str(info.value.detail), info.value.detail
        await free_once_released(p0, p1, "l", src, dst)


async def test_engine_fingerprint_comes_from_the_pool_layout() -> None:
    """A default pool keeps the fingerprint engines always had; a TP-sharded layout's
    fingerprint already has its shard, so passing it again as layout_extra is refused."""
    t0, _ = loopback_group(2)
    plain = BlockPool(8, 2, BT, 2, 8, dtype=torch.float32)
    engine = TransferEngine(plain, t0, layout_extra=(0, 2))
    assert engine.layout_fingerprint == wire.layout_fingerprint(
        2, plain.block_shape, torch.float32, extra=(0, 2))
    sharded = BlockPool.from_layout(_layout(tp_rank=1, tp_size=2), 8)
    assert TransferEngine(sharded, t0).layout_fingerprint == \
        TransferEngine(plain, t0, layout_extra=(1, 2)).layout_fingerprint
    with pytest.raises(EngineConfigError) as info:
        TransferEngine(sharded, t0, layout_extra=(1, 2))
    assert info.value.name == "layout_extra"


async def test_metadata_and_checksum_travel_together_in_accept() -> None:
    """The ACCEPT carries the metadata and, when the receiver asked, the checksum: the two
    fields are independent, and both arrive."""
    async with engine_pair(fast_config(checksum=True)) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        src, dst = p0.alloc(3, owner="c"), p1.alloc(3, owner="c")
        fill(p0, src, seed=9)
        _, untouched = token_slots(p1, dst, 11)
        hs = e0.send("c", src, 1, num_tokens=11, metadata=b"with a checksum")
        hr = e1.receive("c", dst, 0, num_tokens=11)
        got = await hr.wait()
        await hs.wait()
        assert got.metadata == b"with a checksum" and got.num_tokens == 11
        kept, past = token_slots(p1, dst, 11)
        assert same_kv(kept, token_slots(p0, src, 11)[0])
        assert same_kv(past, untouched)
        p0.free(src, owner="c")
        p1.free(dst, owner="c")
