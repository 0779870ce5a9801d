"""The data plane: pieces of a large chunk (the pipelined staged path), the region path
(zero-copy) and its pairing with the staged path, and safety with no staging buffer in
between, under faults, on poison pools. The region path runs over real MPI (2 ranks)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest
import torch
from engine_support import HeldTransport, fast_config, running, until
from kvhandoff.engine import BlockPool, EngineConfig, EngineConfigError, TransferEngine
from kvhandoff.engine._datapath import PIECE_BYTES
from kvhandoff.engine.transports import loopback_group

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


@pytest.mark.anyio
async def test_staged_pieces_move_on_the_chunks_tag_and_scatter_as_they_land() -> None:
    """A 10 MiB transfer moves as two pieces on one tag; the receiver scatters the first
    into its blocks while the second is still held in flight."""
    blocks = 2 * PIECE_BYTES // BLOCK_NBYTES + 16  # a little over two pieces' worth
    t0, t1 = loopback_group(2)
    held = HeldTransport(t1, held=[1])  # the receiver's second piece does not land yet
    p0, p1 = big_pool(blocks), big_pool(blocks)
    e0 = TransferEngine(p0, t0, config=fast_config())
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
        await hs.wait()

        def landed(part: slice) -> bool:
            return all(torch.equal(layer[dst[part]], want[part])
                       for layer, want in zip(p1.layers, expected, strict=True))

        await until(lambda: landed(slice(0, half)))  # scattered before the transfer ends
        assert not hr.done and not landed(slice(half, blocks))
        held.release(1)
        await hr.wait()
        assert landed(slice(0, blocks))
        await until(lambda: not p0.pinned_by("r") and not p1.pinned_by("r"))
        p0.free(src, owner="r")
        p1.free(dst, owner="r")
        assert e0.stats().staging_allocations == 1  # one staging buffer each, not per piece


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
        await until(lambda: not p0.pinned_by("r") and not p1.pinned_by("r"))
        p0.free(src, owner="r")
        p1.free(dst, owner="r")


def test_region_min_bytes_is_validated() -> None:
    assert EngineConfig().region_min_bytes is None  # the transport's hint
    assert EngineConfig(region_min_bytes=0).region_min_bytes == 0
    for bad in (-1, 1.5, True, "4096"):
        with pytest.raises(EngineConfigError):
            EngineConfig(region_min_bytes=bad)  # type: ignore[arg-type]


@pytest.mark.mpi
def test_zero_copy_paths_pair_with_each_other_over_mpi(run_mpi: RunMPI) -> None:
    result = run_mpi(2, "engine_mpi_zero_copy.py", "paths", timeout=240)
    for rank in range(2):
        assert f"rank {rank} zero-copy paths OK" in result.stdout, result.stdout


@pytest.mark.mpi
def test_zero_copy_faults_keep_blocks_pinned_over_mpi(run_mpi: RunMPI) -> None:
    result = run_mpi(2, "engine_mpi_zero_copy.py", "faults", timeout=240)
    for rank in range(2):
        assert f"rank {rank} zero-copy faults OK" in result.stdout, result.stdout
