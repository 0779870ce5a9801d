"""TransferEngine over MPITransport on the zero-copy data path, 2 ranks (rank 0 sends, rank 1
receives), debug (poison) pools: ``engine_mpi_zero_copy.py MODE[,MODE...]``.

``paths``: every pairing of a region side with a staged side (each rank's
``region_min_bytes`` chooses its own path), plain and layer-wise, transfers of several pieces,
block ids scattered over the pool with some runs; the receiver's blocks hold the sender's
data and every free block is still poisoned (nothing was written outside the table); a
region side allocates no staging buffer. Some transfers carry a token count that leaves the
last block partly empty: only its valid slots move, and the receiver's slots past the count
keep the bytes they held. ``paths`` runs on an NHD pool, ``paths-hnd`` the same on an HND
pool (a partial last block is one range per head there); over cross-memory attach (the
default on one host) or, with ``KVHANDOFF_MPI_CMA=0``, MPI ``hindexed`` datatypes.

``faults``: region path under FaultyTransport: an injected receive error, a stuck send the
host cannot cancel and frees mid-transfer (its blocks stay out of circulation until the
operation is final, then come back poisoned), a receive the host cancels and frees, and
sizes that differ between the sides (a typed failure on both, nothing posted). Prints
``rank R zero-copy MODE OK``.
"""

from __future__ import annotations

import sys
import zlib
from functools import partial

import anyio
import numpy as np
import torch
from _checks import check_pool_whole, expect_failure, start_pair, wait_until
from _harness import mpi_main
from kvhandoff.engine import (
    BlockPool,
    EngineConfig,
    KVLayout,
    TransferCancelled,
    TransferEngine,
    TransferError,
    TransferFailed,
)
from kvhandoff.engine.transports import Fault, FaultyTransport, MPITransport
from kvhandoff.sessions import CancelResult, FailureReason

# 2 layers of 16 tokens x 8 heads x 128 fp16: 32 KiB per layer tensor, 128 KiB per block.
LAYOUT = (2, 16, 8, 128)
NUM_BLOCKS = 480
REGIONS, STAGED = 0, 1 << 40  # region_min_bytes: always regions / never


def make_pool(order: str = "NHD") -> BlockPool:
    layers, tokens, heads, dim = LAYOUT
    return BlockPool.from_layout(KVLayout(layers, tokens, heads, dim, torch.float16,
                                          order=order), NUM_BLOCKS, debug=True)


def config(region_min_bytes: int, **overrides: float) -> EngineConfig:
    values = dict(queue_timeout_s=20.0, transfer_timeout_s=20.0, lease_s=20.0,
                  agreement_timeout_s=30.0, drain_timeout_s=10.0)
    values.update(overrides)
    return EngineConfig(region_min_bytes=region_min_bytes, **values)


def pattern(pool: BlockPool, rid: str, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(rid.encode()))
    return [torch.randn((count, *pool.block_shape), generator=gen).half() for _ in pool.layers]


# (request id, block count, layer-wise, tokens): 100 blocks = 12.5 MiB (3 pieces), layer-wise
# 160 blocks = 10 MiB per layer (2 pieces each), one block, 40 blocks (1 piece); then counts
# that leave the last block partly empty (None: every slot).
TOKENS = LAYOUT[1]
TRANSFERS = [("big", 100, False, None), ("layers", 160, True, None), ("one", 1, False, None),
             ("small", 40, False, None), ("partial", 60, False, 59 * TOKENS + 3),
             ("partial-layers", 40, True, 40 * TOKENS - 1), ("partial-one", 1, False, 1)]
SENTINEL = 7.0  # what a receiver's blocks hold before the transfer


def split_slots(blocks: torch.Tensor, tokens: int, order: str,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[count, *block_shape]`` as (the valid token slots, the last block's slots past
    ``tokens``), both flat."""
    valid = tokens - (blocks.shape[0] - 1) * TOKENS
    last = blocks[-1]
    cut, rest = ((last[:, :valid], last[:, valid:]) if order == "HND"
                 else (last[:valid], last[valid:]))
    return (torch.cat([blocks[:-1].reshape(-1), cut.reshape(-1)]), rest.reshape(-1))


async def run_paths(comm, sender_path: int, receiver_path: int, tag: str, *,
                    order: str = "NHD") -> None:
    rank = comm.Get_rank()
    pool = make_pool(order)
    transport = MPITransport(comm)
    path = sender_path if rank == 0 else receiver_path
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    # Both ranks use the same shuffled table: ids scattered over the whole pool.
    shuffled = [int(b) for b in rng.permutation(NUM_BLOCKS)]
    tables, start = {}, 0
    for rid, count, _, _ in TRANSFERS:
        ids = shuffled[start:start + count]
        ids[: count // 4] = sorted(ids[: count // 4])
        tables[rid], start = ids, start + count
    # Hold the tables' blocks as the host's allocation; the other blocks stay free, poisoned.
    everything = pool.alloc(NUM_BLOCKS, owner="host")
    used = {b for ids in tables.values() for b in ids}
    pool.free([b for b in everything if b not in used], owner="host")
    with anyio.fail_after(60):
        async with TransferEngine(pool, transport, config=config(path)) as engine:
            handles = []
            for rid, count, layerwise, tokens in TRANSFERS:
                ids = tables[rid]
                if rank == 0:
                    for layer, data in zip(pool.layers, pattern(pool, rid, count), strict=True):
                        layer[ids] = data
                    handle = engine.send(f"{tag}-{rid}", ids, 1, layerwise=layerwise,
                                         num_tokens=tokens)
                    if layerwise:
                        for layer in range(pool.num_layers):
                            handle.layer_ready(layer)
                else:
                    for layer in pool.layers:
                        layer[ids] = SENTINEL
                    handle = engine.receive(f"{tag}-{rid}", ids, 0, layerwise=layerwise,
                                            num_tokens=tokens)
                handles.append(handle)
            moved = 0
            for handle, (_, count, _, tokens) in zip(handles, TRANSFERS, strict=True):
                result = await handle.wait()
                assert result.num_tokens == (tokens or count * TOKENS), result
                moved += result.nbytes
            if rank == 1:
                for rid, count, _, tokens in TRANSFERS:
                    expected = pattern(pool, rid, count)
                    for layer, data in zip(pool.layers, expected, strict=True):
                        got = layer[tables[rid]]
                        want, _ = split_slots(data, tokens or count * TOKENS, order)
                        kept, past = split_slots(got, tokens or count * TOKENS, order)
                        assert torch.equal(kept, want), f"{tag}: {rid} differs"
                        assert bool((past == SENTINEL).all()), f"{tag}: {rid} wrote past"
                pool.assert_poisoned()  # nothing written outside the tables
            stats = engine.stats()
            assert stats.completed == len(TRANSFERS), stats
            assert moved == (stats.bytes_sent if rank == 0 else stats.bytes_received), stats
            assert (stats.staging_allocations == 0) == (path == REGIONS), (tag, stats)
            report = await engine.drain(5.0)
            assert report.clean, report
    pool.free(sorted(used), owner="host")
    pool.check()
    pool.assert_poisoned()
    comm.Barrier()
    transport.close()


async def run_faults(comm) -> None:
    rank = comm.Get_rank()
    pool = make_pool()
    # Post indices on each rank's FaultyTransport: the receiver's first receive fails, the
    # sender's second transfer's first send is stuck.
    faults = {0: Fault.ERROR} if rank == 1 else {1: Fault.STUCK}
    transport = FaultyTransport(MPITransport(comm), seed=3, faults=faults)
    assert transport.moves_regions
    cfg = config(REGIONS, transfer_timeout_s=2.0)
    with anyio.fail_after(60):
        async with TransferEngine(pool, transport, config=cfg) as engine:
            # 1. An injected error on the receiver's region receive: both sides fail, the
            # receiver's blocks go back poisoned once the operation is final.
            ids = pool.alloc(8, owner="err")
            handle = start_pair(engine, rank, "err", ids)
            # The receiver decides the outcome, and the sender adopts its reason.
            await expect_failure(handle, TransferError,
                                 "a transfer whose receive failed must fail on both sides",
                                 FailureReason.TRANSPORT_ERROR)
            await wait_until(lambda: not pool.pinned_by("err"))
            pool.free(ids, owner="err")
            pool.assert_poisoned(ids)
            comm.Barrier()

            # 2. A stuck send the host tries to cancel (MPI cannot cancel a send) and frees
            # mid-transfer: the blocks stay pinned while the operation may still read them,
            # out of every allocation, and return poisoned once it is final.
            ids = pool.alloc(40, owner="stuck")  # 5 MiB: one piece
            if rank == 0:
                for layer, data in zip(pool.layers, pattern(pool, "stuck", 40), strict=True):
                    layer[ids] = data
                handle = engine.send("stuck", ids, 1)
                await wait_until(lambda: engine.session("stuck").state.name == "IN_FLIGHT")
                result = engine.cancel("stuck")
                assert result is CancelResult.NOT_CANCELLABLE, result
                pool.free(ids, owner="stuck")  # deferred: the transport may still read them
                assert set(ids) <= set(pool.deferred_blocks())
                grabbed = pool.alloc(pool.num_free, owner="grab")
                assert set(ids).isdisjoint(grabbed), "a block in flight was handed out"
                pool.free(grabbed, owner="grab")
                # The bytes moved (only the report of our send is stuck): the receiver's
                # DONE makes the outcome success, while the blocks stay pinned until our
                # operation is final (cancelled once confirmed, when the inner one is).
                await handle.wait()
                await wait_until(lambda: pool.num_deferred == 0)
                pool.assert_poisoned(ids)
            else:
                handle = engine.receive("stuck", ids, 0)
                try:
                    await handle.wait()  # the bytes moved
                except (TransferCancelled, TransferFailed):
                    pass
                await wait_until(lambda: not pool.pinned_by("stuck"))
                pool.free(ids, owner="stuck")
            comm.Barrier()

            # 3. The receiver cancels a region receive no send will ever match, and frees its
            # blocks at once: deferred until MPI has cancelled the receive, then poisoned.
            ids = pool.alloc(16, owner="orphan")
            if rank == 1:
                handle = engine.receive("orphan", ids, 0)
                result = engine.cancel("orphan")
                assert result is CancelResult.CANCEL_REQUESTED_IN_FLIGHT, result
                pool.free(ids, owner="orphan")
                await expect_failure(handle, TransferCancelled,
                                     "a cancelled receive must not complete")
                await wait_until(lambda: pool.num_deferred == 0)
                pool.assert_poisoned(ids)
            else:
                pool.free(ids, owner="orphan")
            await wait_until(lambda: not engine.stats().early_advertises)
            comm.Barrier()

            # 4. Sizes that differ: the sender refuses the advertise with a typed reason;
            # nothing is posted (the receiver's blocks keep what they held).
            count = 4 if rank == 0 else 5
            ids = pool.alloc(count, owner="size")
            for layer in pool.layers:
                layer[ids] = 1.0
            sent_before = engine.stats().bytes_sent
            handle = start_pair(engine, rank, "size", ids)
            await expect_failure(handle, TransferFailed, "a size mismatch must fail",
                                 FailureReason.SIZE_MISMATCH)
            assert engine.stats().bytes_sent == sent_before
            assert all(bool((layer[ids] == 1.0).all()) for layer in pool.layers)
            await wait_until(lambda: not pool.pinned_by("size"))
            pool.free(ids, owner="size")
            comm.Barrier()
            report = await engine.drain(5.0)
            assert report.clean, report
    check_pool_whole(comm, pool, transport)


def main(comm) -> None:
    assert comm.Get_size() == 2, "run with 2 ranks"
    for mode in sys.argv[1].split(","):
        if mode in ("paths", "paths-hnd"):
            for s, r in ((REGIONS, REGIONS), (REGIONS, STAGED), (STAGED, REGIONS),
                         (STAGED, STAGED)):
                anyio.run(partial(run_paths, comm, s, r, f"s{int(s > 0)}r{int(r > 0)}",
                                  order="HND" if mode == "paths-hnd" else "NHD"))
        elif mode == "faults":
            anyio.run(run_faults, comm)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        print(f"rank {comm.Get_rank()} zero-copy {mode} OK", flush=True)


if __name__ == "__main__":
    mpi_main(main)
