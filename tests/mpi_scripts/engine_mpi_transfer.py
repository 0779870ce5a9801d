"""TransferEngine over MPITransport: ``engine_mpi_transfer.py MODE[,MODE...]`` (modes run one
after the other in the same job).

``pairs``: even rank r sends to r + 1 (plain and layer-wise transfers, bytes checked on the
receiver). ``tp`` (4 ranks): ranks {0, 1} are one TP group and send to {2, 3} (r -> r + 2),
each group a ``CheckedComm`` over an MPI sub-communicator. ``fail``: rank 1 raises while rank
0 waits on a transfer that will never come; the harness must abort the whole job.
Prints ``rank R engine MODE OK`` when a rank is done with a mode."""

from __future__ import annotations

import sys
import zlib

import anyio
import torch
from _harness import mpi_main
from kvhandoff.collectives import CheckedComm
from kvhandoff.engine import BlockPool, EngineConfig, TransferEngine
from kvhandoff.engine.transports import MPITransport

REQUESTS = 12
BLOCKS = 3
LAYERS = 3


def pattern(pool: BlockPool, rid: str, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{rid}/{rank}".encode()))
    shape = (BLOCKS, *pool.block_shape)
    return [torch.randn(shape, generator=gen) for _ in pool.layers]


async def run_rank(comm, mode: str) -> None:
    rank, size = comm.Get_rank(), comm.Get_size()
    transport = MPITransport(comm)
    tp_comm = None
    extra: tuple[int, ...] = ()
    if mode == "tp":
        assert size == 4, "the tp mode needs 4 ranks"
        group = rank // 2
        tp_comm = CheckedComm.from_mpi(comm.Split(group, rank), name=f"tp-{group}", timeout=30)
        extra = (rank % 2, 2)
        peer = rank + 2 if rank < 2 else rank - 2
        sender = rank < 2
    else:
        peer = rank + 1 if rank % 2 == 0 else rank - 1
        sender = rank % 2 == 0
    pool = BlockPool(4 * BLOCKS * REQUESTS, LAYERS, 4, 2, 8, dtype=torch.float32, debug=True)
    config = EngineConfig(queue_timeout_s=20.0, transfer_timeout_s=20.0, lease_s=20.0,
                          agreement_timeout_s=30.0, drain_timeout_s=10.0)
    with anyio.fail_after(60):
        async with TransferEngine(pool, transport, tp_comm=tp_comm, config=config,
                                  layout_extra=extra) as engine:
            if mode == "fail":
                if rank == 1:
                    raise RuntimeError("rank 1 fails on purpose")
                dst = pool.alloc(BLOCKS, owner="never")
                await engine.receive("never", dst, 1).wait()  # only the abort ends this
            handles, blocks = [], {}
            for i in range(REQUESTS):
                rid = f"req-{i}"
                layerwise = i % 3 == 2
                ids = pool.alloc(BLOCKS, owner=rid)
                blocks[rid] = ids
                if sender:
                    for layer, data in zip(pool.layers, pattern(pool, rid, rank), strict=True):
                        layer[ids] = data
                    handle = engine.send(rid, ids, peer, layerwise=layerwise)
                    pool.free(ids, owner=rid)  # deferred until the transfer is quiescent
                    if layerwise:
                        for layer in range(LAYERS):
                            handle.layer_ready(layer)
                else:
                    handle = engine.receive(rid, ids, peer, layerwise=layerwise)
                handles.append(handle)
            for handle in handles:
                result = await handle.wait()
                assert result.nbytes == BLOCKS * pool.block_nbytes, result
            if not sender:
                for rid, ids in blocks.items():
                    expected = pattern(pool, rid, peer)
                    for layer, data in zip(pool.layers, expected, strict=True):
                        assert torch.equal(layer[ids], data), f"rank {rank}: {rid} differs"
                    pool.free(ids, owner=rid)
            stats = engine.stats()
            assert stats.completed == REQUESTS, stats
            if tp_comm is not None:
                assert stats.agreement_rounds > 0, stats
        report = await engine.drain(1.0)
        assert report.clean, report
    pool.check()
    assert pool.num_free == pool.num_blocks, pool
    transport.close()
    print(f"rank {rank} engine {mode} OK", flush=True)


def main(comm) -> None:
    for mode in sys.argv[1].split(","):
        anyio.run(run_rank, comm, mode)


if __name__ == "__main__":
    mpi_main(main)
