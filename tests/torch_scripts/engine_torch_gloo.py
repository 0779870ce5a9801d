"""TransferEngine over TorchDistTransport (gloo): ``python engine_torch_gloo.py`` spawns two
ranks on a free local port; rank 0 sends plain and layer-wise transfers to rank 1, which
checks every byte. A failing rank makes ``torch.multiprocessing.spawn`` terminate the other
and exit non-zero. Prints ``rank R engine torch OK`` per rank."""

from __future__ import annotations

import os
import tempfile
import zlib
from datetime import timedelta

import anyio
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REQUESTS = 8
BLOCKS = 2
LAYERS = 2


def pattern(shape: tuple[int, ...], rid: str, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(rid.encode()))
    return [torch.randn(shape, generator=gen) for _ in range(count)]


async def run_rank(rank: int) -> None:
    from kvhandoff.engine import BlockPool, EngineConfig, TransferEngine
    from kvhandoff.engine.transports import TorchDistTransport

    transport = TorchDistTransport()
    pool = BlockPool(4 * BLOCKS * REQUESTS, LAYERS, 4, 2, 8, dtype=torch.float32, debug=True)
    config = EngineConfig(queue_timeout_s=20.0, transfer_timeout_s=20.0, lease_s=20.0,
                          drain_timeout_s=10.0)
    peer = 1 - rank
    shape = (BLOCKS, *pool.block_shape)
    with anyio.fail_after(60):
        async with TransferEngine(pool, transport, config=config) as engine:
            handles, blocks = [], {}
            for i in range(REQUESTS):
                rid = f"req-{i}"
                layerwise = i % 2 == 1
                ids = blocks[rid] = pool.alloc(BLOCKS, owner=rid)
                if rank == 0:
                    for layer, data in zip(pool.layers, pattern(shape, rid, 2 * LAYERS),
                                           strict=True):
                        layer[ids] = data
                    handle = engine.send(rid, ids, peer, layerwise=layerwise)
                    pool.free(ids, owner=rid)  # deferred until quiescent
                    if layerwise:
                        for layer in reversed(range(LAYERS)):
                            handle.layer_ready(layer)
                else:
                    handle = engine.receive(rid, ids, peer, layerwise=layerwise)
                handles.append(handle)
            for handle in handles:
                await handle.wait()
            if rank == 1:
                for rid, ids in blocks.items():
                    for layer, data in zip(pool.layers, pattern(shape, rid, 2 * LAYERS),
                                           strict=True):
                        assert torch.equal(layer[ids], data), f"{rid} differs"
                    pool.free(ids, owner=rid)
            assert engine.stats().completed == REQUESTS, engine.stats()
    pool.check()
    assert pool.num_free == pool.num_blocks
    transport.close()


def worker(rank: int, world: int, store_path: str) -> None:
    # A file rendezvous, not a TCP port picked in advance: a port chosen free can be taken
    # by another job before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    anyio.run(run_rank, rank)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} engine torch OK", flush=True)


def rendezvous_file() -> str:
    """A fresh path for the file rendezvous (it must not exist yet)."""
    folder = tempfile.mkdtemp(prefix="kvhandoff-gloo-")
    return os.path.join(folder, "rendezvous")


if __name__ == "__main__":
    mp.spawn(worker, args=(2, rendezvous_file()), nprocs=2, join=True)
