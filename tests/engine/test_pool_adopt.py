"""BlockPool over the host's own KV memory (``from_tensors``): every supported layout adopted
as views without a copy, the typed refusals, transfers between adopted pools; and the
host-owned mode, where the host's allocator owns alloc/free and the engine reports through
``finished()`` which requests' blocks are safe to reuse, never while a transport may touch
them (held and faulty transports, a host-side poison guard)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_support import HeldTransport, fast_config, running, ticks, until
from kvhandoff.engine import (
    AdoptError,
    BlockPool,
    KVLayout,
    LayoutMismatchError,
    PinError,
    PoisonError,
    PoolConfigError,
    PoolModeError,
    TransferCancelled,
    TransferEngine,
    TransferFailed,
    TransferTimeout,
)
from kvhandoff.engine.transports import Fault, FaultyTransport, loopback_group

NB, BT, H, D, L = 6, 4, 2, 8, 3  # blocks, block tokens, KV heads, head dim, layers


def host_tensors(kind: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 num_blocks: int = NB) -> list[torch.Tensor]:
    """The host's KV memory in one of the supported forms, filled with a known pattern."""
    gen = torch.Generator().manual_seed(seed)
    block = {"NHD": (BT, H, D), "HND": (H, BT, D)}[kind.split("-")[1]]
    if kind.startswith("flat"):
        shapes = [(num_blocks, *block)] * (2 * L)
    else:  # vLLM: one [2, num_blocks, *block] per layer
        shapes = [(2, num_blocks, *block)] * L
    return [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]


KINDS = ["flat-NHD", "flat-HND", "vllm-NHD", "vllm-HND"]


@pytest.mark.parametrize("kind", KINDS)
def test_adopt_layers_are_views_of_the_host_tensors(kind: str) -> None:
    tensors = host_tensors(kind)
    order = kind.split("-")[1]
    pool = BlockPool.from_tensors(tensors, order=order)
    expected = tensors if kind.startswith("flat") else [t[i] for t in tensors for i in (0, 1)]
    assert len(pool.layers) == 2 * L
    for layer, view in zip(pool.layers, expected, strict=True):
        assert layer.data_ptr() == view.data_ptr() and layer.is_contiguous()
        assert layer.shape == (NB, *pool.block_shape)
    assert pool.layout == KVLayout(L, BT, H, D, torch.bfloat16, order)
    assert pool.dtype == torch.bfloat16  # taken from the tensors, not the float16 default
    assert pool.num_blocks == NB and pool.block_nbytes == 2 * L * BT * H * D * 2
    # No copy: a write through the pool is the host's, and the other way round.
    pool.value(1)[3] = 7.0
    host_v1 = tensors[3] if kind.startswith("flat") else tensors[1][1]
    assert bool((host_v1[3] == 7.0).all())
    host_v1[2] = -1.0
    assert bool((pool.value(1)[2] == -1.0).all())
    pool.check()


def test_adopt_checks_tensors_against_a_given_layout() -> None:
    tensors = host_tensors("vllm-HND")
    layout = KVLayout(L, BT, H, D, torch.bfloat16, "HND", tp_rank=1, tp_size=2)
    pool = BlockPool.from_tensors(tensors, layout=layout)
    assert pool.layout is layout
    wrong = KVLayout(L + 1, BT, H * 2, D, torch.float16, "HND")
    with pytest.raises(LayoutMismatchError) as info:
        BlockPool.from_tensors(tensors, layout=wrong)
    assert info.value.differences == (("num_layers", L + 1, L), ("kv_heads", 4, 2),
                                      ("dtype", "float16", "bfloat16"))
    assert info.value.here == "layout" and info.value.there == "tensors"
    # The same tensors read as NHD have another geometry: named too.
    with pytest.raises(LayoutMismatchError) as info:
        BlockPool.from_tensors(tensors, layout=KVLayout(L, BT, H, D, torch.bfloat16, "NHD"))
    assert info.value.fields == ("block_tokens", "kv_heads")


def _refusal(tensors: Any, **kw: Any) -> AdoptError:
    with pytest.raises(AdoptError) as info:
        BlockPool.from_tensors(tensors, **kw)
    return info.value


def test_adopt_refuses_bad_tensors_with_typed_errors() -> None:
    good = host_tensors("flat-NHD")
    assert _refusal(good[0]).field == "type"  # one tensor, not a list
    assert _refusal([]).field == "count"
    assert _refusal(good[:3]).field == "count"  # K without V
    err = _refusal([*good[:2], "x"])
    assert (err.index, err.field) == (2, "type")
    err = _refusal([good[0], good[1].float()])
    assert (err.index, err.field, err.got) == (1, "dtype", torch.float32)
    err = _refusal([good[0], torch.empty(good[1].shape, dtype=good[1].dtype, device="meta")])
    assert (err.index, err.field) == (1, "device")
    err = _refusal([good[0], good[1][:, :2].contiguous()])
    assert (err.index, err.field) == (1, "shape")
    strided = torch.zeros(NB, H, BT, D, dtype=torch.bfloat16).transpose(1, 2)
    err = _refusal([good[0], strided])
    assert (err.index, err.field) == (1, "contiguous")
    err = _refusal([good[0], good[1].clone().requires_grad_()])
    assert (err.index, err.field) == (1, "requires_grad")
    err = _refusal([good[0], good[0]])  # K and V over the same memory
    assert err.field == "overlap"
    whole = torch.zeros(2 * NB, BT, H, D, dtype=torch.bfloat16)
    assert _refusal([whole[:NB], whole[NB - 1:2 * NB - 1]]).field == "overlap"
    BlockPool.from_tensors([whole[:NB], whole[NB:]])  # adjacent, not overlapping: fine
    assert _refusal([torch.zeros(NB, D)]).field == "shape"
    assert _refusal([torch.zeros(0, BT, H, D), torch.zeros(0, BT, H, D)]).field == "shape"
    with pytest.raises(PoolConfigError):
        BlockPool.from_tensors(good, order="DHN")  # type: ignore[arg-type]


def test_adopt_refuses_k_v_interleaved_per_block_naming_why() -> None:
    # [num_blocks, 2, block_tokens, heads, dim]: K of a block is contiguous, but the K layer
    # view strides over the V blocks, and the block copy needs contiguous layer tensors.
    interleaved = [torch.zeros(NB, 2, BT, H, D) for _ in range(L)]
    err = _refusal(interleaved)
    assert err.field == "interleaved" and "contiguous" in str(err)


def test_adopt_debug_pool_owned_poisons_and_catches_late_writes() -> None:
    tensors = host_tensors("vllm-NHD", dtype=torch.float16)
    pool = BlockPool.from_tensors(tensors, debug=True)
    assert bool(torch.isnan(tensors[0]).all())  # the pool owns the contents now
    ids = pool.alloc(2, owner="r")
    pool.free(ids, owner="r")
    tensors[2][1, ids[0]] = 0.0  # the host writes a freed block behind the pool's back
    with pytest.raises(PoisonError):
        pool.assert_poisoned()


# --- transfers between adopted pools -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("order", ["NHD", "HND"])
async def test_adopt_vllm_pool_sends_to_flat_pool(order: str) -> None:
    """A vLLM-layout sender and a kvhandoff-layout receiver of the same layout: the blocks
    land in the receiver host's own tensors."""
    src_t = host_tensors(f"vllm-{order}", dtype=torch.float32, seed=1)
    dst_t = [torch.zeros_like(t) for t in host_tensors(f"flat-{order}", dtype=torch.float32)]
    p0 = BlockPool.from_tensors(src_t, order=order)
    p1 = BlockPool.from_tensors(dst_t, order=order)
    assert p0.layout == p1.layout
    t0, t1 = loopback_group(2)
    e0 = TransferEngine(p0, t0, config=fast_config())
    e1 = TransferEngine(p1, t1, config=fast_config())
    async with running(e0, e1):
        src, dst = p0.alloc(2, owner="r"), p1.alloc(2, owner="r")
        h0, h1 = e0.send("r", src, 1), e1.receive("r", dst, 0)
        await h0.wait()
        await h1.wait()
    for layer in range(L):
        for kv in (0, 1):
            assert torch.equal(dst_t[2 * layer + kv][dst], src_t[layer][kv][src])


# --- host-owned allocation ------------------------------------------------------------------


def test_host_owned_pool_has_no_allocator_and_reports_unpinned_owners() -> None:
    pool = BlockPool.from_tensors(host_tensors("vllm-NHD"), host_owned=True)
    assert pool.host_owned
    for call in (lambda: pool.alloc(1), lambda: pool.free([0]), lambda: pool.num_free,
                 lambda: pool.num_allocated, lambda: pool.is_free(0),
                 lambda: pool.holder(0)):
        with pytest.raises(PoolModeError) as info:
            call()
        assert info.value.host_owned
    pool.pin([0, 1], owner="a")
    pool.pin([1, 2], owner="b")  # a shared block (prefix caching): pinned by both
    with pytest.raises(PinError):
        pool.pin([2], owner="b")
    pool.check()
    assert pool.finished() == []
    pool.unpin([0], owner="a")
    assert pool.finished() == []  # "a" still pins block 1
    pool.unpin([1], owner="a")
    assert pool.pins(1) == frozenset({"b"}) and pool.num_deferred == 0
    assert pool.finished() == ["a"]
    assert pool.finished() == []  # each report once
    pool.unpin_all("b")
    pool.pin([5], owner="a")  # the id again: reported again when its pins drop
    pool.unpin([5], owner="a")
    assert pool.finished() == ["b", "a"]
    assert pool.num_pinned == 0
    pool.check()
    assert "host_owned=True" in repr(pool)


def test_host_owned_mode_refusals() -> None:
    with pytest.raises(PoolConfigError) as info:
        BlockPool.from_tensors(host_tensors("flat-NHD"), host_owned=True, debug=True)
    assert info.value.name == "debug"
    with pytest.raises(PoolModeError) as mode:
        BlockPool(4, 1, 4, 2, 8).finished()
    assert not mode.value.host_owned and "host-owned" in str(mode.value)


class HostAllocator:
    """What a serving engine's allocator does with a host-owned pool: hands out blocks per
    request, and reuses them only once ``engine.finished()`` names the request. As a guard
    it poisons (NaN) every block it takes back, so a transport that wrote one after the
    report would be caught by ``assert_poison_intact``."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.free = list(range(pool.num_blocks))
        self.held: dict[str, list[int]] = {}
        self.reclaimed: set[int] = set()
        self.reported: list[str] = []

    def alloc(self, request_id: str, n: int) -> list[int]:
        ids, self.free = self.free[:n], self.free[n:]
        self.held[request_id] = ids
        return ids

    def reclaim(self, engine: TransferEngine) -> list[str]:
        done = engine.finished()
        for rid in done:
            ids = self.held.pop(rid)
            index = torch.tensor(ids)
            for layer in self.pool.layers:
                layer.index_fill_(0, index, float("nan"))
            self.free += ids
            self.reclaimed.update(ids)
        self.reported += done
        return done

    def assert_poison_intact(self) -> None:
        ids = sorted(self.reclaimed)
        assert ids, "nothing was reclaimed: the guard checked nothing"
        for layer in self.pool.layers:
            assert bool(torch.isnan(layer[ids]).all()), "a reclaimed block was written"


async def _poll(alloc: HostAllocator, engine: TransferEngine, n: int = 30) -> None:
    """Reclaim after each of ``n`` engine ticks: a report that came early is acted on."""
    for _ in range(n):
        await ticks(engine, n=1)
        alloc.reclaim(engine)


@pytest.mark.anyio
async def test_host_owned_nothing_reported_while_a_send_is_wedged() -> None:
    """The sender's operation cannot finish or be cancelled, though its bytes landed: the
    receiver's DONE makes the outcome success at once, but the request is reported safe
    only once the sender's operation is final."""
    t0, t1 = loopback_group(2)
    h0 = HeldTransport(t0, held=[0])
    p0 = BlockPool.from_tensors(host_tensors("vllm-NHD", dtype=torch.float32, seed=2),
                                host_owned=True)
    p1 = BlockPool.from_tensors(host_tensors("vllm-NHD", dtype=torch.float32, seed=3),
                                host_owned=True)
    cfg = fast_config(transfer_timeout_s=0.3, quarantine_budget=4)
    e0, e1 = TransferEngine(p0, h0, config=cfg), TransferEngine(p1, t1, config=cfg)
    a0, a1 = HostAllocator(p0), HostAllocator(p1)
    async with running(e0, e1):
        src, dst = a0.alloc("w", 2), a1.alloc("w", 2)
        hs, hr = e0.send("w", src, 1), e1.receive("w", dst, 0)
        await hr.wait()  # the bytes moved; only the sender's report is held
        await hs.wait()  # the receiver's DONE decides the outcome
        await _poll(a0, e0)
        assert a0.reported == [] and p0.pinned_by("w") == frozenset(src)
        # Meanwhile another request moves and is reported once done.
        src2, dst2 = a0.alloc("ok", 1), a1.alloc("ok", 1)
        h2s, h2r = e0.send("ok", src2, 1), e1.receive("ok", dst2, 0)
        await h2s.wait()
        await h2r.wait()
        await until(lambda: a0.reclaim(e0) == ["ok"] or "ok" in a0.reported)
        assert "w" not in a0.reported
        await _poll(a0, e0, 10)
        assert "w" not in a0.reported  # the wedged send still may read src
        h0.release(0)
        await until(lambda: bool(a0.reclaim(e0)) or "w" in a0.reported)
        await until(lambda: bool(a1.reclaim(e1)) or len(a1.reported) == 2)
    assert sorted(a0.reported) == ["ok", "w"] and sorted(a1.reported) == ["ok", "w"]
    assert p0.num_pinned == p1.num_pinned == 0
    a0.assert_poison_intact()
    a1.assert_poison_intact()
    p0.check()
    p1.check()


@pytest.mark.anyio
async def test_host_owned_receiver_reported_only_after_the_blocks_are_written() -> None:
    """The receiver's blocks are written (scattered) when its receive completes; a report
    before that would let the host's guard poison them first and the write would break the
    poison. The host polls ``finished()`` every tick while the receive is held back."""
    t0, t1 = loopback_group(2)
    h1 = HeldTransport(t1, held=[0])
    src_t = host_tensors("vllm-HND", dtype=torch.float32, seed=4)
    p0 = BlockPool.from_tensors(src_t, order="HND")
    p1 = BlockPool.from_tensors(host_tensors("vllm-HND", dtype=torch.float32, seed=5),
                                order="HND", host_owned=True)
    e0 = TransferEngine(p0, t0, config=fast_config())
    e1 = TransferEngine(p1, h1, config=fast_config())
    a1 = HostAllocator(p1)
    async with running(e0, e1):
        src = p0.alloc(3, owner="r")
        dst = a1.alloc("r", 3)
        hs, hr = e0.send("r", src, 1), e1.receive("r", dst, 0)
        await _poll(a1, e1)
        assert a1.reported == [] and not hr.done
        expected = [layer[src].clone() for layer in p0.layers]
        h1.release(0)
        await hs.wait()
        await hr.wait()
        # Read the data before the host reclaims (poisons) the blocks.
        assert all(torch.equal(layer[dst], want)
                   for layer, want in zip(p1.layers, expected, strict=True))
        await until(lambda: bool(a1.reclaim(e1)) or a1.reported == ["r"])
        p0.free(src, owner="r")
    assert a1.reported == ["r"]
    a1.assert_poison_intact()


@pytest.mark.anyio
async def test_host_owned_faulty_transport_reports_each_request_once_after_quiescence() -> None:
    """Injected errors and delays on the receiver (whose word decides the outcome): every
    request is reported exactly once on each side, failed or not, and only after its
    transfer released its pins."""
    t0, t1 = loopback_group(2)
    faults = {1: Fault.ERROR, 3: Fault.ERROR}
    f1 = FaultyTransport(t1, seed=7, delay_rate=1.0, delay_polls=3, faults=faults)
    p0 = BlockPool.from_tensors(host_tensors("flat-NHD", dtype=torch.float32, num_blocks=32),
                                host_owned=True)
    p1 = BlockPool.from_tensors(host_tensors("flat-NHD", dtype=torch.float32, num_blocks=32),
                                host_owned=True)
    e0, e1 = TransferEngine(p0, t0, config=fast_config()), TransferEngine(p1, f1,
                                                                        config=fast_config())
    a0, a1 = HostAllocator(p0), HostAllocator(p1)
    outcomes: dict[str, bool] = {}
    async with running(e0, e1):
        handles = []
        for i in range(6):
            rid = f"r{i}"
            handles.append((rid, e0.send(rid, a0.alloc(rid, 2), 1),
                            e1.receive(rid, a1.alloc(rid, 2), 0)))
        for rid, hs, hr in handles:
            try:
                await hs.wait()
                await hr.wait()
                outcomes[rid] = True
            except (TransferFailed, TransferTimeout, TransferCancelled):
                outcomes[rid] = False
            # Reported only after release: never while this transfer still pins.
            for alloc, pool in ((a0, p0), (a1, p1)):
                alloc.reclaim(e0 if pool is p0 else e1)
                for reported in alloc.reported:
                    assert not pool.pinned_by(reported)
        def all_reported() -> bool:
            a0.reclaim(e0)
            a1.reclaim(e1)
            return len(a0.reported) == len(a1.reported) == 6

        await until(all_reported)
    assert sorted(a0.reported) == sorted(a1.reported) == sorted(outcomes)
    assert sum(not ok for ok in outcomes.values()) == 2  # the two injected errors
    a0.assert_poison_intact()
    a1.assert_poison_intact()


@pytest.mark.anyio
async def test_engine_finished_refused_on_a_pool_owned_pool() -> None:
    t0, _ = loopback_group(2)
    engine = TransferEngine(BlockPool(4, 1, 4, 2, 8), t0, config=fast_config())
    with pytest.raises(PoolModeError):
        engine.finished()

