"""The data plane: pieces of a large chunk (the pipelined staged path), the region path
(zero-copy) and its pairing with the staged path, and safety with no staging buffer in
between, under faults, on poison pools. The region path runs over real MPI (2 ranks)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from functools import partial

import pytest
import torch
from engine_support import (
    HeldTransport,
    ManualClock,
    engine_pair,
    fast_config,
    free_once_released,
    running,
    ticks,
    until,
)
from kvhandoff.engine import (
    BlockPool,
    EngineConfig,
    EngineConfigError,
    TransferCancelled,
    TransferEngine,
    TransferFailed,
)
from kvhandoff.engine._datapath import PIECE_BYTES
from kvhandoff.engine.transports import Fault, FaultyTransport, loopback_group
from kvhandoff.sessions import CancelResult, State

RunMPI = Callable[..., subprocess.CompletedProcess[str]]

# 2 layers of 16 tokens x 8 heads x 128 fp16: 32 KiB per layer tensor, 128 KiB per block.
LAYOUT = (2, 16, 8, 128)
BLOCK_NBYTES = 2 * 2 * 16 * 8 * 128 * 2


def big_pool(num_blocks: int) -> BlockPool:
    return BlockPool(num_blocks, *LAYOUT, dtype=torch.float16, debug=True)


def fill(pool: BlockPool, ids: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for layer in pool.layers:
        layer[ids] = torch.randn(layer[ids].shape, generator=gen).half()
    return [layer[ids].clone() for layer in pool.layers]


STAGED = 1 << 62  # EngineConfig.region_min_bytes that keeps the staged path


@pytest.mark.anyio
@pytest.mark.parametrize("sender_path", [0, STAGED], ids=["region-sender", "staged-sender"])
async def test_staged_pieces_move_on_the_chunks_tag_and_scatter_as_they_land(
        sender_path: int) -> None:
    """A 10 MiB transfer moves as two pieces on one tag; the (staged) receiver scatters the
    first into its blocks while the second is still held in flight, whichever path the
    sender takes."""
    blocks = 2 * PIECE_BYTES // BLOCK_NBYTES + 16  # a little over two pieces' worth
    t0, t1 = loopback_group(2)
    held = HeldTransport(t1, held=[1])  # the receiver's second piece does not land yet
    assert not held.moves_regions  # so the receiver is staged
    p0, p1 = big_pool(blocks), big_pool(blocks)
    e0 = TransferEngine(p0, t0, config=fast_config(region_min_bytes=sender_path))
    e1 = TransferEngine(p1, held, config=fast_config())
    async with running(e0, e1):
        src, dst = p0.alloc(blocks, owner="r"), p1.alloc(blocks, owner="r")
        dst = dst[::-1]  # another order on the receiver: pieces map ids by position
        expected = fill(p0, src, seed=1)
        hr = e1.receive("r", dst, 0)
        hs = e0.send("r", src, 1)
        half = blocks // 2
        assert [(kind, nbytes) for kind, _, nbytes in held.posts] == \
            [("recv", half * BLOCK_NBYTES), ("recv", (blocks - half) * BLOCK_NBYTES)]
        assert len({tag for _, tag, _ in held.posts}) == 1  # both pieces on the chunk's tag

        def landed(part: slice) -> bool:
            return all(torch.equal(layer[dst[part]], want[part])
                       for layer, want in zip(p1.layers, expected, strict=True))

        await until(lambda: landed(slice(0, half)))  # scattered before the transfer ends
        assert not hr.done and not landed(slice(half, blocks))
        held.release(1)
        await hr.wait()
        await hs.wait()  # the sender completes on the receiver's DONE
        assert landed(slice(0, blocks))
        await free_once_released(p0, p1, "r", src, dst)
        # One staging buffer per staged side, not one per piece; none on a region side.
        assert e1.stats().staging_allocations == 1
        assert e0.stats().staging_allocations == (0 if sender_path == 0 else 1)


@pytest.mark.anyio
async def test_layerwise_large_layers_move_in_pieces_each() -> None:
    """Layer-wise: each layer's chunk of 8+ MiB moves as pieces on that layer's tag."""
    blocks = 2 * PIECE_BYTES // (BLOCK_NBYTES // 2)  # one layer's chunk: two pieces
    t0, t1 = loopback_group(2)
    sender = HeldTransport(t0)
    p0, p1 = big_pool(blocks), big_pool(blocks)
    e0 = TransferEngine(p0, sender, config=fast_config())
    e1 = TransferEngine(p1, t1, config=fast_config())
    async with running(e0, e1):
        src, dst = p0.alloc(blocks, owner="r"), p1.alloc(blocks, owner="r")
        expected = fill(p0, src, seed=2)
        hr = e1.receive("r", dst, 0, layerwise=True)
        hs = e0.send("r", src, 1, layerwise=True)
        hs.layer_ready(1)  # out of order: each layer moves when it is ready
        hs.layer_ready(0)
        await hs.wait()
        await hr.wait()
        tags = [tag for _, tag, _ in sender.posts]
        assert len(tags) == 4 and tags[0] == tags[1] and tags[2] == tags[3] != tags[0]
        assert all(torch.equal(layer[dst], want)
                   for layer, want in zip(p1.layers, expected, strict=True))
        await free_once_released(p0, p1, "r", src, dst)


# --- safety on the region path (loopback moves regions block to block), poison pools ------

def _grab_excludes(pool: BlockPool, ids: list[int]) -> None:
    """Every block that can be allocated now excludes ``ids`` (still in the transport's
    reach); what was grabbed goes back."""
    grabbed = pool.alloc(pool.num_free, owner="grab")
    assert set(ids).isdisjoint(grabbed), "a block the transport may touch was handed out"
    pool.free(grabbed, owner="grab")


@pytest.mark.anyio
async def test_region_receive_freed_mid_transfer_is_written_only_while_pinned() -> None:
    """The receiver's host frees its blocks while the region receive waits for a late
    sender: the free is deferred, no allocation hands them out, the late bytes land in the
    still-pinned blocks, and only then do they come back, poisoned."""
    async with engine_pair(fast_config(region_min_bytes=0), num_blocks=16) as pair:
        e0, e1, p0, p1 = pair.e0, pair.e1, pair.p0, pair.p1
        assert pair.t1.moves_regions
        src, dst = p0.alloc(4, owner="late"), p1.alloc(4, owner="late")
        hr = e1.receive("late", dst, 0)
        await until(lambda: e1.session("late").state is State.IN_FLIGHT)
        p1.free(dst, owner="late")  # mid-transfer: deferred, the transport may write them
        assert p1.deferred_blocks() == frozenset(dst)
        _grab_excludes(p1, dst)
        hs = e0.send("late", src, 1)  # the bytes now land in the pinned blocks
        await hs.wait()
        await hr.wait()
        assert e1.stats().staging_allocations == 0  # moved block to block
        await until(lambda: p1.num_deferred == 0)
        p1.assert_poisoned(dst)  # released after the write, poisoned again
        await until(lambda: not p0.pinned_by("late"))
        p0.free(src, owner="late")


@pytest.mark.anyio
async def test_region_error_mid_pieces_keeps_blocks_until_every_piece_is_final() -> None:
    """An injected error on the receiver's first piece of three while the second is stuck:
    the transfer fails at once, the blocks stay pinned (and out of every allocation) while
    the stuck piece may still write them, and return poisoned only when the transfer
    deadline has aborted it and it is final."""
    clock = ManualClock()
    blocks = 3 * PIECE_BYTES // BLOCK_NBYTES
    t0, t1 = loopback_group(2)
    f1 = FaultyTransport(t1, seed=0, faults={0: Fault.ERROR, 1: Fault.STUCK})
    p0, p1 = big_pool(blocks + 8), big_pool(blocks + 8)
    cfg = fast_config(region_min_bytes=0, transfer_timeout_s=5.0, progress_deadline_s=100.0)
    e0 = TransferEngine(p0, t0, config=cfg, clock=clock)
    e1 = TransferEngine(p1, f1, config=cfg, clock=clock)
    async with running(e0, e1, clock=clock):
        src, dst = p0.alloc(blocks, owner="e"), p1.alloc(blocks, owner="e")
        fill(p0, src, seed=3)
        hr = e1.receive("e", dst, 0)
        e0.send("e", src, 1)
        with pytest.raises(TransferFailed) as info:
            await hr.wait()
        assert info.value.reason == "transport_error"
        p1.free(dst, owner="e")
        assert p1.deferred_blocks() == frozenset(dst)  # the stuck piece may still write
        _grab_excludes(p1, dst)
        await clock.advance(6.0, steps=12)  # the transfer deadline aborts the stuck piece
        await until(lambda: p1.num_deferred == 0 and not p0.pinned_by("e"))
        p1.assert_poisoned(dst)
        p0.free(src, owner="e")


@pytest.mark.anyio
async def test_region_ops_with_a_lost_peer_stay_pinned_until_cancelled() -> None:
    """Peer loss on the region path: both sides' operations hang, the host cancels and
    frees on the receiver (deferred), the lease lapses, the aborted operations become final
    and only then are the blocks released, poisoned."""
    clock = ManualClock()
    cfg = fast_config(queue_timeout_s=None, transfer_timeout_s=None, lease_s=1.0,
                      progress_deadline_s=100.0, region_min_bytes=0)
    hanging = partial(FaultyTransport, seed=0, faults={0: Fault.STUCK})
    async with engine_pair(cfg, clock, wrap0=hanging, wrap1=hanging) as pair:
        e0, e1, p0, p1, f0 = pair.e0, pair.e1, pair.p0, pair.p1, pair.t0
        src, dst = p0.alloc(3, owner="l"), p1.alloc(3, owner="l")
        hs, hr = e0.send("l", src, 1), e1.receive("l", dst, 0)
        await until(lambda: e0.session("l").state is State.IN_FLIGHT
                    and e1.session("l").state is State.IN_FLIGHT)
        assert e1.cancel("l") is CancelResult.CANCEL_REQUESTED_IN_FLIGHT
        p1.free(dst, owner="l")
        p0.free(src, owner="l")
        f0.lose_peer(1)
        _grab_excludes(p0, src)
        _grab_excludes(p1, dst)
        await clock.advance(1.5, steps=15)
        with pytest.raises(TransferCancelled):
            await hr.wait()
        with pytest.raises(TransferFailed) as info:
            await hs.wait()
        assert info.value.reason == "peer_lost"
        await until(lambda: p0.num_deferred == 0 and p1.num_deferred == 0)
        p0.assert_poisoned(src)
        p1.assert_poisoned(dst)


def test_region_min_bytes_is_validated() -> None:
    assert EngineConfig().region_min_bytes is None  # the transport's hint
    assert EngineConfig(region_min_bytes=0).region_min_bytes == 0
    for bad in (-1, 1.5, True, "4096"):
        with pytest.raises(EngineConfigError):
            EngineConfig(region_min_bytes=bad)  # type: ignore[arg-type]


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["paths", "paths-hnd", "faults"],
                         ids=["paths-pair", "paths-pair-on-hnd-pools", "faults-keep-pins"])
def test_zero_copy_over_mpi(run_mpi: RunMPI, mode: str) -> None:
    """``paths``: every pairing of the region and staged paths over MPI; ``paths-hnd``: the
    same on an HND pool (a partial last block is one range per head); ``faults``: faults
    keep the blocks pinned until their operations are final."""
    result = run_mpi(2, "engine_mpi_zero_copy.py", mode, timeout=240)
    for rank in range(2):
        assert f"rank {rank} zero-copy {mode} OK" in result.stdout, result.stdout


@pytest.mark.anyio
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
@pytest.mark.parametrize(("sender_path", "receiver_path"),
                         [(0, STAGED), (STAGED, 0), (0, 0)],
                         ids=["region-to-staged", "staged-to-region", "region-to-region"])
async def test_checksum_agrees_whichever_path_each_side_takes(
        sender_path: int, receiver_path: int, layerwise: bool) -> None:
    """The optional checksum names the bytes in wire order, piece by piece, so a sender and
    a receiver on different paths (staging buffer or blocks in place) compute the same one,
    for transfers of several pieces."""
    blocks = 2 * PIECE_BYTES // BLOCK_NBYTES + 16
    if layerwise:
        blocks = 2 * PIECE_BYTES // (BLOCK_NBYTES // 2)
    t0, t1 = loopback_group(2)
    p0, p1 = big_pool(blocks), big_pool(blocks)
    e0 = TransferEngine(p0, t0, config=fast_config(region_min_bytes=sender_path,
                                                   checksum=True))
    e1 = TransferEngine(p1, t1, config=fast_config(region_min_bytes=receiver_path,
                                                   checksum=True))
    async with running(e0, e1):
        src, dst = p0.alloc(blocks, owner="r"), p1.alloc(blocks, owner="r")[::-1]
        expected = fill(p0, src, seed=5)
        hr = e1.receive("r", dst, 0, layerwise=layerwise)
        hs = e0.send("r", src, 1, layerwise=layerwise)
        if layerwise:
            for layer in range(LAYOUT[0]):
                hs.layer_ready(layer)
        await hr.wait()
        await hs.wait()
        for layer, want in zip(p1.layers, expected, strict=True):
            assert torch.equal(layer[dst], want)
        assert e0.stats().staging_allocations == (0 if sender_path == 0 else 1)
        assert e1.stats().staging_allocations == (0 if receiver_path == 0 else 1)


# --- the staging window: bounded staging memory on the staged path -------------------------

WINDOW_PIECES = 10


def _window_config(window: int, **overrides: float | int | None) -> EngineConfig:
    return fast_config(region_min_bytes=STAGED, staging_window=window, **overrides)


def _slot_bound(blocks: int, pieces: int, per_block: int, window: int) -> int:
    """The most staging a window of ``window`` slots of the widest piece may hold."""
    return window * -(-blocks // pieces) * per_block


@pytest.mark.anyio
@pytest.mark.parametrize(("w0", "w1"), [(2, 2), (2, 3), (3, 1)],
                         ids=["w2-w2", "w2-w3", "w3-w1"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
async def test_staged_window_moves_many_pieces_in_bounded_staging(
        layerwise: bool, w0: int, w1: int) -> None:
    """Ten staged pieces through a window of a few slots on each side (each side its own
    window) move byte-exact with the checksum on, and neither side ever holds more staging
    than its window; layer-wise, a layer ready before the one ahead of it waits for it."""
    blocks = WINDOW_PIECES * PIECE_BYTES // BLOCK_NBYTES
    t0, t1 = loopback_group(2)
    sender = HeldTransport(t0)
    p0, p1 = big_pool(blocks), big_pool(blocks)
    e0 = TransferEngine(p0, sender, config=_window_config(w0, checksum=True))
    e1 = TransferEngine(p1, t1, config=_window_config(w1, checksum=True))
    async with running(e0, e1):
        src, dst = p0.alloc(blocks, owner="w"), p1.alloc(blocks, owner="w")[::-1]
        expected = fill(p0, src, seed=7)
        hr = e1.receive("w", dst, 0, layerwise=layerwise)
        hs = e0.send("w", src, 1, layerwise=layerwise)
        if layerwise:
            hs.layer_ready(1)  # out of order: layer 1 waits for layer 0 (operation order)
            await ticks(e0, e1)
            assert sender.posts == []
            hs.layer_ready(0)
        await hr.wait()
        await hs.wait()
        for layer, want in zip(p1.layers, expected, strict=True):
            assert torch.equal(layer[dst], want)
        assert len(sender.posts) == WINDOW_PIECES
        tags = [tag for _, tag, _ in sender.posts]
        assert tags == sorted(tags)  # in operation order, chunk by chunk
        if layerwise:
            pieces, per_block = WINDOW_PIECES // 2, BLOCK_NBYTES // 2
        else:
            pieces, per_block = WINDOW_PIECES, BLOCK_NBYTES
        for engine, window in ((e0, w0), (e1, w1)):
            staging = engine._datapath.staging
            assert 0 < staging.peak_nbytes <= _slot_bound(blocks, pieces, per_block, window)
            assert staging.peak_nbytes < blocks * BLOCK_NBYTES
            assert engine.stats().staging_allocations == 1
        await until(lambda: not p0.pinned_by("w") and not p1.pinned_by("w"))
        assert e0._datapath.staging.outstanding_nbytes == 0
        assert e1._datapath.staging.outstanding_nbytes == 0
        p0.free(src, owner="w")
        p1.free(dst, owner="w")


@pytest.mark.anyio
async def test_staged_window_stalls_on_a_held_piece_and_resumes() -> None:
    """The receiver's second piece is held in flight: with a window of two, the receiver
    scatters the first, posts the third into its slot, and goes no further (the third is
    not scattered before the second); released, the rest of the ten pieces follow."""
    blocks = WINDOW_PIECES * PIECE_BYTES // BLOCK_NBYTES
    per_piece = blocks // WINDOW_PIECES
    t0, t1 = loopback_group(2)
    held = HeldTransport(t1, held=[1])
    p0, p1 = big_pool(blocks), big_pool(blocks)
    e0 = TransferEngine(p0, t0, config=_window_config(2))
    e1 = TransferEngine(p1, held, config=_window_config(2))
    async with running(e0, e1):
        src, dst = p0.alloc(blocks, owner="h"), p1.alloc(blocks, owner="h")
        expected = fill(p0, src, seed=8)

        def landed(part: slice) -> bool:
            return all(torch.equal(layer[dst[part]], want[part])
                       for layer, want in zip(p1.layers, expected, strict=True))

        hr = e1.receive("h", dst, 0)
        hs = e0.send("h", src, 1)
        await until(lambda: landed(slice(0, per_piece)) and len(held.posts) == 3)
        await ticks(e0, e1)
        assert len(held.posts) == 3  # the window is stalled behind the held piece
        assert not hr.done and not landed(slice(2 * per_piece, 3 * per_piece))
        assert e1._datapath.staging.peak_nbytes <= 2 * per_piece * BLOCK_NBYTES
        held.release(1)
        await hr.wait()
        await hs.wait()
        assert len(held.posts) == WINDOW_PIECES
        assert landed(slice(0, blocks))
        await free_once_released(p0, p1, "h", src, dst)


@pytest.mark.anyio
async def test_staged_window_cancel_mid_window_keeps_blocks_until_every_piece_is_final() -> None:
    """The receiver's host cancels while its window is stalled on a held piece and frees its
    blocks: the free is deferred and no allocation hands them out; released, the window
    runs to the end (every send the sender posts is matched, the bytes discarded), and only
    then do both sides' blocks come back, poisoned."""
    blocks = WINDOW_PIECES * PIECE_BYTES // BLOCK_NBYTES
    t0, t1 = loopback_group(2)
    held = HeldTransport(t1, held=[1], cancellable=True)
    p0, p1 = big_pool(blocks + 4), big_pool(blocks + 4)
    e0 = TransferEngine(p0, t0, config=_window_config(2))
    e1 = TransferEngine(p1, held, config=_window_config(2))
    async with running(e0, e1):
        src, dst = p0.alloc(blocks, owner="c"), p1.alloc(blocks, owner="c")
        fill(p0, src, seed=9)
        hr = e1.receive("c", dst, 0)
        hs = e0.send("c", src, 1)
        await until(lambda: len(held.posts) == 3)
        assert e1.cancel("c") is CancelResult.CANCEL_REQUESTED_IN_FLIGHT
        with pytest.raises(TransferCancelled):
            await hr.wait()
        p1.free(dst, owner="c")
        p0.free(src, owner="c")
        assert p1.deferred_blocks() == frozenset(dst)
        _grab_excludes(p1, dst)
        _grab_excludes(p0, src)
        held.release(1)
        with pytest.raises(TransferCancelled):  # the receiver's reason, adopted
            await hs.wait()
        await until(lambda: p0.num_deferred == 0 and p1.num_deferred == 0)
        assert len(held.posts) == WINDOW_PIECES  # the window ran to the end: all matched
        p0.assert_poisoned(src)
        p1.assert_poisoned(dst)
        assert e0._datapath.staging.outstanding_nbytes == 0
        assert e1._datapath.staging.outstanding_nbytes == 0


@pytest.mark.anyio
async def test_staged_window_error_mid_window_fails_and_releases_only_when_final() -> None:
    """An injected error on the receiver's second piece of ten (window two): both sides
    fail with the transport error, the blocks stay pinned until every operation of both
    windows is final, then return poisoned."""
    blocks = WINDOW_PIECES * PIECE_BYTES // BLOCK_NBYTES
    t0, t1 = loopback_group(2)
    f1 = FaultyTransport(t1, seed=0, faults={1: Fault.ERROR})
    p0, p1 = big_pool(blocks), big_pool(blocks)
    e0 = TransferEngine(p0, t0, config=_window_config(2))
    e1 = TransferEngine(p1, f1, config=_window_config(2))
    async with running(e0, e1):
        src, dst = p0.alloc(blocks, owner="e"), p1.alloc(blocks, owner="e")
        fill(p0, src, seed=10)
        hr = e1.receive("e", dst, 0)
        hs = e0.send("e", src, 1)
        with pytest.raises(TransferFailed) as info:
            await hr.wait()
        assert info.value.reason == "transport_error"
        p1.free(dst, owner="e")
        with pytest.raises(TransferFailed) as info:
            await hs.wait()
        assert info.value.reason == "transport_error"
        p0.free(src, owner="e")
        await until(lambda: p0.num_deferred == 0 and p1.num_deferred == 0)
        p0.assert_poisoned(src)
        p1.assert_poisoned(dst)
        assert e1._datapath.staging.outstanding_nbytes == 0


def test_staging_window_is_validated() -> None:
    assert EngineConfig().staging_window == 4
    assert EngineConfig(staging_window=1).staging_window == 1
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(EngineConfigError):
            EngineConfig(staging_window=bad)  # type: ignore[arg-type]
