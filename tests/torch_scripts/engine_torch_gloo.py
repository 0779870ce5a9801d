"""TransferEngine over TorchDistTransport (gloo): ``python engine_torch_gloo.py`` starts two
ranks (see _harness.py); rank 0 sends plain and layer-wise transfers to rank 1, which checks
every byte. A failing rank ends the job with a non-zero exit. Prints
``rank R engine torch OK`` per rank."""

from __future__ import annotations

import zlib

import anyio
import torch
from _harness import torch_main

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


def rank_main(rank: int, world: int) -> None:
    anyio.run(run_rank, rank)
    print(f"rank {rank} engine torch OK", flush=True)


if __name__ == "__main__":
    torch_main(rank_main, 2)
