"""Only the valid tokens of a transfer's last block move (issue 12): on every data path and
every pairing of paths (region and staged, the staging window with many pieces, layer-wise),
for NHD and HND pools, the receiver's slots past the count keep their bytes, the two sides'
checksums agree, and the results and byte counters count the bytes that moved. A count
that fills the last block (or none) moves whole blocks, as before."""

from __future__ import annotations

import pytest
import torch
from engine_support import (
    HeldTransport,
    fast_config,
    fill,
    free_once_released,
    running,
    same_kv,
    token_slots,
    until,
)
from kvhandoff.engine import BlockPool, KVLayout, TransferEngine
from kvhandoff.engine._datapath import PIECE_BYTES
from kvhandoff.engine.transports import loopback_group

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """One event loop: these tests are about bytes, and they are many."""
    return "asyncio"

REGION, STAGED = 0, 1 << 62  # EngineConfig.region_min_bytes for each path
PATHS = [(REGION, REGION), (REGION, STAGED), (STAGED, REGION), (STAGED, STAGED)]
PATH_IDS = ["region-to-region", "region-to-staged", "staged-to-region", "staged-to-staged"]


def _pool(order: str, num_blocks: int, *, big: bool = False) -> BlockPool:
    # Small: 2 layers of 4 tokens x 2 heads x 8 float32 (256 bytes per tensor block).
    # Big: 2 layers of 16 tokens x 8 heads x 128 float16 (32 KiB), for transfers of pieces.
    fields = (2, 16, 8, 128, torch.float16) if big else (2, 4, 2, 8, torch.float32)
    return BlockPool.from_layout(KVLayout(*fields, order=order), num_blocks,  # type: ignore[arg-type]
                                 debug=True)


def _moved_nbytes(pool: BlockPool, num_tokens: int) -> int:
    """Bytes a transfer of ``num_tokens`` tokens moves: every tensor's token slots."""
    layout = pool.layout
    element = torch.empty((), dtype=layout.dtype).element_size()
    return num_tokens * layout.kv_heads * layout.head_dim * element * len(pool.layers)


async def _move(e0: TransferEngine, e1: TransferEngine, p0: BlockPool, p1: BlockPool,
                blocks: int, num_tokens: int | None, *, layerwise: bool, rid: str = "r",
                ) -> tuple[list[int], list[int]]:
    """Send ``blocks`` filled blocks from rank 0 to rank 1 (whose blocks are filled with
    other bytes first) and check what landed: the valid slots are the sender's, those past
    the count are the receiver's own. Returns the two block lists."""
    tokens = blocks * p0.block_tokens if num_tokens is None else num_tokens
    src = p0.alloc(blocks, owner=rid)
    dst = p1.alloc(blocks, owner=rid)[::-1]  # another order: pieces map ids by position
    fill(p0, src, seed=1)
    fill(p1, dst, seed=2)
    sent, _ = token_slots(p0, src, tokens)
    _, untouched = token_slots(p1, dst, tokens)
    hr = e1.receive(rid, dst, 0, layerwise=layerwise, num_tokens=num_tokens)
    hs = e0.send(rid, src, 1, layerwise=layerwise, num_tokens=num_tokens)
    if layerwise:
        for layer in range(p0.num_layers):
            hs.layer_ready(layer)
    got, done = await hr.wait(), await hs.wait()
    kept, past = token_slots(p1, dst, tokens)
    assert same_kv(kept, sent), "a valid token slot did not arrive"
    assert same_kv(past, untouched), "a slot past the count was written"
    moved = _moved_nbytes(p0, tokens)
    assert got.num_tokens == done.num_tokens == tokens
    assert got.nbytes == done.nbytes == moved
    await free_once_released(p0, p1, rid, src, dst)
    return src, dst


@pytest.mark.parametrize(("blocks", "num_tokens"),
                         [(3, 9), (3, 11), (3, 12), (1, 2), (1, 4), (3, None)],
                         ids=["one-valid", "three-valid", "fills-it", "one-block",
                              "one-full-block", "omitted"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
@pytest.mark.parametrize(("sender_path", "receiver_path"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("order", ["NHD", "HND"])
async def test_only_the_valid_slots_move_whichever_path_each_side_takes(
        order: str, sender_path: int, receiver_path: int, layerwise: bool, blocks: int,
        num_tokens: int | None) -> None:
    t0, t1 = loopback_group(2)
    p0, p1 = _pool(order, 8), _pool(order, 8)
    e0 = TransferEngine(p0, t0, config=fast_config(region_min_bytes=sender_path,
                                                   checksum=True))
    e1 = TransferEngine(p1, t1, config=fast_config(region_min_bytes=receiver_path,
                                                   checksum=True))
    async with running(e0, e1):
        await _move(e0, e1, p0, p1, blocks, num_tokens, layerwise=layerwise)
        tokens = blocks * 4 if num_tokens is None else num_tokens
        moved = _moved_nbytes(p0, tokens)
        assert e0.stats().bytes_sent == e1.stats().bytes_received == moved
        assert e0.stats().staging_allocations == (0 if sender_path == REGION else 1)
        assert e1.stats().staging_allocations == (0 if receiver_path == REGION else 1)


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
@pytest.mark.parametrize(("sender", "receiver"),
                         [("window", "window"), ("region", "window"), ("window", "region")],
                         ids=["window-to-window", "region-to-window", "window-to-region"])
async def test_the_last_of_many_windowed_pieces_carries_only_the_valid_slots(
        sender: str, receiver: str, layerwise: bool, order: str) -> None:
    """Ten pieces of about ``PIECE_BYTES`` per chunk through staging windows of 2 and 3
    slots (or the region path on one side): every piece but the last is whole blocks, the
    last is shorter by the slots past the count, and the checksums of the two sides agree
    (a mismatch would fail both)."""
    tensors = 2 if layerwise else 4
    block_nbytes = tensors * 16 * 8 * 128 * 2  # one block's bytes in a chunk
    blocks = 10 * PIECE_BYTES // block_nbytes + 1
    num_tokens = (blocks - 1) * 16 + 3
    t0, t1 = loopback_group(2)
    held = HeldTransport(t0)  # records the staged sender's posts
    window = dict(checksum=True, region_min_bytes=STAGED)
    p0, p1 = _pool(order, blocks, big=True), _pool(order, blocks, big=True)
    e0 = TransferEngine(p0, held if sender == "window" else t0, config=fast_config(
        **(dict(window, staging_window=2) if sender == "window"
           else dict(checksum=True, region_min_bytes=REGION))))
    e1 = TransferEngine(p1, t1, config=fast_config(
        **(dict(window, staging_window=3) if receiver == "window"
           else dict(checksum=True, region_min_bytes=REGION))))
    async with running(e0, e1):
        await _move(e0, e1, p0, p1, blocks, num_tokens, layerwise=layerwise)
        moved = _moved_nbytes(p0, num_tokens)
        assert e0.stats().bytes_sent == e1.stats().bytes_received == moved
        if sender == "window":
            chunks = 2 if layerwise else 1
            sizes = [nbytes for _, _, nbytes in held.posts]
            assert len(sizes) == 10 * chunks and sum(sizes) == moved
            short = tensors * 13 * 8 * 128 * 2  # the last block's 13 slots past the count
            bounds = [p * blocks // 10 for p in range(11)]
            want = [(bounds[p + 1] - bounds[p]) * block_nbytes for p in range(10)]
            want[-1] -= short
            assert sizes == want * chunks
            assert e0._datapath.staging.peak_nbytes < moved


async def test_a_count_that_fills_the_last_block_moves_the_same_pieces_as_none() -> None:
    """Whole-block behaviour is kept exactly when the count fills the last block: the same
    operations, of the same sizes, as a transfer without a count."""
    blocks = 3 * PIECE_BYTES // (4 * 16 * 8 * 128 * 2) + 5
    t0, t1 = loopback_group(2)
    held = HeldTransport(t0)
    p0, p1 = _pool("NHD", blocks, big=True), _pool("NHD", blocks, big=True)
    cfg = fast_config(region_min_bytes=STAGED)
    e0, e1 = TransferEngine(p0, held, config=cfg), TransferEngine(p1, t1, config=cfg)
    async with running(e0, e1):
        await _move(e0, e1, p0, p1, blocks, None, layerwise=False, rid="none")
        without = list(held.posts)
        held.posts.clear()
        await _move(e0, e1, p0, p1, blocks, blocks * 16, layerwise=False, rid="full")
        assert [n for _, _, n in held.posts] == [n for _, _, n in without]
        assert len(without) == 3 and sum(n for _, _, n in without) == blocks * 4 * 16 * 8 * 128 * 2


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize(("sender_path", "receiver_path"), PATHS, ids=PATH_IDS)
async def test_adopted_vllm_tensors_move_only_the_valid_slots(
        order: str, sender_path: int, receiver_path: int) -> None:
    """Pools over vLLM's ``[2, num_blocks, ...]`` per-layer tensors (K and V as views): the
    tail is derived from the adopted layout the same way, and the host's own tensors show
    only the valid slots written."""
    shape = (2, 8, 4, 2, 8) if order == "NHD" else (2, 8, 2, 4, 8)
    host0 = [torch.zeros(shape) for _ in range(3)]
    host1 = [torch.zeros(shape) for _ in range(3)]
    p0 = BlockPool.from_tensors(host0, order=order)  # type: ignore[arg-type]
    p1 = BlockPool.from_tensors(host1, order=order)  # type: ignore[arg-type]
    assert p0.layout.block_tokens == 4 and p0.num_layers == 3
    t0, t1 = loopback_group(2)
    e0 = TransferEngine(p0, t0, config=fast_config(region_min_bytes=sender_path,
                                                   checksum=True))
    e1 = TransferEngine(p1, t1, config=fast_config(region_min_bytes=receiver_path,
                                                   checksum=True))
    # The pool's layers are the host's memory: what _move checks is what the host sees.
    assert [layer.data_ptr() for layer in p1.layers[:2]] == \
        [host1[0][0].data_ptr(), host1[0][1].data_ptr()]
    async with running(e0, e1):
        await _move(e0, e1, p0, p1, 3, 10, layerwise=False)
        await _move(e0, e1, p0, p1, 2, 5, layerwise=True, rid="lw")


async def test_the_path_choice_counts_a_partial_last_blocks_own_regions() -> None:
    """``region_min_bytes`` is an average region size: an HND last block that is partly
    valid moves as ``kv_heads`` short regions per tensor, which the choice counts (here
    one block of 256 bytes per tensor is one region, but 1 valid token of it is two regions
    of 32 bytes, below the 100-byte bar: staged)."""
    _, t1 = loopback_group(2)
    p1 = _pool("HND", 4)
    async with running(TransferEngine(p1, t1, config=fast_config(region_min_bytes=100,
                                                                 transfer_timeout_s=0.2))) \
            as (e1,):
        full, partial = p1.alloc(1, owner="full"), p1.alloc(1, owner="partial")
        e1.receive("full", full, 0, num_tokens=4)
        e1.receive("partial", partial, 0, num_tokens=1)
        assert e1._transfers["full"].regions and not e1._transfers["partial"].regions
        for rid in ("full", "partial"):
            e1.cancel(rid)
        await until(lambda: not p1.pinned_by("full") and not p1.pinned_by("partial"))
        p1.free(full, owner="full")
        p1.free(partial, owner="partial")
